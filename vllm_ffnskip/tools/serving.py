"""A real ``vllm serve`` process on loopback, for the tools that measure what a server's users
get (``bench``, ``eval --lm-eval``) and for the tests: bounded start-up, always stopped."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def vllm_server(
    model: str,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 900.0,
    log: Path | None = None,
) -> Iterator[str]:
    """Runs ``vllm serve MODEL ARGS`` and yields its base URL once /health answers.

    The deadline covers a cold compile cache: a fresh clone on a slow 2-core machine spent
    ~4.5 min compiling vLLM's graph and ~2 min our dense graph before /health answered."""
    port = free_port()
    if log is None:
        log = Path(os.environ.get("PYTEST_TMPDIR", "/tmp")) / f"vllm-serve-{port}.log"
    cmd = ["vllm", "serve", model, "--host", "127.0.0.1", "--port", str(port), *args]
    env = {"VLLM_CPU_KVCACHE_SPACE": "2", **os.environ, **(env or {})}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"vllm serve exited ({proc.returncode}):\n{tail(log)}")
                try:
                    if requests.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"vllm serve did not start in {timeout}s:\n{tail(log)}")
                time.sleep(2)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def metric_samples(url: str, prefix: str) -> dict[str, float]:
    """The samples on the server's /metrics whose name starts with ``prefix``, summed over
    their labels, by sample name."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith(prefix):
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
