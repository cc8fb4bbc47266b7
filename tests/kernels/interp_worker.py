"""Runs the Triton skip-MLP kernels under Triton's CPU interpreter, in its own process.

``TRITON_INTERPRET=1`` must be set before Triton is imported and applies to the whole process, so
``test_skip_mlp.py`` runs this file in a subprocess: the interpreter never leaks into other tests.
It prints one JSON object ``{case_id: result}`` on the last line of stdout. ``CASES`` can be
imported without Triton.

Each result holds the error against the fp32 torch reference and the number of weight elements the
kernels loaded (traced through the interpreter's load builder), so the parent test can assert that
skipped tiles read no weight.
"""

from __future__ import annotations

import json
import os
import sys
import zlib
from dataclasses import dataclass

H, I = 64, 128  # noqa: E741


@dataclass(frozen=True)
class Case:
    """One kernel run; ``plan`` names a launch plan (``_plan``), ``mask`` a row pattern."""

    t: int
    dtype: str = "float32"
    mask: str = "random"  # random | none (no row skipped) | all (all skipped) | first10 (active)
    active_dtype: str = "bool"
    plan: str = "auto"  # auto | gemv_reduce | gemv_dot | masked_tiles | compact_tiles
    h: int = H
    i: int = I
    nan_inactive: bool = False  # NaN in the skipped rows of x: they must never be read

    @property
    def id(self) -> str:
        extra = "-nan" if self.nan_inactive else ""
        return (f"T{self.t}-H{self.h}-I{self.i}-{self.dtype}-{self.mask}-{self.active_dtype}-"
                f"{self.plan}{extra}")


CASES = [Case(t, dtype, mask) for dtype in ("float32", "float16", "bfloat16")
         for t in (1, 3, 16, 40) for mask in ("random", "none", "all")]
CASES += [
    Case(3, active_dtype="int8"),
    Case(40, active_dtype="int8"),
    Case(40, "float16", active_dtype="uint8"),
    Case(40, mask="first10", plan="compact_tiles"),  # several row tiles, the last ones all skipped
    Case(40, "float16", plan="compact_tiles"),
    Case(40, plan="masked_tiles"),  # masked GEMM without compaction
    Case(40, mask="first10", plan="masked_tiles"),
    Case(3, plan="gemv_dot"),
    Case(16, plan="gemv_reduce"),
    Case(5, h=48, i=80),  # feature and K edges that are not tile multiples
    Case(33, h=48, i=80),
    Case(1, mask="all", nan_inactive=True),
    Case(3, nan_inactive=True),
    Case(40, nan_inactive=True),
]

# bf16 tl.dot is not supported by Triton's interpreter (it multiplies the raw bf16 bit patterns:
# triton-lang/triton#11584, fix declined in #11585). The CUDA tests cover the compiled bf16 path.
BF16_DOT_UNSUPPORTED = "Triton interpreter does not support bf16 tl.dot (triton-lang/triton#11584)"


def uses_dot(case: Case) -> bool:
    """Whether any kernel of ``case`` goes through tl.dot (decided without importing Triton)."""
    if case.plan in ("gemv_dot", "masked_tiles", "compact_tiles"):
        return True
    if case.plan == "gemv_reduce":
        return False
    return case.t > 4  # auto: the reduce-form GEMV covers T <= 4, see _gemv_tile


# --------------------------------------------------------------------------------------------------


def _plan(name: str):
    from vllm_ffnskip.kernels.skip_mlp_triton import SkipMLPPlan, TileConfig

    if name == "auto":
        return None
    if name == "gemv_reduce":
        tile = TileConfig(16, 8, 32, False)
        return SkipMLPPlan(False, tile, tile)
    if name == "gemv_dot":
        tile = TileConfig(16, 16, 32, True)
        return SkipMLPPlan(False, tile, tile)
    tile = TileConfig(16, 32, 32, True)
    return SkipMLPPlan(name == "compact_tiles", tile, tile)


def _mask(name: str, t: int, gen):
    import torch

    if name == "random":
        m = torch.rand(t, generator=gen) < 0.5
        if t > 1:  # make both kinds present
            m[0], m[-1] = True, False
        return m
    if name == "none":
        return torch.ones(t, dtype=torch.bool)
    if name == "all":
        return torch.zeros(t, dtype=torch.bool)
    if name == "first10":
        return torch.arange(t) < 10
    raise ValueError(name)


class _LoadTrace:
    """Records the addresses of every element the interpreter loads (masked-off lanes excluded)."""

    def __init__(self) -> None:
        from triton.runtime import interpreter

        self.chunks: list = []
        builder = interpreter.InterpreterBuilder
        original = builder.create_masked_load
        trace = self

        def create_masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
            trace.chunks.append(ptrs.data[mask.data].ravel().copy())
            return original(self, ptrs, mask, other, cache_policy, is_volatile)

        builder.create_masked_load = create_masked_load

    def count_in(self, tensor) -> int:
        """Number of loaded elements that lie inside ``tensor``'s storage."""
        import numpy as np

        if not self.chunks:
            return 0
        addrs = np.concatenate(self.chunks)
        lo = tensor.data_ptr()
        hi = lo + tensor.numel() * tensor.element_size()
        return int(((addrs >= lo) & (addrs < hi)).sum())


def run_case(case: Case, trace: _LoadTrace) -> dict:
    import torch

    from vllm_ffnskip.kernels import skip_mlp_reference
    from vllm_ffnskip.kernels.skip_mlp_triton import choose_plan, num_sms_of, skip_mlp_triton

    dtype = getattr(torch, case.dtype)
    gen = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))
    x = torch.randn(case.t, case.h, generator=gen)
    # Scaled so that the outputs are O(1): tolerances then read as relative errors.
    w_gate_up = torch.randn(2 * case.i, case.h, generator=gen) / case.h**0.5
    w_down = torch.randn(case.h, case.i, generator=gen) / case.i**0.5
    mask = _mask(case.mask, case.t, gen)
    active = mask.to(getattr(torch, case.active_dtype))
    x, w_gate_up, w_down = x.to(dtype), w_gate_up.to(dtype), w_down.to(dtype)
    if case.nan_inactive:
        x[~mask] = float("nan")

    plan = _plan(case.plan) or choose_plan(case.t, case.h, case.i, num_sms_of(x.device))
    trace.chunks.clear()
    # Into a preallocated output, as the graph's custom op calls it: NaN until written.
    into = torch.full((case.t, case.h), float("nan"), dtype=dtype)
    out = skip_mlp_triton(x, active, w_gate_up, w_down, out=into, plan=plan)
    weight_loads = trace.count_in(w_gate_up) + trace.count_in(w_down)

    # Same (possibly low-precision) inputs, fp32 math.
    ref = skip_mlp_reference(x.float(), active, w_gate_up.float(), w_down.float())
    ref_same_dtype = skip_mlp_reference(x, active, w_gate_up, w_down).float()
    live = mask.nonzero().flatten().tolist()
    diff = (out.float() - ref)[mask]
    rel = diff.abs() / ref[mask].abs().clamp_min(1.0)

    def live_tiles(block_m: int) -> int:
        """Row tiles holding a live row: each reads every weight element exactly once."""
        if plan.compact:
            return -(-len(live) // block_m)
        return len({r // block_m for r in live})

    expected_loads = (2 * case.i * case.h * live_tiles(plan.gate_up.block_m)
                      + case.h * case.i * live_tiles(plan.down.block_m))
    return {
        "out_dtype": str(out.dtype).removeprefix("torch."),
        "out_shape": list(out.shape),
        "wrote_into_out": out.data_ptr() == into.data_ptr(),
        "skipped_rows_exact_zero": bool((out[~mask] == 0).all()),
        "finite": bool(torch.isfinite(out).all()),
        "max_abs_err": float(diff.abs().max()) if live else 0.0,
        "max_rel_err": float(rel.max()) if live else 0.0,
        "torch_same_dtype_err": float((ref_same_dtype - ref)[mask].abs().max()) if live else 0.0,
        "weight_loads": weight_loads,
        "expected_weight_loads": expected_loads,
        "compact": plan.compact,
    }


def main(argv: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("interp_worker.py must run with TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    wanted = set(argv)
    trace = _LoadTrace()
    results = {}
    for case in CASES:
        if wanted and case.id not in wanted:
            continue
        if case.dtype == "bfloat16" and uses_dot(case):
            continue
        try:
            results[case.id] = run_case(case, trace)
        except Exception as e:  # report per case; one failure must not hide the others
            results[case.id] = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
