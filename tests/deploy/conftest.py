"""Fixtures that render the chart with the real helm binary (see helm_binary.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from .helm_binary import HelmUnavailable, ensure_helm

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "vllm-ffnskip"


@pytest.fixture(scope="session")
def helm() -> Path:
    try:
        return ensure_helm()
    except HelmUnavailable as exc:
        message = str(exc)
    pytest.fail(message, pytrace=False)  # CI has npm: a missing helm is a failure, not a skip


@pytest.fixture(scope="session")
def helm_cmd(helm: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., subprocess.CompletedProcess]:
    """Run `helm <args>` against the chart; `values` (a dict) goes in as a values file."""
    tmp = tmp_path_factory.mktemp("values")
    counter = iter(range(1_000_000))

    def run(*args: str, values: dict[str, Any] | None = None) -> subprocess.CompletedProcess:
        cmd = [str(helm), *args]
        if values:
            vfile = tmp / f"values-{next(counter)}.yaml"
            vfile.write_text(yaml.safe_dump(values))
            cmd += ["-f", str(vfile)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                              env={"HOME": str(tmp), "PATH": "/usr/bin:/bin"})

    return run


@pytest.fixture(scope="session")
def render(helm_cmd) -> Callable[..., list[dict[str, Any]]]:
    """`helm template` the chart and return its objects (parsed, None documents dropped)."""
    cache: dict[str, list[dict[str, Any]]] = {}

    def _render(values: dict[str, Any] | None = None, *, release: str = "ffnskip",
                namespace: str = "llm") -> list[dict[str, Any]]:
        key = json.dumps([values, release, namespace], sort_keys=True)
        if key not in cache:
            proc = helm_cmd("template", release, str(CHART), "--namespace", namespace, values=values)
            assert proc.returncode == 0, f"helm template failed:\n{proc.stderr}"
            cache[key] = [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
        return json.loads(json.dumps(cache[key]))  # a fresh copy for each caller

    return _render
