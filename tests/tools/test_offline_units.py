"""Engine-free checks of the tools: datasets, answer scoring, the skip-rule replay, calibration."""

from __future__ import annotations

import numpy as np
import pytest

from vllm_ffnskip.tools import calibrate, datasets
from vllm_ffnskip.tools.bench import ffn_share, pair_overhead, share_cell, share_of_ideal_gain


def test_factoid_splits_are_large_disjoint_and_answerable():
    splits = {name: datasets.factoid(name) for name in ("calib", "test")}
    assert sum(len(rows) for rows in splits.values()) >= 300
    questions = [r["question"].lower() for rows in splits.values() for r in rows]
    ids = [r["id"] for rows in splits.values() for r in rows]
    assert len(set(questions)) == len(questions) and len(set(ids)) == len(ids)
    for row in (r for rows in splits.values() for r in rows):
        assert row["answers"] and all(datasets.normalize(a) for a in row["answers"]), row


def test_summarization_set():
    rows = datasets.summarization()
    assert len(rows) >= 20
    assert all(len(r["reference"]) < len(r["passage"]) for r in rows)


@pytest.mark.parametrize(
    ("output", "aliases", "correct"),
    [
        ("The capital of France is Paris.", ["Paris"], True),
        ("It is the Pacific Ocean.", ["Pacific", "Pacific Ocean"], True),
        ("Parisian food", ["Paris"], False),  # whole words only
        ("Twenty-four hours.", ["24", "twenty-four"], True),
        ("I don't know.", ["Paris"], False),
    ],
)
def test_answer_correct(output, aliases, correct):
    assert datasets.answer_correct(output, aliases) is correct


def test_simulate_follows_the_greedy_rule():
    """One token, 6 layers, cold 1/1. Span 1: a trigger at layer 1 skips 2, layer 3 tests
    again and triggers, layer 4 is skipped. Span 3: layer 1 skips 2-4. Layer 5 is cold."""
    scores = np.array([[0.1, 0.99, 0.5, 0.99, 0.99, 0.99]])
    thresholds = np.full(6, 0.98)
    assert calibrate.simulate(scores, thresholds, 1, 1, 1) == pytest.approx(2 / 6)
    assert calibrate.simulate(scores, thresholds, 1, 1, 3) == pytest.approx(3 / 6)
    assert calibrate.simulate(scores, np.full(6, 1.0), 1, 1, 1) == 0.0


def test_replay_marks_the_blocks_the_rule_skips():
    """The same token: span 1 skips layers 2 and 4, span 3 layers 2-4; cold layers never."""
    scores = np.array([[0.1, 0.99, 0.5, 0.99, 0.99, 0.99]])
    thresholds = np.full(6, 0.98)
    span_1 = calibrate.replay(scores, thresholds, 1, 1, 1)
    span_3 = calibrate.replay(scores, thresholds, 1, 1, 3)
    assert span_1.tolist() == [[False, False, True, False, True, False]]
    assert span_3.tolist() == [[False, False, True, True, True, False]]


def synthetic_profile(seed: int = 0) -> dict:
    """Layer 0 and the last layer unsaturated; hot layers with differing score levels."""
    rng = np.random.default_rng(seed)
    layers, tokens = 12, 400
    level = np.r_[0.1, np.linspace(0.94, 0.99, layers - 2), 0.7]
    scores = np.clip(level + rng.normal(0, 0.01, (tokens, layers)), 0, 1)
    return {
        "num_layers": layers,
        "scores": scores.tolist(),
        "layers": {"mean": scores.mean(0).tolist()},
        "mean_decode_tokens": 20.0,
        "model": "synthetic",
    }


@pytest.mark.parametrize("method", calibrate.METHODS)
@pytest.mark.parametrize("target", [0.05, 0.15, 0.25])
def test_calibrate_reaches_target(method, target):
    profile = synthetic_profile()
    policy = calibrate.calibrate(profile, target, method=method, min_cold=1)
    assert (policy["cold_start"], policy["cold_end"]) == (1, 1)
    thresholds = calibrate.policy_thresholds(policy, profile["num_layers"])
    rho = calibrate.simulate(
        np.asarray(profile["scores"]), thresholds, 1, 1, policy["span"]
    )
    assert target <= rho <= target + 0.02  # ρ moves in steps: whole token groups switch
    assert policy["calibration"]["predicted_rho"] == pytest.approx(rho, abs=1e-4)


def test_quantile_spreads_skips_over_layers():
    """Per-layer quantiles make every hot layer trigger; one global threshold leaves the
    low-score layers untouched."""
    profile = synthetic_profile()
    scores = np.asarray(profile["scores"])
    for method, expect_all in (("quantile", True), ("global", False)):
        t = calibrate.policy_thresholds(
            calibrate.calibrate(profile, 0.15, method=method, min_cold=1), 12
        )
        fires = (scores[:, 1:11] >= t[1:11]).mean(0)
        assert (fires > 0.05).all() == expect_all, method


def test_damage_spares_layers_that_do_work():
    """A layer whose successor's FFN turns the stream a lot never triggers, however
    saturated the layer itself is; the budget goes to triggers into redundant layers."""
    profile = synthetic_profile()
    scores = np.asarray(profile["scores"])
    scores[:, 6] = 0.999  # layer 6 itself looks redundant ...
    scores[:, 7] = 0.90  # ... but skipping layer 7 would lose a large FFN update
    profile["scores"] = scores.tolist()
    t = calibrate.policy_thresholds(
        calibrate.calibrate(profile, 0.15, method="damage", min_cold=1), 12
    )
    assert t[6] == 1.0 and (scores[:, 6] < t[6]).all()
    assert calibrate.simulate(scores, t, 1, 1, 1) >= 0.15


def test_ffn_share_of_smollm2():
    """SmolLM2-135M: 30 layers, H 576, I 1536, 3 KV heads of 64, vocab 49152 -> φ ≈ 0.59."""
    from types import SimpleNamespace

    config = SimpleNamespace(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, head_dim=64,
    )  # fmt: skip
    assert ffn_share(config) == pytest.approx(0.594, abs=0.005)


def test_pair_overhead_is_immune_to_which_engines_drew_the_fast_speed():
    """Engines run at ~61 or ~79 tok/s for their whole life. Two fast vanilla engines and one
    fast plugin engine make the pooled medians say 22% overhead; each pair says ~0%."""
    plugin = [[61.0, 61.2, 60.8], [61.1, 61.0, 61.2], [79.0, 79.2, 79.1]]
    vanilla = [[61.0, 61.1, 60.9], [79.1, 79.0, 79.3], [79.2, 79.1, 79.0]]
    report = pair_overhead(plugin, vanilla)
    assert report["per_engine_tok_s"]["ffnskip-off"] == [61.0, 61.1, 79.1]
    assert 1 - report["plugin_off_tok_s"] / report["vanilla_tok_s"] == pytest.approx(0.228, abs=1e-3)
    assert report["overhead"] == pytest.approx(0.0, abs=1e-3)
    with pytest.raises(ValueError):
        pair_overhead(plugin, vanilla[:2])


def _row(name: str, rho: float, acc: float, agreement: float, se: float = 0.0) -> dict:
    return {"name": name, "method": "global", "rho": rho, "qa_accuracy": acc,
            "dense_agreement": agreement, "qa_loss_se": se, "dense_agreement_se": se}  # fmt: skip


def test_budget_picks_the_most_skipping_policy_within_the_fitted_loss():
    """Losses 0, 1.5, 10 and −1 points at ρ 0.05, 0.10, 0.20, 0.08: the line through the
    origin loses Σρl/Σρ² = 2.07 / 0.0589 = 35.1 points per unit ρ, so 2 points allow
    ρ ≤ 0.057 (a) and 4 points ρ ≤ 0.114 (b, though c, at 10 points, is not); one noisy
    rung within the budget (e, 0 points at ρ 0.30) does not count on its own."""
    from vllm_ffnskip.tools import budget

    rows = [_row("dense", 0.0, 0.60, 1.0), _row("a", 0.05, 0.60, 0.9), _row("b", 0.10, 0.585, 0.8),
            _row("c", 0.20, 0.50, 0.5), _row("d", 0.08, 0.61, 0.95)]  # fmt: skip
    slope, error = budget.loss_slope(rows[1:], rows[0], "answers")
    assert slope == pytest.approx((0.1 * 1.5 + 0.2 * 10 - 0.08) / (0.05**2 + 0.1**2 + 0.2**2 + 0.08**2))
    assert error == 0.0  # no standard errors given
    assert budget.choose(rows, 2.0, "answers")["name"] == "a"
    assert budget.choose(rows, 4.0, "answers")["name"] == "b"
    assert budget.choose(rows, 1.0, "answers") is None
    assert budget.loss_points(rows[3], rows[0], "answers") == pytest.approx(10.0)
    rows.append(_row("e", 0.30, 0.60, 0.4))
    # e flattens the line to 13.9 per unit ρ: c's fitted 2.8 points are within 4, but its
    # measured 10 are not, and e's fitted 4.2 are not: b
    assert budget.choose(rows, 4.0, "answers")["name"] == "b"
    # agreement losses 10, 20, 50, 5: slope 229 per unit ρ, so 20 points allow ρ ≤ 0.087
    assert budget.choose(rows[:5], 20.0, "agreement")["name"] == "d"
    rows.append({**_row("f", 0.25, 0.60, 0.4), "method": "damage"})
    assert budget.choose(rows, 4.0, "answers")["name"] == "f"  # another method's own line


def test_budget_margin_keeps_the_fitted_loss_plus_its_error_within_the_budget():
    """One candidate: its loss (1.5) within 2 points, not with one standard error (1.0)
    above it; two candidates carry both errors through the fit."""
    from vllm_ffnskip.tools import budget

    dense = _row("dense", 0.0, 0.60, 1.0)
    b = _row("b", 0.10, 0.585, 0.98, se=0.01)
    assert budget.choose([dense, b], 2.0, "answers")["name"] == "b"
    assert budget.choose([dense, b], 2.0, "answers", margin=1.0) is None
    assert budget.loss_error(b, "answers") == pytest.approx(1.0)
    a = _row("a", 0.05, 0.595, 0.99, se=0.004)
    slope, error = budget.loss_slope([a, b], dense, "answers")
    assert slope == pytest.approx((0.05 * 0.5 + 0.1 * 1.5) / 0.0125)  # 14 per unit ρ
    assert error == pytest.approx(np.sqrt(0.05**2 * 0.4**2 + 0.1**2 * 1.0**2) / 0.0125)
    assert budget.choose([dense, a, b], 2.0, "answers", margin=1.0)["name"] == "a"


def test_standard_error_of_the_paired_loss():
    from vllm_ffnskip.tools.evaluate import standard_error

    d = np.array([1.0, 0, 0, 0, -1.0, 1.0, 0, 0])  # 3 discordant questions of 8
    assert standard_error(d) == pytest.approx(np.std(d, ddof=1) / np.sqrt(8))
    assert standard_error(np.array([1.0])) == 0.0


def test_share_of_ideal_gain_only_where_there_is_a_gain_to_share():
    """1.1x of an ideal 1.2x is half the gain; a run that (next to) nothing skipped has no
    share (its table cell says so) rather than a huge one."""
    assert share_of_ideal_gain(1.1, 1.2) == pytest.approx(0.5)
    assert share_of_ideal_gain(0.9, 1.2) == pytest.approx(-0.5)
    assert share_cell(share_of_ideal_gain(0.99, 1 + 1.2e-5)) == "–"
    assert share_cell(share_of_ideal_gain(1.05, 1.0)) == "–"
    assert share_cell(0.634) == "0.63"


def test_bench_server_keys_reach_the_ffnskip_server_only(tmp_path):
    """``vllm-ffnskip bench --server`` adds its keys to the benchmarked ffnskip server's
    ``additional_config`` beside the policy; the vanilla baseline gets none."""
    import json

    from vllm_ffnskip import cli
    from vllm_ffnskip.tools.served_bench import serve_args

    policy = tmp_path / "p.json"
    policy.write_text("{}")
    args = cli.build_parser().parse_args(
        ["bench", "--policy", str(policy), "--server", '{"wide_skip_rows": 16}'])
    options = serve_args("ffnskip", args, 8)
    config = json.loads(options[options.index("--additional-config") + 1])["ffnskip"]
    assert config == {"wide_skip_rows": 16, "enabled": True, "policy_file": str(policy.resolve())}
    assert "--additional-config" not in serve_args("vllm", args, 8)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["bench", "--server", "{wide"])
