"""Skip-aware LLaMa FFN op: ``skip_mlp(x, active, w_gate_up, w_down)``.

``out = down(silu(gate(x)) * up(x))`` on rows where ``active`` is set and exactly ``0`` elsewhere,
with vLLM's merged ``MergedColumnParallelLinear`` weight (``w_gate_up[:I]`` = gate,
``w_gate_up[I:]`` = up). The mask stays on the device and all shapes are fixed by ``T``, so the op
needs no host sync and can be captured in a CUDA graph.

* On CUDA with Triton installed, where a plan tuned on this GPU is close to cuBLAS
  (``plans.py``): :func:`skip_mlp_triton` (saves the weight reads of skipped tiles).
* Elsewhere: :func:`skip_mlp_reference` (plain torch: dense compute, then ``torch.where``; correct,
  no saving).

Triton is imported lazily, on the first CUDA call, so importing this package never pulls Triton in
(and never freezes ``TRITON_INTERPRET`` for the rest of the process).
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from .plans import kernel_plan, kernels_pay
from .reference import dense_mlp, skip_mlp_reference

__all__ = ["skip_mlp", "skip_mlp_reference", "dense_mlp", "kernels_pay", "triton_available"]


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether Triton is installed (no import: that is deferred to the first kernel call)."""
    return importlib.util.find_spec("triton") is not None


def skip_mlp(
    x: torch.Tensor,
    active: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Triton kernels on CUDA where this GPU's tuned plan for the shape and batch size is
    close to cuBLAS (``plans.kernel_plan``), else the reference (same result); written into
    ``out`` when given."""
    plan = kernel_plan(x, w_gate_up) if triton_available() else None
    if plan is not None:
        from .skip_mlp_triton import skip_mlp_triton

        return skip_mlp_triton(x, active, w_gate_up, w_down, out=out, plan=plan)
    result = skip_mlp_reference(x, active, w_gate_up, w_down)
    return result if out is None else out.copy_(result)
