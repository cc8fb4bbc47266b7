"""Triton skip-aware LLaMa FFN: ``down(silu(gate(x)) * up(x))`` on active rows, zeros elsewhere.

Why Triton and not gather -> MLP -> scatter: a gather needs the number of active rows on the host (a
device-to-host sync per layer) and produces data-dependent shapes, which a CUDA graph cannot hold.
Here every shape is fixed by ``T``; the row mask stays on the device and each program reads it and
decides for itself.

Two launches per call (plus one tiny compaction launch on the GEMM path):

1. ``_gate_up_silu_kernel``: ``act = silu(x @ Wg^T) * (x @ Wu^T)`` for live rows. One program loads
   the gate tile and the matching up tile of the merged ``[2I, H]`` weight, so SiLU-and-mul is fused
   in the epilogue and the ``[T, 2I]`` intermediate never reaches memory. Rows that are not live are
   never written.
2. ``_down_kernel``: ``out = act @ Wd^T`` for live rows and ``0`` for the others (every output
   element is written, so ``out`` needs no memset).

A program whose rows are all inactive returns before it touches a weight: for a skipped batch-1
token the layer reads no FFN weight at all, which is where the time goes in memory-bound decode.

Two row layouts (``SkipMLPPlan.compact``):

* GEMV path (small ``T``, ``compact=False``): one row tile holds the whole batch and the programs
  split the output features. The weights are streamed once for all rows, so they are skipped only
  if *every* row skips.
* GEMM path (large ``T``, ``compact=True``): a one-program prefix sum on the device orders active
  rows first (``perm``) and counts them (``count``). Row tiles past ``count`` exit at once, so the
  work follows the number of active rows instead of needing whole tiles of inactive rows, which
  random masks almost never produce.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .plans import SMALL_T_MAX, SkipMLPPlan, TileConfig, choose_plan, nearest, tuned_plans_for
from .reference import check_skip_mlp_args

__all__ = ["SMALL_T_MAX", "SkipMLPPlan", "TileConfig", "choose_plan", "compact_rows",
           "launch_down", "launch_gate_up", "plan_for", "skip_mlp_triton"]

#: Largest ``T`` the one-program compaction kernel accepts (Triton's block-size limit).
MAX_COMPACT_T = 1 << 20
_LAUNCH = dict(enable_fp_fusion=True)


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _compact_rows_kernel(active_ptr, perm_ptr, count_ptr, T, BLOCK: tl.constexpr):
    """``perm`` = active row ids (in order) then inactive ones; ``count`` = number of active rows.

    One program, one scan: a single launch and no host sync, so it can sit in a CUDA graph.
    """
    idx = tl.arange(0, BLOCK)
    in_range = idx < T
    a = (tl.load(active_ptr + idx, mask=in_range, other=0) != 0).to(tl.int32)
    n_active = tl.sum(a, axis=0)
    active_before = tl.cumsum(a, axis=0) - a  # exclusive prefix sum
    pos = tl.where(a != 0, active_before, n_active + (idx - active_before))
    tl.store(perm_ptr + pos, idx, mask=in_range)
    tl.store(count_ptr, n_active)


@triton.jit
def _tile_ids(num_m, num_n, GROUP_M: tl.constexpr):
    """Grouped (L2-friendly) order of output tiles, as in Triton's matmul tutorial."""
    pid = tl.program_id(0)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _tile_rows(idx, T, active_ptr, perm_ptr, count_ptr, COMPACT: tl.constexpr):
    """Map tile row slots ``idx`` to ``(x/out row, live?, idx < T)``; the mask is read on device."""
    in_range = idx < T
    if COMPACT:
        rows = tl.load(perm_ptr + idx, mask=in_range, other=0)
        live = idx < tl.load(count_ptr)
    else:
        rows = idx
        live = tl.load(active_ptr + idx, mask=in_range, other=0) != 0
    return rows, live, in_range


@triton.jit
def _mac(acc, a, w, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``acc += a @ w^T`` for ``a [M, K]``, ``w [N, K]``, accumulating in fp32."""
    if USE_DOT:
        acc = tl.dot(a, tl.trans(w), acc, input_precision=DOT_PRECISION)
    else:
        # GEMV form: no tensor-core tile minimum, so M can be 1 and N small enough to spread one
        # weight matrix over every SM.
        acc += tl.sum(a.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    return acc


@triton.jit
def _gate_up_silu_kernel(x_ptr, active_ptr, perm_ptr, count_ptr, w_ptr, act_ptr,
                         T, H, I, stride_x, stride_w, stride_act,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         COMPACT: tl.constexpr, USE_DOT: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, GROUP_M: tl.constexpr):
    """``act[slot] = silu(x[row] @ Wg^T) * (x[row] @ Wu^T)`` for the live rows of this tile."""
    pid_m, pid_n = _tile_ids(tl.cdiv(T, BLOCK_M), tl.cdiv(I, BLOCK_N), GROUP_M)
    idx = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows, live, _ = _tile_rows(idx, T, active_ptr, perm_ptr, count_ptr, COMPACT)
    if tl.max(live.to(tl.int32), axis=0) == 0:
        return  # every row of the tile skips this FFN: no weight is read

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < I
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_x + ks[None, :]
    wg_ptrs = w_ptr + cols.to(tl.int64)[:, None] * stride_w + ks[None, :]
    # The up rows follow the I gate rows in the merged weight.
    wu_ptrs = w_ptr + (cols + I).to(tl.int64)[:, None] * stride_w + ks[None, :]
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_ok = (k0 + ks) < H
        a = tl.load(x_ptrs + k0, mask=live[:, None] & k_ok[None, :], other=0.0)
        w_mask = col_ok[:, None] & k_ok[None, :]
        wg = tl.load(wg_ptrs + k0, mask=w_mask, other=0.0)
        wu = tl.load(wu_ptrs + k0, mask=w_mask, other=0.0)
        acc_g = _mac(acc_g, a, wg, USE_DOT, DOT_PRECISION)
        acc_u = _mac(acc_u, a, wu, USE_DOT, DOT_PRECISION)

    h = acc_g * tl.sigmoid(acc_g) * acc_u  # fused SiluAndMul, in fp32 before the single rounding
    act_ptrs = act_ptr + idx.to(tl.int64)[:, None] * stride_act + cols[None, :]
    tl.store(act_ptrs, h.to(act_ptr.dtype.element_ty), mask=live[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(act_ptr, active_ptr, perm_ptr, count_ptr, w_ptr, out_ptr,
                 T, H, I, stride_act, stride_w, stride_out,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 COMPACT: tl.constexpr, USE_DOT: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, GROUP_M: tl.constexpr):
    """``out[row] = act[slot] @ Wd^T`` on live rows, ``0`` on the others; writes all of ``out``."""
    pid_m, pid_n = _tile_ids(tl.cdiv(T, BLOCK_M), tl.cdiv(H, BLOCK_N), GROUP_M)
    idx = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows, live, in_range = _tile_rows(idx, T, active_ptr, perm_ptr, count_ptr, COMPACT)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
    out_mask = in_range[:, None] & col_ok[None, :]
    if tl.max(live.to(tl.int32), axis=0) == 0:
        # Skipped rows pass the residual unchanged: write zeros, read no weight.
        zeros = tl.zeros((BLOCK_M, BLOCK_N), dtype=out_ptr.dtype.element_ty)
        tl.store(out_ptrs, zeros, mask=out_mask)
        return

    ks = tl.arange(0, BLOCK_K)
    a_ptrs = act_ptr + idx.to(tl.int64)[:, None] * stride_act + ks[None, :]
    w_ptrs = w_ptr + cols.to(tl.int64)[:, None] * stride_w + ks[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        k_ok = (k0 + ks) < I
        a = tl.load(a_ptrs + k0, mask=live[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs + k0, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _mac(acc, a, w, USE_DOT, DOT_PRECISION)
    acc = tl.where(live[:, None], acc, 0.0)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


# --------------------------------------------------------------------------------------------------
# Launch heuristics and wrapper
# --------------------------------------------------------------------------------------------------


@functools.cache
def num_sms_of(device: torch.device) -> int:
    """SM count of ``device`` (a host-side property query, not a sync); a nominal 132 off CUDA."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def plan_for(t: int, h: int, i: int, x: torch.Tensor) -> SkipMLPPlan:
    """The tuned plan of the nearest tuned batch size on this GPU, else the heuristic's."""
    tuned = tuned_plans_for(x, i)
    return nearest(tuned, t).plan if tuned else choose_plan(t, h, i, num_sms_of(x.device))


def _dot_precision(x: torch.Tensor) -> str:
    """fp32 must not silently run as TF32; the precision is ignored for fp16/bf16."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


def compact_rows(live: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(perm, count)`` of the GEMM path: active rows first, and their number, on the device."""
    t = live.shape[0]
    if t > MAX_COMPACT_T:
        raise ValueError(f"T={t} exceeds the compaction limit {MAX_COMPACT_T}")
    perm = torch.empty(t, dtype=torch.int32, device=live.device)
    count = torch.empty(1, dtype=torch.int32, device=live.device)
    _compact_rows_kernel[(1,)](live, perm, count, t, BLOCK=triton.next_power_of_2(t),
                               num_warps=4 if t <= 4096 else 8, **_LAUNCH)
    return perm, count


def _launch(kernel, a: torch.Tensor, live: torch.Tensor, perm: torch.Tensor,
            count: torch.Tensor, w: torch.Tensor, o: torch.Tensor, tile: TileConfig,
            compact: bool, t: int, h: int, i: int) -> None:
    """One launch of either GEMM-like kernel (same argument order): input ``a``, weight ``w``,
    output ``o``, one program per output tile."""
    grid = (triton.cdiv(t, tile.block_m) * triton.cdiv(o.shape[1], tile.block_n),)
    kernel[grid](a, live, perm, count, w, o, t, h, i, a.stride(0), w.stride(0), o.stride(0),
                 **tile.kwargs(), COMPACT=compact, DOT_PRECISION=_dot_precision(a), GROUP_M=8,
                 **_LAUNCH)


def launch_gate_up(x: torch.Tensor, live: torch.Tensor, perm: torch.Tensor, count: torch.Tensor,
                   w_gate_up: torch.Tensor, act: torch.Tensor, tile: TileConfig,
                   compact: bool) -> None:
    """``act = silu(gate(x)) * up(x)`` on live rows (one launch; the tuner times it alone)."""
    (t, h), i = x.shape, act.shape[1]
    _launch(_gate_up_silu_kernel, x, live, perm, count, w_gate_up, act, tile, compact, t, h, i)


def launch_down(act: torch.Tensor, live: torch.Tensor, perm: torch.Tensor, count: torch.Tensor,
                w_down: torch.Tensor, out: torch.Tensor, tile: TileConfig, compact: bool) -> None:
    """``out = down(act)`` on live rows, 0 elsewhere (one launch; the tuner times it alone)."""
    (t, i), h = act.shape, out.shape[1]
    _launch(_down_kernel, act, live, perm, count, w_down, out, tile, compact, t, h, i)


def skip_mlp_triton(x: torch.Tensor, active: torch.Tensor, w_gate_up: torch.Tensor,
                    w_down: torch.Tensor, *, out: torch.Tensor | None = None,
                    plan: SkipMLPPlan | None = None) -> torch.Tensor:
    """Skip-aware LLaMa FFN with Triton (see the module docstring): no host sync, fixed shapes.

    ``out``: a contiguous ``[T, H]`` tensor to write into (every element is written), as the
    graph-captured custom op passes it; a new one otherwise. ``plan`` overrides the tuned or
    heuristic launch plan (tests and tuning).
    """
    t, h, i = check_skip_mlp_args(x, active, w_gate_up, w_down)
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    elif out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {tuple(x.shape)} {x.dtype} tensor")
    if t == 0:
        return out
    x = x if x.stride(-1) == 1 else x.contiguous()
    w_gate_up = w_gate_up if w_gate_up.stride(-1) == 1 else w_gate_up.contiguous()
    w_down = w_down if w_down.stride(-1) == 1 else w_down.contiguous()
    live = active.contiguous()
    if live.dtype != torch.int8:
        live = live.view(torch.int8)  # bool/uint8 share the byte layout: a view, not a kernel
    plan = plan or plan_for(t, h, i, x)
    # The COMPACT=False kernels never read perm/count: any valid pointer will do.
    perm, count = compact_rows(live) if plan.compact else (live, live)
    act = torch.empty((t, i), dtype=x.dtype, device=x.device)
    launch_gate_up(x, live, perm, count, w_gate_up, act, plan.gate_up, plan.compact)
    launch_down(act, live, perm, count, w_down, out, plan.down, plan.compact)
    return out
