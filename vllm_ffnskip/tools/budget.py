"""``vllm-ffnskip calibrate --max-loss POINTS``: the most skipping a quality budget allows.

One command, any LLaMa checkpoint:

1. profile: saturation scores on the calib prompts, and the per-layer sensitivity probe
   when the ``damage`` method is a candidate (``profile.py``);
2. candidates: per-layer thresholds of each method at a ladder of replayed skip ratios
   (``calibrate.calibrate``);
3. every candidate and dense on the calib split, on one engine (each policy is sent per
   request, as an API client would);
4. the candidate with the highest measured ρ at which its method's loss, fitted over all
   its candidates, stays within the budget with a margin of ``--margin`` standard errors
   (``choose``);
5. the held-out test split confirms it: dense and the chosen policy, printed beside calib.

The loss, in points:

- ``answers``: factoid accuracy lost against dense (the shipped questions are general
  knowledge, so any instruct model can be scored on them);
- ``agreement`` (label-free): the share of factoid replies that no longer contain the dense
  reply (``evaluate.score``'s ``dense_agreement``). It needs no reference answers; the report
  says how well it tracked the answer loss over the candidates.
"""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path
from typing import Any

import numpy as np

from vllm_ffnskip.policy import policy_from_dict
from vllm_ffnskip.tools import calibrate, datasets, engine, evaluate, profile

BUDGETS = ("answers", "agreement")


def loss_points(row: dict[str, Any], dense: dict[str, Any], budget: str) -> float:
    """A row's quality loss against dense, in points of ``budget``."""
    if budget == "answers":
        return 100.0 * (dense["qa_accuracy"] - row["qa_accuracy"])
    if budget == "agreement":
        return 100.0 * (1.0 - row["dense_agreement"])
    raise ValueError(f"unknown budget {budget!r} (known: {BUDGETS})")


def loss_error(row: dict[str, Any], budget: str) -> float:
    """The standard error of ``loss_points`` over the split's questions, in points."""
    return 100.0 * row["qa_loss_se" if budget == "answers" else "dense_agreement_se"]


def loss_slope(rows: list[dict[str, Any]], dense: dict[str, Any], budget: str) -> tuple[float, float]:
    """Points lost per unit of ρ over one method's candidates, and its standard error: the
    least-squares line through the origin (dense loses nothing at ρ 0), with the candidates'
    own standard errors carried through."""
    rho = np.array([r["rho"] for r in rows])
    loss = np.array([loss_points(r, dense, budget) for r in rows])
    error = np.array([loss_error(r, budget) for r in rows])
    scale = float((rho * rho).sum())
    if scale == 0.0:
        return 0.0, 0.0
    return float((rho * loss).sum()) / scale, float(np.sqrt((rho**2 * error**2).sum())) / scale


def choose(
    rows: list[dict[str, Any]], max_loss: float, budget: str, margin: float = 0.0
) -> dict[str, Any] | None:
    """The most skipping candidate (measured ρ) whose method's fitted loss at that ρ, plus
    ``margin`` standard errors of the fit, stays within ``max_loss``, as does its own
    measured loss (rows[0]: dense; None when none qualifies).

    One candidate's measured loss is noise-bound: on the embedded model's 212 calib
    questions half of the replies change at ρ 0.02 and each candidate's paired standard
    error is ~2 points, as large as the budget. Choosing on single measurements overfitted:
    "the highest ρ within the budget" picked policies that lost 1.9 points on calib and 4.1
    on the held-out split, and "the last rung before the first one over the budget" one
    that lost 1.9 and 2.4. The loss grows with ρ, so the line through all of a method's
    candidates (``loss_slope``) pools them; its error is ~1 point per 0.05 of ρ.
    """
    best = None
    for method in dict.fromkeys(r["method"] for r in rows[1:]):
        ladder = [r for r in rows[1:] if r["method"] == method]
        slope, error = loss_slope(ladder, rows[0], budget)
        for row in ladder:
            within = max(row["rho"] * (slope + margin * error), loss_points(row, rows[0], budget))
            if within <= max_loss + 1e-9 and (best is None or row["rho"] > best["rho"]):
                best = row
    return best


def candidates(
    prof: dict[str, Any], methods: list[str], targets: list[float], warmup: int, span: int
) -> tuple[list[evaluate.PolicySpec], dict[str, dict[str, Any]]]:
    """One policy per method and replayed target: the specs to evaluate, the files by name."""
    specs, files = [], {}
    for method in methods:
        for target in targets:
            data = calibrate.calibrate(prof, target, method=method, warmup=warmup, span=span)
            name = f"{method} rho*={target:g}"
            policy = policy_from_dict(data, name)
            files[name] = data
            specs.append(
                evaluate.PolicySpec(name, evaluate.policy_xargs(policy), method, {"target": target})
            )
    return specs, files


def run_profile(model: str, qa: list[dict], summ: list[dict], args: Namespace) -> dict[str, Any]:
    llm = engine.make_llm(model, record_scores=True)
    try:
        tokenizer = llm.get_tokenizer()
        prompts = datasets.qa_prompts(tokenizer, qa) + datasets.summary_prompts(tokenizer, summ)
        prof = profile.run_profile(llm, prompts, args.qa_tokens)
        if "damage" in args.methods:  # the only method that weighs by sensitivity
            prof["sensitivity"] = profile.layer_sensitivity(
                llm, prompts, args.qa_tokens, args.warmup
            )
    finally:
        engine.close_llm(llm)
    prof["model"] = Path(model).name
    return prof


def agreement_tracks_answers(rows: list[dict[str, Any]]) -> dict[str, float]:
    """How well the label-free loss followed the answer loss over the candidates (NaN with
    fewer than three candidates or a constant loss)."""
    a = np.array([loss_points(r, rows[0], "agreement") for r in rows[1:]])
    b = np.array([loss_points(r, rows[0], "answers") for r in rows[1:]])
    if len(a) < 3 or not a.std() or not b.std():
        return {"pearson_r": float("nan"), "answer_loss_per_agreement_point": float("nan")}
    return {
        "pearson_r": float(np.corrcoef(a, b)[0, 1]),
        "answer_loss_per_agreement_point": float(np.polyfit(a, b, 1)[0]),
    }


def _summary(row: dict[str, Any], dense: dict[str, Any], questions: int) -> dict[str, Any]:
    """What a policy file records of one split's measurement."""
    return {
        "rho": round(row["rho"], 4),
        "qa_accuracy": round(row["qa_accuracy"], 4),
        "dense_qa_accuracy": round(dense["qa_accuracy"], 4),
        "loss_points": round(row["loss_points"], 2),
        "loss_error": round(row["loss_error"], 2),
        "qa_reply_tokens": round(row["qa_reply_tokens"], 2),
        "qa_reply_tokens_dense": round(row["qa_reply_tokens_dense"], 2),
        "qa_at_max_tokens": round(row["qa_at_max_tokens"], 4),
        "questions": questions,
    }


def main(args: Any) -> None:
    model = engine.resolve_model(args.model)
    summ = datasets.summarization()[: args.limit]
    calib_qa = datasets.factoid("calib")[: args.limit]
    test_qa = datasets.factoid("test")[: args.limit]
    if args.profile:
        prof = json.loads(Path(args.profile).read_text())
    else:
        print("1/4 profiling the calib prompts (saturation scores; sensitivity for damage)")
        prof = run_profile(model, calib_qa, summ, args)
        saved = Path(args.out).with_suffix(".profile.json")
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(prof))
        print(f"wrote {saved} (reuse it with --profile)")
    specs, files = candidates(prof, args.methods, args.targets, args.warmup, args.span)
    print(f"2/4 {len(specs)} candidate policies on the calib split")
    runs = evaluate.evaluate(model, specs, calib_qa, summ, args)
    calib_rows = evaluate.score_runs(runs, specs, calib_qa, summ, args.qa_tokens)
    for row in calib_rows:
        row["loss_points"] = loss_points(row, calib_rows[0], args.budget)
        row["loss_error"] = loss_error(row, args.budget)
    print(evaluate.format_table(calib_rows))
    print("loss ± standard error, points of " + args.budget + ": " + ", ".join(
        f"{r['name']} {r['loss_points']:.1f} ± {r['loss_error']:.1f}" for r in calib_rows[1:]))
    for method in args.methods:
        slope, error = loss_slope(
            [r for r in calib_rows[1:] if r["method"] == method], calib_rows[0], args.budget
        )
        print(f"{method}: fitted loss {slope / 100:.2f} ± {error / 100:.2f} points per "
              f"0.01 of ρ; with --margin {args.margin}: {args.max_loss} points at ρ "
              f"{args.max_loss / max(slope + args.margin * error, 1e-9):.3f}")
    tracking = agreement_tracks_answers(calib_rows)
    print(f"label-free loss vs answer loss over the candidates: Pearson r {tracking['pearson_r']:.2f}")
    chosen = choose(calib_rows, args.max_loss, args.budget, args.margin)
    report: dict[str, Any] = {"budget": args.budget, "max_loss": args.max_loss,
                              "margin": args.margin,
                              "calib": calib_rows, "agreement_tracks_answers": tracking}  # fmt: skip
    if chosen is None:
        if args.report:
            Path(args.report).write_text(json.dumps(report, indent=1))
        raise SystemExit(
            f"no candidate lost at most {args.max_loss} points ({args.budget}, plus "
            f"{args.margin} standard errors) on the calib split; try lower --targets, a larger "
            "--max-loss or a smaller --margin"
        )
    print(f"3/4 chosen: {chosen['name']} (ρ {chosen['rho']:.3f}, loss {chosen['loss_points']:.1f} "
          f"points of {args.budget}); 4/4 confirming on the held-out test split")  # fmt: skip
    spec = next(s for s in specs if s.name == chosen["name"])
    test_runs = evaluate.evaluate(model, [spec], test_qa, summ, args)
    test_rows = evaluate.score_runs(test_runs, [spec], test_qa, summ, args.qa_tokens)
    for row in test_rows:
        row["loss_points"] = loss_points(row, test_rows[0], args.budget)
        row["loss_error"] = loss_error(row, args.budget)
    report["test"] = test_rows
    print("held-out test split:")
    print(evaluate.format_table(test_rows))
    policy = files[chosen["name"]]

    policy["calibration"].update(
        budget=args.budget,
        max_loss=args.max_loss,
        margin=args.margin,
        calib=_summary(chosen, calib_rows[0], len(calib_qa)),
        heldout=_summary(test_rows[1], test_rows[0], len(test_qa)),
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(policy, indent=1) + "\n")
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=1))
    print(f"calib: loss {chosen['loss_points']:.1f} points at ρ {chosen['rho']:.3f}; held-out: "
          f"loss {test_rows[1]['loss_points']:.1f} ± {test_rows[1]['loss_error']:.1f} points "
          f"at ρ {test_rows[1]['rho']:.3f}")  # fmt: skip
    if test_rows[1]["loss_points"] > args.max_loss:
        print(f"warning: the held-out split lost more than {args.max_loss} points; a larger "
              "--margin or calib split gives a safer choice")
    print(f"wrote {out}")
