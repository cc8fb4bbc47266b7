"""``vllm-ffnskip bench`` (the default, served mode): decode speed as a server's users see it.

One ``vllm serve --model-impl ffnskip`` process; vLLM's own client, ``vllm bench serve``
(random dataset, ``--ignore-eos``), at each concurrency, skip requests
(``--extra-body '{"vllm_xargs": {"ffnskip": 1}}'``) and dense ones (``{"ffnskip": 0}``) in
alternating order, several rounds. A round's speed-up is skip over dense output tokens/s (and
dense over skip mean TPOT); the table gives the median over rounds. ρ is the skip runs' share
of skipped FFN blocks, read from the server's own counters on ``/metrics``
(``vllm_ffnskip_ffn_blocks_{skipped,evaluated}``) before and after each run; dense runs must
move neither (checked: it shows the ``vllm_xargs`` reached the model).

Dense traffic vs vanilla vLLM (``--overhead-pairs``): servers started in pairs, ffnskip
(dense requests) and ``--model-impl vllm``, alternating which starts first; the overhead is
the median over pairs of 1 − plugin/vanilla (``bench.pair_overhead``: an engine on these
machines runs its whole life at one of two speeds).
"""

from __future__ import annotations

import contextlib
import io
import json
import statistics
from pathlib import Path
from typing import Any

from tqdm import tqdm
from transformers import AutoConfig

from vllm_ffnskip.policy import policy_path
from vllm_ffnskip.tools import engine
from vllm_ffnskip.tools.bench import ffn_share, pair_overhead, share_cell, share_of_ideal_gain
from vllm_ffnskip.tools.serving import metric_samples, vllm_server

SERVED_NAME = "ffnskip-bench"
COUNTERS = "vllm_ffnskip_ffn_blocks_"


def serve_args(impl: str, args: Any, max_num_seqs: int) -> list[str]:
    """``vllm serve`` options of the benchmarked server (``max_num_seqs``: its top concurrency,
    so no run queues behind the scheduler's limit)."""
    options = ["--model-impl", impl, "--dtype", args.dtype, "--served-model-name", SERVED_NAME,
               "--max-num-seqs", str(max_num_seqs), "--max-model-len", "1024",
               "--seed", "0"]  # fmt: skip
    if args.eager:
        options.append("--enforce-eager")
    config = dict(args.server)
    if args.policy:
        config.update(enabled=True, policy_file=str(policy_path(args.policy).resolve()))
    if impl == "ffnskip" and config:
        options += ["--additional-config", json.dumps({"ffnskip": config})]
    return options


def bench_serve(
    url: str,
    model: str,
    concurrency: int,
    xargs: dict[str, Any] | None,
    args: Any,
    prompts: int | None = None,
) -> dict[str, float]:
    """One run of ``vllm bench serve`` (its own ``main``, called in this process: a
    subprocess would spend ~15 s importing vLLM per run): output tokens/s, mean TPOT, ITL
    and TTFT (ms)."""
    from vllm.benchmarks import serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    prompts = prompts or max(args.prompts_per_stream * concurrency, args.min_prompts)
    parser = FlexibleArgumentParser()
    serve.add_cli_args(parser)
    options = ["--backend", "vllm", "--base-url", url, "--model", SERVED_NAME,
               "--tokenizer", model, "--dataset-name", "random",
               "--random-input-len", str(args.input_len),
               "--random-output-len", str(args.output_len), "--num-prompts", str(prompts),
               "--max-concurrency", str(concurrency), "--ignore-eos", "--seed", "0",
               "--percentile-metrics", "ttft,tpot,itl", "--disable-tqdm"]  # fmt: skip
    if xargs is not None:
        options += ["--extra-body", json.dumps({"vllm_xargs": xargs})]
    with contextlib.redirect_stdout(io.StringIO()):  # its own table, per run
        result = serve.main(parser.parse_args(options))
    if result["completed"] != prompts:
        raise RuntimeError(f"{prompts - result['completed']} of {prompts} requests failed")
    return {
        "tok_s": result["output_throughput"],
        "tpot_ms": result["mean_tpot_ms"],
        "itl_ms": result["mean_itl_ms"],
        "ttft_ms": result["mean_ttft_ms"],
    }


def counted(url: str) -> tuple[float, float]:
    """The server's (skipped, evaluated) FFN-block counters."""
    values = metric_samples(url, COUNTERS)
    return values.get(f"{COUNTERS}skipped_total", 0.0), values.get(f"{COUNTERS}evaluated_total", 0.0)


def measured_run(
    url: str, model: str, concurrency: int, xargs: dict[str, Any], args: Any
) -> dict[str, float]:
    """A run and the FFN blocks it skipped and evaluated (server counters, before/after)."""
    before = counted(url)
    run = bench_serve(url, model, concurrency, xargs, args)
    after = counted(url)
    return {**run, "skipped": after[0] - before[0], "evaluated": after[1] - before[1]}


def skip_vs_dense(url: str, model: str, args: Any, phi: float) -> list[dict[str, Any]]:
    """Per concurrency: skip and dense in alternating order, ``args.rounds`` times."""
    policies = {"skip": {"ffnskip": 1}, "dense": dict(engine.DENSE)}
    top = max(args.concurrency)
    for name in policies:  # every graph and batch shape compiled before anything is timed
        bench_serve(url, model, top, policies[name], args, prompts=top)
    steps = [(c, r) for c in args.concurrency for r in range(args.rounds)]
    samples: dict[tuple[int, str], list[dict[str, float]]] = {}
    for concurrency, rnd in tqdm(steps, desc="served skip vs dense", unit="round"):
        for name in (["skip", "dense"] if rnd % 2 == 0 else ["dense", "skip"]):
            run = measured_run(url, model, concurrency, policies[name], args)
            samples.setdefault((concurrency, name), []).append(run)
    rows = []
    for concurrency in args.concurrency:
        skip, dense = samples[(concurrency, "skip")], samples[(concurrency, "dense")]
        if any(d["evaluated"] or d["skipped"] for d in dense):
            raise RuntimeError("dense requests moved the skip counters: vllm_xargs was lost")
        rho = sum(s["skipped"] for s in skip) / max(sum(s["evaluated"] for s in skip), 1)
        ideal = 1 / (1 - rho * phi)
        speedup = statistics.median(s["tok_s"] / d["tok_s"] for s, d in zip(skip, dense))
        tpot_speedup = statistics.median(d["tpot_ms"] / s["tpot_ms"] for s, d in zip(skip, dense))
        rows.append({
            "concurrency": concurrency,
            "dense_tok_s": statistics.median(d["tok_s"] for d in dense),
            "skip_tok_s": statistics.median(s["tok_s"] for s in skip),
            "dense_tpot_ms": statistics.median(d["tpot_ms"] for d in dense),
            "skip_tpot_ms": statistics.median(s["tpot_ms"] for s in skip),
            "rho": rho,
            "speedup": speedup,
            "tpot_speedup": tpot_speedup,
            "ideal": ideal,
            "share": share_of_ideal_gain(speedup, ideal),
            "tpot_share": share_of_ideal_gain(tpot_speedup, ideal),
            "samples": {"skip": skip, "dense": dense},
        })  # fmt: skip
    return rows


def overhead(model: str, args: Any) -> dict[str, Any]:
    """Dense traffic on an ffnskip server vs vanilla vLLM, servers in pairs (output tok/s at
    each of ``args.overhead_concurrency``, median of ``args.rounds`` runs per server)."""
    starts = [(pair, impl) for pair in range(args.overhead_pairs)
              for impl in (("ffnskip", "vllm") if pair % 2 == 0 else ("vllm", "ffnskip"))]  # fmt: skip
    by_concurrency: dict[int, dict[str, list[list[float]]]] = {
        c: {"ffnskip-off": [], "vanilla": []} for c in args.overhead_concurrency
    }
    for _, impl in tqdm(starts, desc="dense vs vanilla servers", unit="server"):
        kind = "ffnskip-off" if impl == "ffnskip" else "vanilla"
        xargs = dict(engine.DENSE) if impl == "ffnskip" else None
        top = max(args.overhead_concurrency)
        with vllm_server(model, *serve_args(impl, args, top)) as url:
            bench_serve(url, model, top, xargs, args, prompts=top)  # warm-up
            for c in args.overhead_concurrency:
                runs = [bench_serve(url, model, c, xargs, args)["tok_s"] for _ in range(args.rounds)]
                by_concurrency[c][kind].append(runs)
    return {
        "pairs": args.overhead_pairs,
        "by_concurrency": {
            str(c): {**pair_overhead(r["ffnskip-off"], r["vanilla"]), "samples": r}
            for c, r in by_concurrency.items()
        },
    }


def main(args: Any) -> None:
    model = engine.resolve_model(args.model)
    phi = ffn_share(AutoConfig.from_pretrained(model))
    with vllm_server(model, *serve_args("ffnskip", args, max(args.concurrency))) as url:
        rows = skip_vs_dense(url, model, args, phi)
    report: dict[str, Any] = {
        "mode": "served",
        "model": Path(model).name,
        "policy": args.policy or "shipped default",
        "server": args.server,
        "dtype": args.dtype,
        "compiled": not args.eager,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "phi": phi,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))  # kept if the overhead part is cut short
    if args.overhead_pairs:
        report["overhead"] = overhead(model, args)
        out.write_text(json.dumps(report, indent=1))
    print(format_table(report))
    print(f"wrote {out}")


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"{report['model']}, {report['dtype']}, {'compiled' if report['compiled'] else 'eager'}, "
        f"random {report['input_len']} in / {report['output_len']} out, "
        f"phi = {report['phi']:.3f}",
        "| concurrency | dense tok/s | skip tok/s | dense TPOT ms | skip TPOT ms | ρ | ideal "
        "1/(1−ρφ) | speed-up (tok/s) | share of ideal gain | speed-up (TPOT) | share (TPOT) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['concurrency']} | {r['dense_tok_s']:.1f} | {r['skip_tok_s']:.1f} | "
            f"{r['dense_tpot_ms']:.1f} | {r['skip_tpot_ms']:.1f} | {r['rho']:.3f} | "
            f"{r['ideal']:.3f} | {r['speedup']:.3f} | {share_cell(r['share'])} | "
            f"{r['tpot_speedup']:.3f} | {share_cell(r['tpot_share'])} |"
        )
    for c, o in report.get("overhead", {}).get("by_concurrency", {}).items():
        lines.append(
            f"dense traffic vs vanilla at concurrency {c}: ffnskip {o['plugin_off_tok_s']:.1f}, "
            f"vanilla {o['vanilla_tok_s']:.1f} tok/s (medians of servers); overhead "
            f"{100 * o['overhead']:.1f}% (median over {report['overhead']['pairs']} pairs)"
        )
    return "\n".join(lines)
