#!/usr/bin/env python
"""Tune the skip-aware FFN kernels' tiles on one GPU and write the plugin's tuned-plan files.

For each FFN shape (per tensor-parallel rank), dtype and batch size ``T``, every candidate tile
of each of the two kernels (``gate_up`` + SiLU-and-mul, ``down``) is timed on its own with all
rows active (the case where the kernel competes with cuBLAS), in a CUDA graph holding
``--calls`` launches, median of ``--iters`` replays (CUDA events). The fastest tile of each
kernel makes the plan for that ``T``; the plans go to
``vllm_ffnskip/kernels/configs/H=..,I=..,dtype=..,device_name=...json`` (``--write``), which
``skip_mlp_triton.plan_for`` reads at the first call, as vLLM's fused-MoE kernel reads its
tuned configs. Candidates are compiled first by ``--workers`` processes in parallel (Triton's
on-disk cache), within ``--compile-budget`` seconds; a candidate not compiled by then, or
that fails to compile or launch, is left out.

Needs torch + Triton on a CUDA GPU (no vLLM)::

    python benchmarks/kernel_tune.py --shapes 4096x11008,4096x14336 --dtypes bf16 --write

``--device cpu`` runs the plumbing under Triton's interpreter with tiny shapes (its files, for
``device_name=cpu``, are for tests: the CPU never runs these kernels).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cuda_graph_timing import replay_ms  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
SMEM_BYTES = 200 * 1024  # under Hopper's 227 KiB per block, leaving Triton's own scratch


def candidates(t: int, compact: bool, kernel: str) -> Iterator:
    """Tiles worth timing for ``T`` rows: broadcast-reduce GEMVs (``T`` <= 4), 16-row
    ``tl.dot`` tiles over the whole batch (``T`` <= 16), compacted ``tl.dot`` tiles above."""
    from vllm_ffnskip.kernels.plans import TileConfig, next_pow2

    weights = 2 if kernel == "gate_up" else 1  # gate_up loads a gate and an up tile
    if not compact and t <= 4:
        bm = next_pow2(t)
        for bn, bk, nw in itertools.product((4, 8, 16, 32), (128, 256, 512, 1024), (2, 4, 8)):
            if weights * bm * bn * bk <= 2048 * nw:  # the [M, N, K] product held in registers
                yield TileConfig(bm, bn, bk, False, num_warps=nw)
    if compact:
        space = (tuple(m for m in (16, 32, 64, 128) if m <= max(16, t)), (32, 64, 128), (64, 128),
                 (4, 8), (3, 4))
    else:
        space = ((16,), (16, 32, 64), (64, 128, 256), (4, 8), (3, 4, 5))
    for bm, bn, bk, nw, ns in itertools.product(*space):
        if ns * (bm + weights * bn) * bk * 2 <= SMEM_BYTES:
            yield TileConfig(bm, bn, bk, True, num_warps=nw, num_stages=ns)


def short(tile) -> str:
    """``dot 16x64x128 w4 s3``: the form, block M x N x K, warps and stages."""
    form = "dot" if tile.use_dot else "reduce"
    return (f"{form} {tile.block_m}x{tile.block_n}x{tile.block_k} w{tile.num_warps} "
            f"s{tile.num_stages}")


class Problem:
    """The tensors of one (shape, dtype, T) with every row active."""

    def __init__(self, h: int, i: int, dtype: torch.dtype, t: int, device: str):
        from vllm_ffnskip.kernels import skip_mlp_triton as k

        gen = torch.Generator().manual_seed(0)
        self.compact = t > k.SMALL_T_MAX
        self.x = torch.randn(t, h, generator=gen).to(device, dtype)
        self.w_gate_up = (torch.randn(2 * i, h, generator=gen) / h**0.5).to(device, dtype)
        self.w_down = (torch.randn(h, i, generator=gen) / i**0.5).to(device, dtype)
        self.live = torch.ones(t, dtype=torch.int8, device=device)
        self.perm, self.count = (k.compact_rows(self.live) if self.compact
                                 else (self.live, self.live))
        self.act = torch.randn(t, i, generator=gen).to(device, dtype)
        self.out = torch.empty_like(self.x)

    def launcher(self, kernel: str, tile) -> Callable[[], None]:
        from vllm_ffnskip.kernels import skip_mlp_triton as k

        if kernel == "gate_up":
            return lambda: k.launch_gate_up(self.x, self.live, self.perm, self.count,
                                            self.w_gate_up, self.act, tile, self.compact)
        return lambda: k.launch_down(self.act, self.live, self.perm, self.count, self.w_down,
                                     self.out, tile, self.compact)

    def cublas(self, kernel: str) -> Callable[[], object]:
        """What vLLM runs instead: cuBLAS, plus SiLU-and-mul after gate_up."""
        i = self.act.shape[1]
        if kernel == "gate_up":
            def gate_up() -> torch.Tensor:
                gu = torch.nn.functional.linear(self.x, self.w_gate_up)
                return torch.nn.functional.silu(gu[:, :i]) * gu[:, i:]
            return gate_up
        return lambda: torch.nn.functional.linear(self.act, self.w_down)


def work_items(args: argparse.Namespace) -> list[tuple[str, int, str, object]]:
    """(dtype, T, kernel, tile) to compile and time, smallest batches first."""
    from vllm_ffnskip.kernels.plans import SMALL_T_MAX

    return [(dt, t, kernel, tile) for t in args.batches for dt in args.dtypes
            for kernel in ("gate_up", "down") for tile in candidates(t, t > SMALL_T_MAX, kernel)]


def _compile_chunk(payload: tuple[tuple[int, int], list, str]) -> list[int]:
    """Worker: launch each item once (Triton compiles into its on-disk cache); returns the
    indices that launched."""
    (h, i), items, device = payload
    problems: dict = {}
    ok = []
    for index, dt, t, kernel, tile in items:
        key = (dt, t)
        if key not in problems:
            problems.clear()
            problems[key] = Problem(h, i, DTYPES[dt], t, device)
        try:
            problems[key].launcher(kernel, tile)()
            ok.append(index)
        except Exception:  # out of resources, or a tile Triton cannot lower: not a candidate
            pass
    if device == "cuda":
        torch.cuda.synchronize()
    return ok


def precompile(items: list, shape: tuple[int, int], args: argparse.Namespace) -> set[int]:
    """Compile every item in parallel worker processes; the indices compiled in time."""
    chunks = [[(n, *item) for n, item in enumerate(items)][w::args.workers]
              for w in range(args.workers)]
    # Small chunks, so the budget's deadline loses little: each worker task is a few items.
    tasks = [(shape, chunk[j:j + 4], args.device) for chunk in chunks
             for j in range(0, len(chunk), 4)]
    tasks.sort(key=lambda task: task[1][0][0])  # in work-item order: small batches first
    done: set[int] = set()
    deadline = time.monotonic() + args.compile_budget
    with mp.get_context("spawn").Pool(args.workers) as pool:
        pending = pool.imap_unordered(_compile_chunk, tasks)
        for _ in tasks:
            try:
                done.update(pending.next(timeout=max(0.1, deadline - time.monotonic())))
            except mp.TimeoutError:
                print(f"compile budget spent: {len(done)} of {len(items)} compiled", flush=True)
                pool.terminate()
                break
    return done


def median_us(fn: Callable[[], object], args: argparse.Namespace) -> float:
    """Microseconds per launch: a CUDA graph of ``--calls`` launches, median of replays (on
    the CPU, one plain call: plumbing only)."""
    if args.device != "cuda":
        fn()
        start = time.perf_counter()
        fn()
        return 1e6 * (time.perf_counter() - start)
    return 1e3 * replay_ms(lambda: [fn() for _ in range(args.calls)], args.iters) / args.calls


def tune_shape(h: int, i: int, items: list, compiled: set[int], args: argparse.Namespace,
               timings: list[dict]) -> dict:
    """Best tile per (dtype, T, kernel) of one shape: {(dt, t): {kernel: (us, tile, cublas)}};
    every timing is appended to ``timings``."""
    best: dict = {}
    problems: dict = {}
    for n, (dt, t, kernel, tile) in enumerate(items):
        if n not in compiled:
            continue
        if (dt, t) not in problems:
            problems.clear()
            torch.cuda.empty_cache() if args.device == "cuda" else None
            problems[(dt, t)] = Problem(h, i, DTYPES[dt], t, args.device)
        problem = problems[(dt, t)]
        entry = best.setdefault((dt, t), {})
        if kernel not in entry:
            entry[kernel] = (float("inf"), None, median_us(problem.cublas(kernel), args))
        try:
            us = median_us(problem.launcher(kernel, tile), args)
        except Exception as e:  # a capture that fails is no candidate
            print(f"  skip {dt} T={t} {kernel} {tile}: {type(e).__name__}", flush=True)
            continue
        timings.append({"h": h, "i": i, "dtype": dt, "t": t, "kernel": kernel, "us": us,
                        "cublas_us": entry[kernel][2], **dataclasses.asdict(tile)})
        if us < entry[kernel][0]:
            entry[kernel] = (us, tile, entry[kernel][2])
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default="4096x11008", help="comma list of HxI (per TP rank)")
    p.add_argument("--dtypes", default="bf16", help=f"comma list of {list(DTYPES)}")
    p.add_argument("--batches", default="1,2,4,8,16,32,64,128,256")
    p.add_argument("--calls", type=int, default=10, help="launches per CUDA graph")
    p.add_argument("--iters", type=int, default=10, help="timed replays (median)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    p.add_argument("--compile-budget", type=float, default=150.0, help="seconds")
    p.add_argument("--write", action="store_true", help="write the plugin's tuned-plan files")
    p.add_argument("--dump", type=Path, help="write every timing to this JSON file")
    p.add_argument("--config-dir", type=Path, help="where --write puts the files (default: "
                   "$VLLM_TUNED_CONFIG_FOLDER, which the server reads first, else the plugin's "
                   "vllm_ffnskip/kernels/configs)")
    args = p.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.device != "cuda":
        os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: plumbing only
    from vllm_ffnskip.kernels import plans as plans_mod

    args.config_dir = args.config_dir or plans_mod.config_dirs()[0]

    items = work_items(args)
    name = plans_mod.device_name_of(torch.device("cuda")) if args.device == "cuda" else "cpu"
    print(f"{name}: {len(items)} candidates per shape, {args.workers} compile workers", flush=True)
    start = time.monotonic()
    # Compiled code depends on the shapes' divisibility, not their values: compile once.
    compiled = (precompile(items, shapes[0], args) if args.device == "cuda"
                else set(range(len(items))))
    print(f"compiled {len(compiled)} of {len(items)} in {time.monotonic() - start:.0f}s",
          flush=True)
    print("| shape | dtype | T | gate_up µs (cuBLAS) | down µs (cuBLAS) | FFN / cuBLAS "
          "| gate_up tile | down tile |")
    print("|---|---|---:|---|---|---:|---|---|")
    timings: list[dict] = []
    for h, i in shapes:
        best = tune_shape(h, i, items, compiled, args, timings)
        if args.dump:
            args.dump.write_text(json.dumps(timings) + "\n")
        plans: dict[str, dict[int, object]] = {}
        for (dt, t), entry in sorted(best.items()):
            if any(entry.get(kn, (0, None))[1] is None for kn in ("gate_up", "down")):
                continue
            (us_u, tile_u, cb_u), (us_d, tile_d, cb_d) = entry["gate_up"], entry["down"]
            plan = plans_mod.SkipMLPPlan(t > plans_mod.SMALL_T_MAX, tile_u, tile_d)
            plans.setdefault(dt, {})[t] = plans_mod.TunedPlan(
                plan, round(us_u + us_d, 2), round(cb_u + cb_d, 2))
            print(f"| {h}x{i} | {dt} | {t} | {us_u:.1f} ({cb_u:.1f}) | {us_d:.1f} ({cb_d:.1f}) "
                  f"| {(us_u + us_d) / (cb_u + cb_d):.3f} | {short(tile_u)} | {short(tile_d)} |",
                  flush=True)
        if not args.write:
            continue
        meta = {"device": name, "torch": torch.__version__, "date": str(datetime.date.today()),
                "command": " ".join(sys.argv), "calls": args.calls, "iters": args.iters}
        for dt, by_t in plans.items():
            path = args.config_dir / plans_mod.config_file_name(h, i, DTYPES[dt], name)
            plans_mod.write_tuned_plans(path, by_t, meta)
            print(f"wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
