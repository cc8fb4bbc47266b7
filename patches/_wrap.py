"""The one way our patches replace a vLLM method: wrap it, keep the original reachable."""

from __future__ import annotations

import functools
from typing import Any, Callable


def wrap_method(owner: Any, name: str, replacement: Callable[..., Any]) -> None:
    """Replace ``owner.name`` by ``replacement(original, *args, **kwargs)``; idempotent."""
    original = getattr(owner, name)
    if getattr(original, "__ffnskip_patch__", False):
        return

    @functools.wraps(original)
    def patched(*args: Any, **kwargs: Any) -> Any:
        return replacement(original, *args, **kwargs)

    patched.__ffnskip_patch__ = True  # type: ignore[attr-defined]
    setattr(owner, name, patched)
