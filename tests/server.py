"""A real ``vllm serve`` process on loopback for tests (bounded start-up, always stopped)."""

from __future__ import annotations

import subprocess
import sys

from vllm_ffnskip.tools.serving import free_port, vllm_server

__all__ = ["free_port", "start_failure", "vllm_server"]


def start_failure(model: str, *args: str, timeout: float = 300.0) -> str:
    """Runs ``vllm serve`` expecting it to fail at start; returns its output."""
    cmd = ["vllm", "serve", model, "--port", str(free_port()), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode != 0, "vllm serve was expected to fail at start"
    return done.stdout + done.stderr


if __name__ == "__main__":
    sys.exit("import this module from tests")
