#!/usr/bin/env python
"""Decode passes of skip-aware layers on one GPU, skip vs dense, each in a CUDA graph: the
speed-up and the share of the ideal gain of the plugin's GPU path, without vLLM.

A pass is ``--layers`` LLaMa FFN sublayers at LLaMa-2-7B shapes, ``h = h + mlp(rms_norm(h))``
(no attention: this measures the FFN path the plugin changes). Three passes per batch size:

* ``dense``: the torch MLP (cuBLAS) in every layer, as vanilla vLLM runs it;
* ``no FFN``: the same pass without the MLP (norm and add only), for the FFN's share ``phi``;
* ``skip``: the plugin's driver, as FFNSkipLlamaForCausalLM runs it: ``SkipState.begin_pass``,
  ``step`` in every layer (the rule, and the ``kernel`` form: the Triton op), ``end_pass``.

Each is captured in one CUDA graph (``--compile``: after ``torch.compile``, as vLLM does) and
replayed ``--iters`` times, timed with CUDA events; the time is the median. ``rho`` is the
share of (token, layer) FFN blocks the skip pass skipped, read from the slots' counters.
The ideal time is ``dense - rho * (dense - no FFN)``, i.e. speed-up ``1 / (1 - rho * phi)``;
the share of the ideal gain is ``(speed-up - 1) / (ideal - 1)``.

Policies (every request the same, cold_start 2, cold_end 2): ``never`` (threshold 2: nothing
skips, the rule's cost), ``span1`` / ``span3`` (threshold 0: every hot layer saturates, so 1 or 3
FFNs are skipped after each computed one), and ``half`` (span3 for every other request, the
rest dense: at T > 1 a tile's weights are read for the rows that run).

    python benchmarks/gpu_pass_bench.py [--compile] [--tokens 1,8,32]
    python benchmarks/gpu_pass_bench.py --device cpu --layers 4 --hidden 256 --intermediate 512
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cuda_graph_timing import replay_ms  # noqa: E402
from gpu_driver_check import MLP, add_shape_args, run_pass  # noqa: E402  (vLLM stand-ins)

from vllm_ffnskip.skip_state import RequestSkipState, SkipState  # noqa: E402

POLICIES = {  # name: (threshold, span, share of requests that skip)
    "never": (2.0, 1, 1.0),
    "span1": (0.0, 1, 1.0),
    "span3": (0.0, 3, 1.0),
    "half": (0.0, 3, 0.5),
}


def dense_pass(mlps: list[MLP], x: torch.Tensor) -> torch.Tensor:
    h = x
    for mlp in mlps:
        h = h + mlp(torch.nn.functional.rms_norm(h, (h.shape[-1],)))
    return h


def no_ffn_pass(mlps: list[MLP], x: torch.Tensor) -> torch.Tensor:
    h = x
    for _ in mlps:
        h = h + torch.nn.functional.rms_norm(h, (h.shape[-1],))
    return h


def median_ms(fn: Callable[[], object], device: str, iters: int) -> float:
    """Median milliseconds of one call: replays of a CUDA graph holding ``fn`` on CUDA,
    plain calls elsewhere."""
    if device == "cuda":
        return replay_ms(fn, iters)
    fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def route_policy(state: SkipState, t: int, policy: str) -> None:
    """Admits ``t`` decode requests (one token each, past their warm-up) under ``policy`` and
    routes them; one state per batch size, so a compiled pass is not recompiled per policy."""
    threshold, span, share = POLICIES[policy]
    layers = state.num_layers
    for slot in list(state.requests):
        state.release(slot)
    wire = {"thresholds": [threshold] * layers, "warmup": 0, "cold_start": 2, "cold_end": 2,
            "span": span}
    slots = np.arange(t)
    if share < 1:
        slots[1::2] = state.no_slot  # every other request dense
    for slot in slots[slots != state.no_slot].tolist():
        state.admit(slot, RequestSkipState.from_wire(f"r{slot}", 4, wire))
    state.route(np.arange(t + 1), slots, t)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(p, layers=16)
    p.add_argument("--tokens", default="1,8,32")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--compile", action="store_true", help="torch.compile each pass first")
    args = p.parse_args()
    device, dtype = args.device, getattr(torch, args.dtype)
    form = "kernel" if device == "cuda" else "mask"
    gen = torch.Generator().manual_seed(0)
    mlps = [MLP(args.hidden, args.intermediate, dtype, device, gen) for _ in range(args.layers)]
    wrap = torch.compile if args.compile else (lambda f: f)
    dense_fn, no_ffn_fn, skip_fn = wrap(dense_pass), wrap(no_ffn_pass), wrap(run_pass)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, {args.dtype}, {args.layers} layers "
          f"H={args.hidden} I={args.intermediate}, form {form}, "
          f"{'torch.compile + ' if args.compile else ''}CUDA graph, median of {args.iters}")
    print("| T | policy | dense ms | skip ms | no-FFN ms | rho | phi | speed-up | ideal "
          "| share of ideal gain |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t in [int(v) for v in args.tokens.split(",")]:
        x = torch.randn(t, args.hidden, generator=gen).to(device, dtype)
        positions = torch.full((t,), 8, dtype=torch.int64, device=device)
        dense = median_ms(lambda: dense_fn(mlps, x), device, args.iters)
        no_ffn = median_ms(lambda: no_ffn_fn(mlps, x), device, args.iters)
        phi = (dense - no_ffn) / dense
        with torch.device(device):
            state = SkipState(t, t, args.layers, range(args.layers))
        for policy in args.policies.split(","):
            route_policy(state, t, policy)
            skip = median_ms(lambda: skip_fn(state, mlps, form, x, positions), device, args.iters)
            skipped, evaluated = torch.stack(
                (state.slot_skipped.sum(), state.slot_evaluated.sum())).tolist()
            # The counters hold the skipping requests' blocks of every call; rho is over all rows.
            rho = skipped / evaluated * len(state.requests) / t
            speedup, ideal = dense / skip, 1 / (1 - rho * phi)
            share = (speedup - 1) / (ideal - 1) if rho else float("nan")
            print(f"| {t} | {policy} | {dense:.3f} | {skip:.3f} | {no_ffn:.3f} | {rho:.3f} "
                  f"| {phi:.3f} | {speedup:.3f} | {ideal:.3f} | {share:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
