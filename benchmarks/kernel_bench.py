#!/usr/bin/env python
"""Benchmark the skip-aware LLaMa FFN (Triton) against the dense torch MLP on one CUDA GPU.

Each op is called ``--layers`` times (one call per "layer", each with its own mask) inside one
captured CUDA graph, so launch overhead is what it is in a CUDA-graph decode step. The time reported
is per call: the median over ``--iters`` replays timed with CUDA events, divided by ``--layers``.
The ideal is ``dense x (1 - skipped fraction)``.

Masks: ``iid`` (default) skips exactly ``frac`` of all (row, layer) FFN blocks, chosen at random:
the honest case for batches > 1, since a tile's weights are skipped only when all its rows skip.
``batch`` skips whole layers for the whole batch (correlated skips, the best case).

Needs torch + triton only (no vLLM). Examples::

    python benchmarks/kernel_bench.py --out docs/kernel_bench_h200.md
    python benchmarks/kernel_bench.py --models llama2-7b --dtypes bf16 --batches 1 --fracs 0,0.3

The op's tiles are the tuned plans of this GPU where ``benchmarks/kernel_tune.py`` wrote them,
else the heuristic's.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import itertools
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cuda_graph_timing import replay_ms  # noqa: E402

MODELS = {  # name: (hidden H, intermediate I per rank)
    "llama2-7b": (4096, 11008),
    "llama2-13b": (5120, 13824),
    "llama2-70b-tp8": (8192, 28672 // 8),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
ACCEPT_RATIO = 0.75  # batch 1, 30% of FFN blocks skipped: skip op <= 0.75 x dense
DEVICE = "cuda"


def _load_kernels():
    """Import ``vllm_ffnskip/kernels`` as a standalone package: the parent package is not loaded."""
    pkg_dir = Path(__file__).resolve().parents[1] / "vllm_ffnskip" / "kernels"
    spec = importlib.util.spec_from_file_location(
        "_ffnskip_kernels", pkg_dir / "__init__.py", submodule_search_locations=[str(pkg_dir)])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = pkg
    spec.loader.exec_module(pkg)
    import _ffnskip_kernels.skip_mlp_triton as triton_mod  # registered just above
    return pkg, triton_mod


def per_call_us(op: Callable[[int], object], args: argparse.Namespace) -> float:
    """Microseconds per call of ``op(layer)``, all ``args.layers`` calls captured in one graph."""
    layers = range(args.layers)
    return 1e3 * replay_ms(lambda: [op(layer) for layer in layers], args.iters) / args.layers


def dense_op(km, x, w_gate_up, w_down) -> Callable[[int], object]:
    return lambda layer: km.dense_mlp(x, w_gate_up, w_down)


def skip_op(tm, x, masks, w_gate_up, w_down, plan=None) -> Callable[[int], object]:
    return lambda layer: tm.skip_mlp_triton(x, masks[layer], w_gate_up, w_down, plan=plan)


def make_masks(t: int, layers: int, frac: float, mode: str, gen: torch.Generator,
               device: str = DEVICE) -> torch.Tensor:
    """``[layers, t]`` bool masks (True = run the FFN); exactly ``round(frac * n)`` skip."""
    if mode == "batch":
        skip_layers = torch.randperm(layers, generator=gen)[:round(frac * layers)]
        active = torch.ones(layers, t, dtype=torch.bool)
        active[skip_layers] = False
        return active.to(device)
    flat = torch.ones(layers * t, dtype=torch.bool)
    flat[torch.randperm(layers * t, generator=gen)[:round(frac * layers * t)]] = False
    return flat.view(layers, t).to(device)


def _weights(h: int, i: int, dtype: torch.dtype, gen: torch.Generator):
    w_gate_up = (torch.randn(2 * i, h, generator=gen) / h**0.5).to(device=DEVICE, dtype=dtype)
    w_down = (torch.randn(h, i, generator=gen) / i**0.5).to(device=DEVICE, dtype=dtype)
    return w_gate_up, w_down


def check(km, tm, x, mask, w_gate_up, w_down) -> str:
    """``ok`` when the op matches the fp32 reference and skipped rows are exactly 0."""
    got = tm.skip_mlp_triton(x, mask, w_gate_up, w_down).float()
    want = km.skip_mlp_reference(x.float(), mask, w_gate_up.float(), w_down.float())
    err = ((got - want).abs() / want.abs().clamp_min(1.0)).max().item()
    return "ok" if err <= 3e-2 and bool((got[~mask] == 0).all()) else f"MISMATCH {err:.2g}"


def bench_config(km, tm, h: int, i: int, dtype: torch.dtype, batches: list[int],
                 fracs: list[float], args: argparse.Namespace) -> list[dict]:
    """All (batch, frac) rows for one model shape and dtype."""
    gen = torch.Generator().manual_seed(0)
    w_gate_up, w_down = _weights(h, i, dtype, gen)
    rows = []
    for t in batches:
        x = torch.randn(t, h, generator=gen).to(device=DEVICE, dtype=dtype)
        dense_us = per_call_us(dense_op(km, x, w_gate_up, w_down), args)
        for frac in fracs:
            masks = make_masks(t, args.layers, frac, args.mask_mode, gen, DEVICE)
            skipped = 1.0 - masks.float().mean().item()
            row = dict(t=t, frac=frac, skipped=skipped, dense_us=dense_us,
                       ideal_us=dense_us * (1 - skipped))
            try:
                row["skip_us"] = per_call_us(skip_op(tm, x, masks, w_gate_up, w_down), args)
                row["check"] = check(km, tm, x, masks[0], w_gate_up, w_down)
            except Exception as e:  # a failed capture or launch is a result to report
                row["skip_us"], row["check"] = float("nan"), f"FAILED: {type(e).__name__}: {e}"
            rows.append(row)
            print(f"  T={t:4d} frac={frac:.2f} dense {dense_us:9.1f} us  "
                  f"skip {row['skip_us']:9.1f} us  ideal {row['ideal_us']:9.1f} us  "
                  f"ratio {row['skip_us'] / dense_us:.3f}  {row['check'][:120]}", flush=True)
    return rows


def acceptance(results: dict) -> list[str]:
    """Batch 1 with 30% of FFN blocks skipped must take <= 0.75 x dense, graph captured."""
    lines = []
    for (model, dtype), rows in results.items():
        for r in rows:
            if r["t"] == 1 and abs(r["frac"] - 0.3) < 1e-9:
                ratio = r["skip_us"] / r["dense_us"]
                verdict = "PASS" if ratio <= ACCEPT_RATIO and r["check"] == "ok" else "FAIL"
                lines.append(f"- {verdict} {model} {dtype}: batch 1, 30% skipped: {ratio:.3f} x "
                             f"dense (target <= {ACCEPT_RATIO}), check {r['check']}")
    return lines


def to_markdown(results: dict, header: list[str], accept: list[str]) -> str:
    out = ["# Skip-aware FFN kernel benchmark", "", *header, ""]
    for (model, dtype), rows in results.items():
        out += [f"## {model} {dtype}", "",
                "| T | skipped | dense µs | skip op µs | ideal µs | skip/dense | ideal/dense "
                "| check |",
                "|---:|---:|---:|---:|---:|---:|---:|---|"]
        out += [f"| {r['t']} | {r['skipped']:.2f} | {r['dense_us']:.1f} | {r['skip_us']:.1f} | "
                f"{r['ideal_us']:.1f} | {r['skip_us'] / r['dense_us']:.3f} | "
                f"{r['ideal_us'] / r['dense_us']:.3f} | {r['check']} |" for r in rows]
        out.append("")
    if accept:
        out += ["## Acceptance (batch 1, 30% skipped, <= 0.75 x dense, CUDA graph captured)", "",
                *accept, ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="write the results as markdown to this path")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {list(MODELS)}")
    p.add_argument("--dtypes", default="fp16,bf16", help="comma list of fp16,bf16")
    p.add_argument("--batches", default="1,2,4,8,16,32,64,128,256")
    p.add_argument("--fracs", default="0,0.1,0.3,0.5", help="fractions of FFN blocks skipped")
    p.add_argument("--layers", type=int, default=20, help="op calls (layers) per captured graph")
    p.add_argument("--iters", type=int, default=30, help="timed graph replays (median)")
    p.add_argument("--mask-mode", choices=("iid", "batch"), default="iid")
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        print("kernel_bench.py: no CUDA GPU is available (torch.cuda.is_available() is False). "
              "It times GPU kernels and has nothing to report on CPU; run it on a CUDA machine.",
              file=sys.stderr)
        return 2
    if importlib.util.find_spec("triton") is None:
        print("kernel_bench.py: triton is not installed (pip install 'triton==3.9.0').",
              file=sys.stderr)
        return 2
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if unknown := [m for m in models if m not in MODELS]:
        p.error(f"unknown models {unknown}; choose from {list(MODELS)}")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if unknown := [d for d in dtypes if d not in DTYPES]:
        p.error(f"unknown dtypes {unknown}; choose from {list(DTYPES)}")
    batches = [int(b) for b in args.batches.split(",")]
    fracs = [float(f) for f in args.fracs.split(",")]

    km, tm = _load_kernels()
    import triton

    props = torch.cuda.get_device_properties(0)
    header = [
        f"- device: {props.name} ({props.multi_processor_count} SMs, "
        f"{props.total_memory / 2**30:.0f} GiB)",
        f"- torch {torch.__version__}, CUDA {torch.version.cuda}, triton {triton.__version__}",
        f"- date: {datetime.date.today().isoformat()}",
        f"- {args.layers} op calls per CUDA graph, median of {args.iters} replays, "
        f"masks: {args.mask_mode}",
        "- dense = F.linear + silu*mul + F.linear (cuBLAS); skip op = Triton `skip_mlp_triton`; "
        "ideal = dense x (1 - skipped fraction)",
    ]
    print("\n".join(header), flush=True)

    results: dict = {}
    for model, dt in itertools.product(models, dtypes):
        h, i = MODELS[model]
        print(f"{model} {dt} (H={h}, I={i})", flush=True)
        results[(model, dt)] = bench_config(km, tm, h, i, DTYPES[dt], batches, fracs, args)
        torch.cuda.empty_cache()

    accept = acceptance(results)
    print("\n".join(["acceptance:", *accept]) if accept else "acceptance: batch 1 / 0.3 not run")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(to_markdown(results, header, accept) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
