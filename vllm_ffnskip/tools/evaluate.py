"""``vllm-ffnskip eval``: quality of skip policies against dense decoding of the same engine.

Metrics per policy: factoid accuracy (normalised alias match, see ``datasets``), ROUGE-L of
summaries against the references and against the dense summaries (``rouge-score``), and
agreement with dense (share of token-identical outputs, mean position of the first
differing token among the outputs that differ), next to the measured skip ratio ρ.

Every policy, per-layer policy files included, is sent per request (``extra_args``, the
``vllm_xargs`` of an API client), so dense and all policies share one engine, fp32 eager for
deterministic output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vllm_ffnskip.policy import SkipPolicy, load_policy_file, policy_path
from vllm_ffnskip.stats import collect_request_stats
from vllm_ffnskip.tools import datasets, engine


@dataclass
class PolicySpec:
    """One evaluated policy: the request's ``extra_args``."""

    name: str
    xargs: dict[str, Any]
    method: str = "global"
    meta: dict[str, Any] = field(default_factory=dict)


def policy_xargs(policy: SkipPolicy) -> dict[str, Any]:
    """A whole policy as one request's ``extra_args``."""
    xargs: dict[str, Any] = {
        "ffnskip": 1,
        "ffnskip_warmup": policy.warmup,
        "ffnskip_cold_start": policy.cold_start,
        "ffnskip_cold_end": policy.cold_end,
        "ffnskip_span": policy.span,
    }
    if policy.layer_thresholds is None:
        xargs["ffnskip_threshold"] = policy.threshold
    else:
        xargs["ffnskip_layer_thresholds"] = list(policy.layer_thresholds)
    return xargs


def sweep_spec(
    threshold: float, warmup: int, cold_start: int, cold_end: int, span: int
) -> PolicySpec:
    """A global-threshold policy."""
    policy = SkipPolicy(
        threshold=threshold, warmup=warmup, cold_start=cold_start, cold_end=cold_end, span=span
    )
    return PolicySpec(f"global t={threshold:g}", policy_xargs(policy), method="sweep")


def file_spec(path: str) -> PolicySpec:
    """A policy file (path or shipped name)."""
    policy = load_policy_file(path)  # validates, and fills what the file leaves out
    meta = json.loads(policy_path(path).read_text()).get("calibration", {})
    method = meta.get("method", "global" if policy.layer_thresholds is None else "per-layer")
    return PolicySpec(Path(path).stem, policy_xargs(policy), method, meta)


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (None when identical)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def run_tasks(
    llm: Any, spec: PolicySpec, qa: list[dict], summ: list[dict], args: Any
) -> dict:
    """Outputs and skip counts of one policy on both tasks."""
    tokenizer = llm.get_tokenizer()
    result: dict[str, Any] = {}
    for task, prompts, tokens in (
        ("qa", datasets.qa_prompts(tokenizer, qa), args.qa_tokens),
        ("summ", datasets.summary_prompts(tokenizer, summ), args.summary_tokens),
    ):
        outputs = llm.generate(prompts, engine.greedy(spec.xargs, tokens))
        stats = collect_request_stats(llm)["requests"]
        counted = [
            stats.get(o.request_id, {"skipped": 0, "evaluated": 0}) for o in outputs
        ]
        result[task] = {
            "texts": [o.outputs[0].text for o in outputs],
            "ids": [list(o.outputs[0].token_ids) for o in outputs],
            "skipped": sum(c["skipped"] for c in counted),
            "evaluated": sum(c["evaluated"] for c in counted),
        }
    return result


def standard_error(values: np.ndarray) -> float:
    """The standard error of ``values``' mean (0 for fewer than two values)."""
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0


def score(
    run: dict, dense: dict, qa: list[dict], summ: list[dict], max_tokens: int
) -> dict[str, float]:
    """The metrics of one policy's outputs (``dense``: the dense policy's outputs;
    ``max_tokens``: the factoid replies' token limit)."""
    from rouge_score import rouge_scorer

    rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    ids = run["qa"]["ids"] + run["summ"]["ids"]
    dense_ids = dense["qa"]["ids"] + dense["summ"]["ids"]
    divergence = [first_divergence(a, b) for a, b in zip(ids, dense_ids)]
    diverged = [d for d in divergence if d is not None]
    skipped = run["qa"]["skipped"] + run["summ"]["skipped"]
    evaluated = run["qa"]["evaluated"] + run["summ"]["evaluated"]
    qa_lens = [len(i) for i in run["qa"]["ids"]]
    dense_lens = [len(i) for i in dense["qa"]["ids"]]
    # label-free: the reply keeps dense's whole reply (normalised, as a word span)
    agrees = np.array(
        [datasets.answer_correct(t, [d]) for t, d in zip(run["qa"]["texts"], dense["qa"]["texts"])],
        dtype=float,
    )
    correct, dense_correct = (
        np.array([datasets.answer_correct(t, r["answers"]) for t, r in zip(texts, qa)], dtype=float)
        for texts in (run["qa"]["texts"], dense["qa"]["texts"])
    )
    return {
        "dense_agreement": float(agrees.mean()),
        "dense_agreement_se": standard_error(agrees),
        # of the paired per-question difference: the questions both got right or both got
        # wrong add no noise, so this is far below an unpaired accuracy's error
        "qa_loss_se": standard_error(dense_correct - correct),
        "qa_reply_tokens": float(np.mean(qa_lens)),
        "qa_reply_tokens_dense": float(np.mean(dense_lens)),
        "qa_at_max_tokens": float(np.mean([n >= max_tokens for n in qa_lens])),
        "qa_accuracy": float(correct.mean()),
        "rougeL_ref": float(
            np.mean(
                [
                    rouge.score(r["reference"], t)["rougeL"].fmeasure
                    for t, r in zip(run["summ"]["texts"], summ)
                ]
            )
        ),
        "rougeL_dense": float(
            np.mean(
                [
                    rouge.score(d, t)["rougeL"].fmeasure
                    for t, d in zip(run["summ"]["texts"], dense["summ"]["texts"])
                ]
            )
        ),
        "identical": 1.0 - len(diverged) / len(ids),
        "first_divergence": float(np.mean(diverged)) if diverged else float("nan"),
        "rho_qa": run["qa"]["skipped"] / run["qa"]["evaluated"]
        if run["qa"]["evaluated"]
        else 0.0,
        "rho": skipped / evaluated if evaluated else 0.0,
    }


def evaluate(
    model: str, specs: list[PolicySpec], qa: list[dict], summ: list[dict], args: Any
) -> dict:
    """Runs dense, then every policy, on one engine; returns runs by name."""
    from tqdm import tqdm

    llm = engine.make_llm(model)
    try:
        runs = {"dense": run_tasks(llm, PolicySpec("dense", engine.DENSE), qa, summ, args)}
        for spec in tqdm(specs, desc="policies", unit="policy"):
            runs[spec.name] = run_tasks(llm, spec, qa, summ, args)
    finally:
        engine.close_llm(llm)
    return runs


def plot_curve(
    rows: list[dict], dense_acc: float, path: str | Path, split: str
) -> None:
    """Factoid accuracy and summary ROUGE-L (vs dense) against measured ρ, one line per
    method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (qa, summ) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method in sorted({r["method"] for r in rows}):
        label = "global sweep" if method == "sweep" else method
        pts = sorted(
            (r for r in rows if r["method"] == method), key=lambda r: r["rho_qa"]
        )
        qa.plot(
            [r["rho_qa"] for r in pts],
            [100 * r["qa_accuracy"] for r in pts],
            marker="o",
            label=label,
        )
        pts = sorted(pts, key=lambda r: r["rho"])
        summ.plot(
            [r["rho"] for r in pts],
            [r["rougeL_dense"] for r in pts],
            marker="o",
            label=label,
        )
    qa.axhline(100 * dense_acc, color="gray", ls="--", label="dense")
    qa.axhline(100 * dense_acc - 3, color="gray", ls=":", label="dense - 3 points")
    qa.set_xlabel(f"measured ρ on factoid {split} (FFN blocks of decode tokens)")
    qa.set_ylabel("factoid accuracy (%)")
    summ.set_xlabel("measured ρ over factoid + summaries")
    summ.set_ylabel("summary ROUGE-L vs dense output")
    for ax in (qa, summ):
        ax.grid(alpha=0.3)
    qa.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(rows: list[dict]) -> str:
    head = (
        "| policy | method | ρ (QA) | ρ (all) | QA acc | agrees w/ dense | reply tokens "
        "(dense) | at max_tokens | ROUGE-L ref | ROUGE-L dense | identical | 1st div |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['method']} | {r['rho_qa']:.3f} | {r['rho']:.3f} | "
            f"{100 * r['qa_accuracy']:.1f} | {100 * r['dense_agreement']:.1f} | "
            f"{r['qa_reply_tokens']:.1f} ({r['qa_reply_tokens_dense']:.1f}) | "
            f"{100 * r['qa_at_max_tokens']:.0f}% | {r['rougeL_ref']:.3f} | "
            f"{r['rougeL_dense']:.3f} | {100 * r['identical']:.0f}% | {r['first_divergence']:.1f} |"
        )
    return "\n".join(lines)


def score_runs(
    runs: dict, specs: list[PolicySpec], qa: list[dict], summ: list[dict], qa_tokens: int
) -> list[dict]:
    """One row of metrics per run, dense first."""
    dense = runs["dense"]
    rows = [{"name": "dense", "method": "dense", **score(dense, dense, qa, summ, qa_tokens)}]
    rows += [
        {"name": s.name, "method": s.method, **s.meta,
         **score(runs[s.name], dense, qa, summ, qa_tokens)}
        for s in specs
    ]  # fmt: skip
    return rows


def main(args: Any) -> None:
    model = engine.resolve_model(args.model)
    qa = datasets.factoid(args.split)[: args.limit]
    summ = datasets.summarization()[: args.limit]
    specs = [
        sweep_spec(t, args.warmup, args.cold_start, args.cold_end, args.span)
        for t in args.sweep
    ]
    specs += [file_spec(p) for p in args.policy]
    runs = evaluate(model, specs, qa, summ, args)
    rows = score_runs(runs, specs, qa, summ, args.qa_tokens)
    report: dict[str, Any] = {
        "model": Path(model).name,
        "split": args.split,
        "rows": rows,
    }
    if args.lm_eval:
        from vllm_ffnskip.tools import lmeval

        report["lm_eval"] = lmeval.run(
            model, args.lm_eval_policy, args.split, args.limit, args.qa_tokens
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                **report,
                "outputs": {k: {t: v[t]["texts"] for t in v} for k, v in runs.items()},
            },
            indent=1,
        )
    )
    plot = Path(args.plot) if args.plot else out.with_suffix(".png")
    plot_curve(rows[1:], rows[0]["qa_accuracy"], plot, args.split)
    print(format_table(rows))
    if args.lm_eval:
        print(json.dumps(report["lm_eval"], indent=1))
    print(f"wrote {out} and {plot}")
