"""A real ``vllm serve`` process on loopback for tests (bounded start-up, always stopped)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def vllm_server(
    model: str, *args: str, env: dict[str, str] | None = None, timeout: float = 900.0
) -> Iterator[str]:
    """Runs ``vllm serve MODEL ARGS`` and yields its base URL once /health answers.

    The deadline covers a cold compile cache: a fresh clone on a slow 2-core machine spent
    ~4.5 min compiling vLLM's graph and ~2 min our dense graph before /health answered."""
    port = free_port()
    log = Path(os.environ.get("PYTEST_TMPDIR", "/tmp")) / f"vllm-serve-{port}.log"
    cmd = ["vllm", "serve", model, "--host", "127.0.0.1", "--port", str(port), *args]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"vllm serve exited ({proc.returncode}):\n{_tail(log)}")
                try:
                    if requests.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"vllm serve did not start in {timeout}s:\n{_tail(log)}")
                time.sleep(2)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def start_failure(model: str, *args: str, timeout: float = 300.0) -> str:
    """Runs ``vllm serve`` expecting it to fail at start; returns its output."""
    cmd = ["vllm", "serve", model, "--port", str(free_port()), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode != 0, "vllm serve was expected to fail at start"
    return done.stdout + done.stderr


def _tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


if __name__ == "__main__":
    sys.exit("import this module from tests")
