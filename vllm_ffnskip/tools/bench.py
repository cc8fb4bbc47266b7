"""``vllm-ffnskip bench --mode engine``: decode throughput and latency, skip vs dense, in one
offline engine (the default mode, ``served``, measures through ``vllm serve`` with vLLM's own
client: served_bench.py; this one explains where a served figure's time goes).

Skip and dense requests run on the same compiled ffnskip engine, alternating which goes
first in each repetition, so machine noise hits both alike. Decode time is the wall time
of ``output_tokens`` tokens minus that of the first token alone (prefill + first sample),
so ``tpot = (T_N - T_1) / (N - 1)`` and decode tokens/s = ``B (N - 1) / (T_N - T_1)``.
Every request has a fixed output length (``ignore_eos``). Next to the measured speed-up
stands the ideal ``1 / (1 - ρ φ)`` for the measured ρ, with φ the FFN share of per-token
weights (DESIGN §3). The dense-path overhead compares the plugin with skipping off against
vanilla ``--model-impl vllm``, one engine at a time, alternating, several repetitions.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vllm_ffnskip.policy import policy_path
from vllm_ffnskip.stats import collect_request_stats
from vllm_ffnskip.tools import datasets, engine

TOPICS = [
    "the history of the bicycle", "how volcanoes form", "the life of honey bees",
    "the invention of printing", "why the sky is blue", "the water cycle",
    "the history of chess", "how airplanes fly", "the Roman Empire", "coral reefs",
    "the moon landing", "how computers store data", "the Amazon rainforest",
    "the history of tea", "electric cars", "the Olympic Games",
]  # fmt: skip


def ffn_share(hf_config: Any) -> float:
    """φ: FFN weights / all weights read per decode token (attention, FFN, LM head)."""
    h, i, layers = (
        hf_config.hidden_size,
        hf_config.intermediate_size,
        hf_config.num_hidden_layers,
    )
    head_dim = (
        getattr(hf_config, "head_dim", None) or h // hf_config.num_attention_heads
    )
    h_kv = hf_config.num_key_value_heads * head_dim
    ffn = 3 * h * i
    attn = 2 * h * h + 2 * h * h_kv
    return layers * ffn / (layers * (ffn + attn) + h * hf_config.vocab_size)


#: Below this ideal gain a share is no measure: it divides the noise by a number near 0. A
#: served run whose passes all ran the dense graph but one tail pass (ρ 2e-5) read −706.
MIN_IDEAL_GAIN = 0.005


def share_of_ideal_gain(speedup: float, ideal: float) -> float:
    """(speed-up − 1) / (ideal − 1): 1 when skipping gains all that its ρ allows, 0 when it
    gains nothing, negative when it is slower than dense (NaN when (next to) nothing was
    skipped: ideal − 1 < ``MIN_IDEAL_GAIN``). The ratio speed-up / ideal would score a run
    that skips nothing at 1 / ideal."""
    return (speedup - 1) / (ideal - 1) if ideal - 1 >= MIN_IDEAL_GAIN else float("nan")


def share_cell(share: float) -> str:
    """A table cell for a share: ``–`` where there is none to give."""
    return f"{share:.2f}" if math.isfinite(share) else "–"


def prompts_for(tokenizer: Any, batch: int) -> list[str]:
    """Requests for a long answer, so greedy text stays natural for the whole output."""
    return [
        datasets.chat_prompt(
            tokenizer, f"Write a detailed essay about {TOPICS[k % len(TOPICS)]}."
        )
        for k in range(batch)
    ]


def timed(
    llm: Any, prompts: list[str], xargs: dict[str, Any], tokens: int
) -> tuple[float, dict]:
    """Wall seconds of one batch and its skip counts."""
    start = time.perf_counter()
    outputs = llm.generate(
        prompts, engine.greedy(xargs, tokens, ignore_eos=True), use_tqdm=False
    )
    seconds = time.perf_counter() - start
    stats = collect_request_stats(llm)["requests"] if "ffnskip" in xargs else {}
    counts = [stats.get(o.request_id, {"skipped": 0, "evaluated": 0}) for o in outputs]
    return seconds, {
        "skipped": sum(c["skipped"] for c in counts),
        "evaluated": sum(c["evaluated"] for c in counts),
    }


def decode_rate(t_n: float, t_1: float, batch: int, tokens: int) -> dict[str, float]:
    decode = max(t_n - t_1, 1e-9)
    return {
        "tok_s": batch * (tokens - 1) / decode,
        "tpot_ms": 1000 * decode / (tokens - 1),
    }


def skip_vs_dense(llm: Any, args: Any, phi: float) -> list[dict[str, Any]]:
    """Per batch size: median decode speed of skip and dense requests, ρ, ideal speed-up."""
    tokenizer = llm.get_tokenizer()
    policies = {"skip": {"ffnskip": 1}, "dense": dict(engine.DENSE)}
    rows = []
    steps = [(b, r) for b in args.batch_sizes for r in range(args.repeats)]
    samples: dict[tuple[int, str], list[dict]] = {}
    for batch, rep in tqdm(steps, desc="skip vs dense", unit="run"):
        prompts = prompts_for(tokenizer, batch)
        order = ["skip", "dense"] if rep % 2 == 0 else ["dense", "skip"]
        for name in order:
            t_1, _ = timed(llm, prompts, policies[name], 1)
            t_n, counts = timed(llm, prompts, policies[name], args.output_tokens)
            samples.setdefault((batch, name), []).append(
                {**decode_rate(t_n, t_1, batch, args.output_tokens), **counts}
            )
    for batch in args.batch_sizes:
        skip, dense = samples[(batch, "skip")], samples[(batch, "dense")]
        rho = sum(s["skipped"] for s in skip) / max(
            sum(s["evaluated"] for s in skip), 1
        )
        skip_rate = statistics.median(s["tok_s"] for s in skip)
        dense_rate = statistics.median(s["tok_s"] for s in dense)
        # Pairs taken back to back share the machine's state: their ratio's median is
        # steadier than a ratio of medians on a noisy host.
        speedup = statistics.median(s["tok_s"] / d["tok_s"] for s, d in zip(skip, dense))
        ideal = 1 / (1 - rho * phi)
        rows.append({
            "batch": batch,
            "dense_tok_s": dense_rate,
            "skip_tok_s": skip_rate,
            "dense_tpot_ms": statistics.median(s["tpot_ms"] for s in dense),
            "skip_tpot_ms": statistics.median(s["tpot_ms"] for s in skip),
            "rho": rho,
            "speedup": speedup,
            "share": share_of_ideal_gain(speedup, ideal),
            "ideal": ideal,
            "samples": {"skip": skip, "dense": dense},
        })  # fmt: skip
    return rows


def overhead(model: str, args: Any) -> dict[str, Any]:
    """Dense decode at batch 1: plugin with skipping off vs vanilla vLLM (separate engines).

    Engines are started in pairs, one of each, alternating which goes first. The overhead is
    the median over pairs of 1 - plugin/vanilla (each engine's median rate): on this project's
    2-core machines an engine runs its whole life at one of two speeds (~61 or ~79 tok/s,
    whichever implementation), so a ratio of pooled medians depends on how many engines of
    each kind drew the fast speed.
    """
    rates: dict[str, list[list[float]]] = {"ffnskip-off": [], "vanilla": []}
    runs = [
        (rep, impl)
        for rep in range(args.overhead_repeats)
        for impl in (("ffnskip", "vllm") if rep % 2 == 0 else ("vllm", "ffnskip"))
    ]
    for rep, impl in tqdm(runs, desc="dense-path overhead", unit="engine"):
        llm = engine.make_llm(model, impl=impl, eager=args.eager, max_num_seqs=32)
        samples = rates["ffnskip-off" if impl == "ffnskip" else "vanilla"]
        samples.append([])
        try:
            prompts = prompts_for(llm.get_tokenizer(), 1)
            xargs = dict(engine.DENSE) if impl == "ffnskip" else {}
            timed(llm, prompts, xargs, 8)  # warm caches after start
            for _ in range(args.repeats):
                t_1, _ = timed(llm, prompts, xargs, 1)
                t_n, _ = timed(llm, prompts, xargs, args.output_tokens)
                samples[-1].append(decode_rate(t_n, t_1, 1, args.output_tokens)["tok_s"])
        finally:
            engine.close_llm(llm)
    return {**pair_overhead(rates["ffnskip-off"], rates["vanilla"]), "samples": rates}


def pair_overhead(plugin: list[list[float]], vanilla: list[list[float]]) -> dict[str, Any]:
    """Overhead of the plugin from engine pairs: each engine's median rate, then the median
    over pairs of 1 - plugin/vanilla (see ``overhead`` for why not a ratio of pooled medians)."""
    per_engine = {
        "ffnskip-off": [statistics.median(s) for s in plugin],
        "vanilla": [statistics.median(s) for s in vanilla],
    }
    pairs = zip(per_engine["ffnskip-off"], per_engine["vanilla"], strict=True)
    return {
        "plugin_off_tok_s": statistics.median(per_engine["ffnskip-off"]),
        "vanilla_tok_s": statistics.median(per_engine["vanilla"]),
        "overhead": statistics.median(1 - p / v for p, v in pairs),
        "per_engine_tok_s": per_engine,
    }


def main(args: Any) -> None:
    if args.mode == "served":
        from vllm_ffnskip.tools import served_bench

        served_bench.main(args)
        return
    if args.in_process:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # read by every engine made below
    model = engine.resolve_model(args.model)
    server: dict[str, Any] = {"enabled": False, **args.server}
    if args.policy:
        server["policy_file"] = str(policy_path(args.policy).resolve())
    llm = engine.make_llm(
        model, server=server, eager=args.eager, max_num_seqs=max(args.batch_sizes)
    )
    try:
        phi = ffn_share(llm.llm_engine.model_config.hf_config)
        timed(llm, prompts_for(llm.get_tokenizer(), 2), {"ffnskip": 1}, 8)  # warm-up
        rows = skip_vs_dense(llm, args, phi)
    finally:
        engine.close_llm(llm)
    report: dict[str, Any] = {
        "model": Path(model).name,
        "policy": args.policy or "shipped default",
        "server": args.server,
        "output_tokens": args.output_tokens,
        "mode": "eager" if args.eager else "compiled",
        "in_process": args.in_process,
        "phi": phi,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(report, indent=1)
    )  # kept if the slow overhead part is cut short
    if args.overhead_repeats:
        report["overhead"] = overhead(model, args)
        out.write_text(json.dumps(report, indent=1))
    print(f"phi (FFN share of per-token weights) = {phi:.3f}")
    print(
        "| batch | dense tok/s | skip tok/s | dense TPOT ms | skip TPOT ms | ρ | speed-up | ideal 1/(1-ρφ) | share of ideal gain |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['batch']} | {r['dense_tok_s']:.1f} | {r['skip_tok_s']:.1f} | "
            f"{r['dense_tpot_ms']:.1f} | {r['skip_tpot_ms']:.1f} | {r['rho']:.3f} | "
            f"{r['speedup']:.3f} | {r['ideal']:.3f} | {share_cell(r['share'])} |"
        )
    if "overhead" in report:
        o = report["overhead"]
        print(
            f"dense-path overhead (batch 1): plugin off {o['plugin_off_tok_s']:.1f} tok/s, "
            f"vanilla {o['vanilla_tok_s']:.1f} tok/s (medians of engines), overhead "
            f"{100 * o['overhead']:.1f}% (median over engine pairs)"
        )
        for kind, medians in o["per_engine_tok_s"].items():
            print(f"  {kind} engines: " + ", ".join(f"{m:.1f}" for m in medians) + " tok/s")
    print(f"wrote {out}")
