"""Launch plans of the skip-aware FFN kernels: tiles from a shape heuristic, or tuned per GPU.

Plain Python (no Triton import), so the server can tell at start whether a model's FFN shape
has tuned plans on its GPU, and tests can read the tuned-plan files anywhere.

A tuned-plan file (``configs/H=..,I=..,dtype=..,device_name=...json``, vLLM's fused-MoE
layout) holds, by batch size, the fastest tiles ``benchmarks/kernel_tune.py`` timed on that
GPU with every row running, and beside them cuBLAS's time for the same FFN. The op runs the
Triton kernels only where that measured time is close to cuBLAS's (``competitive_plan``):
elsewhere it runs cuBLAS and masks, which saves nothing but costs nothing either. On an H200
the untuned heuristic tiles took 1.3x cuBLAS at batch 1 and 1.5-7x at batch 2-256
(docs/kernels.md), so without a tuned file no shape runs the kernels.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

#: Largest batch handled by the GEMV path; above it the compacted GEMM path is used.
SMALL_T_MAX = 16
#: Tuned-plan files, one per FFN shape (per tensor-parallel rank), dtype and GPU.
CONFIG_DIR = Path(__file__).with_name("configs")
#: A folder of the operator's tuned files, looked up before ``CONFIG_DIR`` (vLLM's variable).
TUNED_CONFIG_FOLDER_ENV = "VLLM_TUNED_CONFIG_FOLDER"
#: The kernels run where their tuned time with every row running is at most this many times
#: cuBLAS's: from ~10% of layers skipped by every row of the pass on, they save time.
KERNEL_MAX_SLOWDOWN = 1.1


@dataclass(frozen=True)
class TileConfig:
    """Tile shape and launch options of one of the two GEMM-like kernels."""

    block_m: int
    block_n: int
    block_k: int
    #: tensor-core ``tl.dot`` (block_m/n/k >= 16) or broadcast-multiply-reduce (a true GEMV)
    use_dot: bool
    num_warps: int = 4
    num_stages: int = 3

    def kwargs(self) -> dict:
        """Launch keyword arguments of this tile."""
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k,
                    USE_DOT=self.use_dot, num_warps=self.num_warps, num_stages=self.num_stages)


@dataclass(frozen=True)
class SkipMLPPlan:
    """How one call is launched; ``compact`` fixes the ``act`` row layout both kernels share."""

    compact: bool
    gate_up: TileConfig
    down: TileConfig


@dataclass(frozen=True)
class TunedPlan:
    """A plan measured on one GPU with every row running, beside cuBLAS's dense FFN."""

    plan: SkipMLPPlan
    us: float
    cublas_us: float

    @property
    def competitive(self) -> bool:
        return self.us <= KERNEL_MAX_SLOWDOWN * self.cublas_us

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self.plan), "us": self.us, "cublas_us": self.cublas_us}

    @classmethod
    def from_dict(cls, entry: dict) -> TunedPlan:
        plan = SkipMLPPlan(bool(entry["compact"]), TileConfig(**entry["gate_up"]),
                           TileConfig(**entry["down"]))
        return cls(plan, float(entry["us"]), float(entry["cublas_us"]))


def _pow2_clamp(v: float, lo: int, hi: int) -> int:
    """Largest power of two <= ``v``, clamped to ``[lo, hi]``."""
    p = lo
    while p * 2 <= min(v, hi):
        p *= 2
    return p


def next_pow2(v: int) -> int:
    """The smallest power of two >= ``v`` (Triton's ``next_power_of_2``, without Triton)."""
    return 1 << (v - 1).bit_length()


def _gemv_tile(t: int, n: int, sms: int) -> TileConfig:
    """GEMV tile: the whole batch in one row tile, ``block_n`` small for ~4 programs per SM."""
    block_m = next_pow2(t)
    use_dot = block_m > 4
    if use_dot:
        block_m = 16  # tl.dot minimum; padded rows are masked and cost no memory traffic
        return TileConfig(block_m, _pow2_clamp(n / (4 * sms), 16, 64), 64, True)
    block_n = _pow2_clamp(n / (4 * sms), 4, 64)
    # Bound the [M, N, K] product held in registers.
    block_k = _pow2_clamp(8192 // (block_m * block_n), 32, 512)
    return TileConfig(block_m, block_n, block_k, False)


def choose_plan(t: int, h: int, i: int, num_sms: int) -> SkipMLPPlan:
    """Pick path and tiles from the shape alone (no tuned file for this shape and GPU).

    No autotuning: it syncs on the first call for each key and cannot run inside a graph capture.
    These are first guesses; on an H200 they were 1.3-7x slower than cuBLAS (docs/kernels.md).
    """
    if t <= SMALL_T_MAX:
        return SkipMLPPlan(False, _gemv_tile(t, i, num_sms), _gemv_tile(t, h, num_sms))
    block_m = 32 if t <= 32 else 64 if t <= 256 else 128
    m_tiles = -(-t // block_m)
    # Narrow tiles while there are few row tiles (memory-bound: fill every SM), wide ones once
    # compute-bound. gate_up keeps two fp32 accumulators, so its tile is at most half as wide.
    up_n = _pow2_clamp(i * m_tiles / num_sms, 32, 64)
    down_n = _pow2_clamp(h * m_tiles / num_sms, 32, 128)
    gate_up = TileConfig(block_m, up_n, 64, True, num_warps=8 if block_m * up_n >= 128 * 128 else 4)
    down = TileConfig(block_m, down_n, 64, True,
                      num_warps=8 if block_m * down_n >= 128 * 128 else 4)
    return SkipMLPPlan(True, gate_up, down)


@functools.cache
def device_name_of(device: torch.device) -> str:
    """The GPU's name as vLLM's tuned-config files spell it (``NVIDIA_H200``)."""
    return torch.cuda.get_device_name(device).replace(" ", "_")


def config_file_name(h: int, i: int, dtype: torch.dtype, device_name: str) -> str:
    """The tuned-plan file of one FFN shape (per tensor-parallel rank), dtype and GPU
    (``device_name`` as vLLM spells it: ``NVIDIA_H200``)."""
    return f"H={h},I={i},dtype={str(dtype).removeprefix('torch.')},device_name={device_name}.json"


def write_tuned_plans(path: Path, plans: dict[int, TunedPlan], meta: dict) -> None:
    """A tuned-plan file: ``meta`` says where and how it was measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"meta": meta, "plans": {str(t): p.to_dict() for t, p in sorted(plans.items())}}
    path.write_text(json.dumps(body, indent=1) + "\n")


def config_dirs() -> list[Path]:
    """Where tuned-plan files are looked up, first match wins: vLLM's own
    ``VLLM_TUNED_CONFIG_FOLDER`` (where operators already put tuned fused-MoE configs, e.g. a
    mounted ConfigMap; our file names do not collide with those), then the shipped ones."""
    user = os.environ.get(TUNED_CONFIG_FOLDER_ENV)
    return [Path(user), CONFIG_DIR] if user else [CONFIG_DIR]


@functools.cache
def tuned_plans(h: int, i: int, dtype: torch.dtype, device_name: str,
                config_dir: Path | None = None) -> dict[int, TunedPlan]:
    """The tuned plans by batch size of this shape, dtype and GPU, or none (``config_dir``:
    only that folder; else ``config_dirs()``)."""
    name = config_file_name(h, i, dtype, device_name)
    for folder in [config_dir] if config_dir else config_dirs():
        if (folder / name).exists():
            body = json.loads((folder / name).read_text())
            return {int(t): TunedPlan.from_dict(e) for t, e in body["plans"].items()}
    return {}


def nearest(tuned: dict[int, TunedPlan], t: int) -> TunedPlan:
    """The plan tuned at the batch size nearest ``t`` (the smaller one on a tie); any plan
    is correct for any ``T``, only its speed differs."""
    return tuned[min(tuned, key=lambda k: (abs(k - t), k))]


def competitive_plan(tuned: dict[int, TunedPlan], t: int) -> SkipMLPPlan | None:
    """The tuned plan for ``t`` where it is close to cuBLAS, else none (run cuBLAS)."""
    if not tuned:
        return None
    entry = nearest(tuned, t)
    return entry.plan if entry.competitive else None


def tuned_plans_for(x: torch.Tensor, i: int) -> dict[int, TunedPlan]:
    """The tuned plans of the FFN that ``x`` [T, H] enters (``i``: its width per rank) on
    ``x``'s GPU; none off CUDA."""
    return tuned_plans(x.shape[1], i, x.dtype, device_name_of(x.device)) if x.is_cuda else {}


def kernel_plan(x: torch.Tensor, w_gate_up: torch.Tensor) -> SkipMLPPlan | None:
    """The plan the op runs the Triton kernels with for this call, or none (cuBLAS)."""
    return competitive_plan(tuned_plans_for(x, w_gate_up.shape[0] // 2), x.shape[0])


def kernels_pay(h: int, i: int, dtype: torch.dtype, device_name: str,
                config_dir: Path | None = None) -> bool:
    """Whether this FFN shape has a tuned plan close to cuBLAS at some batch size on this GPU:
    the ``kernel`` form then saves time there; without one it would only cost time."""
    return any(p.competitive for p in tuned_plans(h, i, dtype, device_name, config_dir).values())
