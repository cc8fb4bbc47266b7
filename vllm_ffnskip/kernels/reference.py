"""Plain-torch reference of the skip-aware LLaMa FFN.

It is the oracle the Triton kernels are tested against and the fallback wherever Triton cannot
run (CPU, no Triton installed). It computes the dense MLP for every row and then zeroes the inactive
rows with ``torch.where``: no row count ever reaches the host, so it is safe inside a CUDA graph and
under ``torch.compile``, but it saves no work. The saving path is
:mod:`vllm_ffnskip.kernels.skip_mlp_triton`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_skip_mlp_args(
    x: torch.Tensor, active: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor
) -> tuple[int, int, int]:
    """Validate shapes/dtypes of a ``skip_mlp`` call and return ``(T, H, I)``.

    Only metadata is inspected (never tensor values), so the check costs no device-to-host sync.
    """
    if x.dim() != 2 or w_gate_up.dim() != 2 or w_down.dim() != 2:
        raise ValueError("skip_mlp expects x [T, H], w_gate_up [2I, H], w_down [H, I]")
    t, h = x.shape
    two_i, h2 = w_gate_up.shape
    if h2 != h or two_i % 2:
        raise ValueError(f"w_gate_up must be [2I, H={h}], got {tuple(w_gate_up.shape)}")
    i = two_i // 2
    if tuple(w_down.shape) != (h, i):
        raise ValueError(f"w_down must be [H={h}, I={i}], got {tuple(w_down.shape)}")
    if active.shape != (t,):
        raise ValueError(f"active must be [T={t}], got {tuple(active.shape)}")
    if active.dtype not in (torch.bool, torch.int8, torch.uint8):
        raise TypeError(f"active must be bool or int8, got {active.dtype}")
    if not (x.dtype == w_gate_up.dtype == w_down.dtype):
        raise TypeError(
            f"dtype mismatch: x {x.dtype}, w_gate_up {w_gate_up.dtype}, w_down {w_down.dtype}"
        )
    if not (x.device == active.device == w_gate_up.device == w_down.device):
        raise ValueError("x, active, w_gate_up and w_down must be on the same device")
    return t, h, i


def dense_mlp(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """vLLM's LLaMa MLP with the merged weight: ``down(silu(gate(x)) * up(x))``."""
    gate, up = F.linear(x, w_gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w_down)


def skip_mlp_reference(
    x: torch.Tensor, active: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """Dense MLP on active rows, exactly ``0`` on inactive rows (the residual passes unchanged).

    ``torch.where`` (not ``y * mask``), so a NaN/Inf computed for an inactive row cannot leak in.
    """
    check_skip_mlp_args(x, active, w_gate_up, w_down)
    y = dense_mlp(x, w_gate_up, w_down)
    return torch.where(active.bool().unsqueeze(-1), y, y.new_zeros(()))
