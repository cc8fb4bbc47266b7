"""``vllm-ffnskip profile``: per-layer FFN saturation cos(h, h + f) through vLLM.

The prompts are served with ``engine.SCORE_ALL``: every decode token runs every FFN and
records its score at every layer, so the profile is the dense model's own distribution —
what ``calibrate`` needs to place per-layer thresholds (``--sensitivity`` adds how much
the output changes when each layer alone is skipped). Every decode token is tested at
every layer in the same row order, so the k-th score of each layer belongs to the same
token; the profile keeps that token x layer matrix for calibration to replay the rule.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from vllm_ffnskip.tools import datasets, engine


def score_matrix(per_layer: dict[int, list[float]], num_layers: int) -> np.ndarray:
    """``[tokens, layers]`` from the recorder's per-layer lists (equal lengths required:
    a token that skipped a layer would shift every later entry of that layer)."""
    lengths = {len(per_layer.get(l, [])) for l in range(num_layers)}
    if len(lengths) != 1 or 0 in lengths:
        raise RuntimeError(
            f"per-layer score counts differ or are empty: {sorted(lengths)}"
        )
    return np.stack(
        [np.asarray(per_layer[l], dtype=np.float32) for l in range(num_layers)], 1
    )


def summarize(scores: np.ndarray) -> dict[str, list[float]]:
    """Mean and p10/p50/p90 per layer."""
    p10, p50, p90 = np.percentile(scores, [10, 50, 90], axis=0)
    return {
        "mean": scores.mean(0).round(5).tolist(),
        "p10": p10.round(5).tolist(),
        "p50": p50.round(5).tolist(),
        "p90": p90.round(5).tolist(),
    }


def run_profile(llm: Any, prompts: list[str], max_tokens: int) -> dict[str, Any]:
    """Serve ``prompts`` scoring every layer; the engine must record scores."""
    num_layers = llm.llm_engine.model_config.hf_config.num_hidden_layers
    llm.collective_rpc("ffnskip_saturation")  # drop anything recorded before
    outputs = llm.generate(prompts, engine.greedy(engine.SCORE_ALL, max_tokens))
    scores = score_matrix(llm.collective_rpc("ffnskip_saturation")[0], num_layers)
    generated = [len(o.outputs[0].token_ids) for o in outputs]
    return {
        "num_layers": num_layers,
        "num_prompts": len(prompts),
        "max_tokens": max_tokens,
        # decode forwards per request = generated tokens - 1 (the first comes from prefill)
        "mean_decode_tokens": float(np.mean([max(g - 1, 0) for g in generated])),
        "num_tokens": int(scores.shape[0]),
        "layers": summarize(scores),
        "scores": scores.round(5).tolist(),
    }


def layer_sensitivity(
    llm: Any, prompts: list[str], max_tokens: int, warmup: int
) -> list[float]:
    """How much greedy output changes when one layer's FFN is always skipped.

    For layer j the request makes j-1 and j the only hot layers with a threshold no score
    misses, so every decode token past warm-up skips exactly FFN j. The value is the mean
    share of each output that follows its first token differing from dense (0: identical,
    1: differs from the first token). Layer 0 cannot be skipped alone (nothing triggers it).
    All layers are probed in one batch of requests on one engine.
    """
    from vllm_ffnskip.tools.evaluate import first_divergence

    num_layers = llm.llm_engine.model_config.hf_config.num_hidden_layers
    dense = llm.generate(prompts, engine.greedy(engine.DENSE, max_tokens))
    probes = list(range(1, num_layers))
    params = [
        engine.greedy(
            {
                "ffnskip": 1,
                "ffnskip_threshold": 1e-6,
                "ffnskip_warmup": warmup,
                "ffnskip_cold_start": j - 1,
                "ffnskip_cold_end": num_layers - 1 - j,
            },
            max_tokens,
        )
        for j in probes
        for _ in prompts
    ]
    outputs = llm.generate(prompts * len(probes), params)
    sensitivity = [0.0] * num_layers
    for k, j in enumerate(probes):
        shares = []
        for d, o in zip(dense, outputs[k * len(prompts) : (k + 1) * len(prompts)]):
            a, b = list(d.outputs[0].token_ids), list(o.outputs[0].token_ids)
            first = first_divergence(a, b)
            shares.append(0.0 if first is None else 1.0 - first / max(len(a), len(b)))
        sensitivity[j] = float(np.mean(shares))
    return sensitivity


def plot_profile(profile: dict[str, Any], path: str | Path, title: str) -> None:
    """Cosine similarity vs layer (mean with the p10-p90 band), like the paper's figure;
    the right panel zooms on the inner layers, where the thresholds live."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = profile["layers"]
    layers = np.arange(profile["num_layers"])
    inner = slice(1, profile["num_layers"] - 1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, part in zip(axes, (slice(None), inner)):
        ax.fill_between(
            layers[part],
            stats["p10"][part],
            stats["p90"][part],
            alpha=0.25,
            label="p10-p90",
        )
        ax.plot(layers[part], stats["mean"][part], marker="o", ms=3, label="mean")
        ax.plot(layers[part], stats["p50"][part], ls="--", lw=1, label="median")
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cos(h, h + FFN(h))")
    axes[0].set_title(title)
    axes[1].set_title("inner layers")
    axes[1].legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: Any) -> None:
    model = engine.resolve_model(args.model)
    llm = engine.make_llm(model, record_scores=True)
    try:
        tokenizer = llm.get_tokenizer()
        rows = datasets.factoid(args.split)[: args.limit]
        prompts = datasets.qa_prompts(tokenizer, rows)
        if args.with_summaries:
            prompts += datasets.summary_prompts(tokenizer, datasets.summarization())
        profile = run_profile(llm, prompts, args.max_tokens)
        if args.sensitivity:
            profile["sensitivity"] = layer_sensitivity(
                llm, prompts, args.max_tokens, args.warmup
            )
            profile["sensitivity_warmup"] = args.warmup
    finally:
        engine.close_llm(llm)
    profile["model"] = Path(model).name
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(profile))
    plot = Path(args.plot) if args.plot else out.with_suffix(".png")
    plot_profile(
        profile,
        plot,
        f"FFN saturation, {profile['model']} ({profile['num_tokens']} tokens)",
    )
    for l, (m, p10, p90) in enumerate(
        zip(
            profile["layers"]["mean"],
            profile["layers"]["p10"],
            profile["layers"]["p90"],
        )
    ):
        print(f"layer {l:2d}  mean {m:.4f}  p10 {p10:.4f}  p90 {p90:.4f}")
    print(f"wrote {out} and {plot}")
