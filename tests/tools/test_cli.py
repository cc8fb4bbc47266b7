"""Every ``vllm-ffnskip`` subcommand run in-process on tiny inputs (real engines, CPU).

The chain is the real one: ``profile`` writes the profile that ``calibrate`` turns into
policy files, which ``eval`` (and ``bench``) then serve. Sizes are minimal (a few prompts,
a few tokens, eager mode) so the module stays within a few minutes on two cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vllm_ffnskip import cli
from vllm_ffnskip.tools import calibrate
from vllm_ffnskip.tools.bench import MIN_IDEAL_GAIN

NUM_LAYERS = 30  # the embedded SmolLM2-135M-Instruct


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tools")


@pytest.fixture(scope="module")
def profile(work: Path, embedded_model: str) -> dict:
    out = work / "profile.json"
    cli.main(
        [
            "profile",
            "--limit",
            "5",
            "--max-tokens",
            "8",
            "--sensitivity",
            "--out",
            str(out),
        ]
    )
    assert out.with_suffix(".png").stat().st_size > 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def policies(work: Path, profile: dict) -> dict[str, Path]:
    paths = {}
    for method in calibrate.METHODS:
        paths[method] = work / f"{method}.json"
        cli.main(["calibrate", "--profile", str(work / "profile.json"), "--target", "0.15",
                  "--method", method, "--out", str(paths[method])])  # fmt: skip
    return paths


def test_model_prints_path_last(capsys):
    cli.main(["model"])
    path = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert (path / "config.json").exists()


def test_profile_shape(profile):
    assert profile["num_layers"] == NUM_LAYERS
    scores = np.asarray(profile["scores"])
    assert scores.shape == (profile["num_tokens"], NUM_LAYERS) and scores.shape[0] > 0
    for key in ("mean", "p10", "p50", "p90"):
        assert len(profile["layers"][key]) == NUM_LAYERS
    assert ((scores > -1.0001) & (scores < 1.0001)).all()
    # FFN 0 rewrites the embedding; the middle of the network is saturated.
    assert profile["layers"]["mean"][0] < 0.5 < profile["layers"]["mean"][15]
    sensitivity = profile["sensitivity"]
    assert len(sensitivity) == NUM_LAYERS and sensitivity[0] == 0.0
    assert all(0.0 <= s <= 1.0 for s in sensitivity) and max(sensitivity) > 0


@pytest.mark.parametrize("method", calibrate.METHODS)
def test_calibrate_meets_target_on_its_profile(profile, policies, method):
    policy = json.loads(policies[method].read_text())
    thresholds = calibrate.policy_thresholds(policy, NUM_LAYERS)
    rho = calibrate.simulate(
        np.asarray(profile["scores"]),
        thresholds,
        policy["cold_start"],
        policy["cold_end"],
        policy["span"],
    )
    assert 0.15 <= rho <= 0.20
    assert ("layer_thresholds" in policy) == (method != "global")


def test_calibrate_to_a_loss_budget(work, profile):
    """``calibrate --max-loss``: candidates from the profile, each measured against dense on
    the calib questions; the file is the candidate with the highest measured ρ within the
    budget, and the held-out split's measurement of it is recorded beside calib's."""
    out, report_path = work / "budget.json", work / "budget_report.json"
    cli.main(["calibrate", "--max-loss", "30", "--margin", "0", "--profile", str(work / "profile.json"),
              "--targets", "0.05,0.3", "--limit", "4", "--qa-tokens", "8",
              "--summary-tokens", "8", "--out", str(out), "--report", str(report_path)])  # fmt: skip
    report = json.loads(report_path.read_text())
    dense, *candidates = report["calib"]
    assert len(candidates) == 4 and dense["rho"] == 0.0
    assert any(c["rho"] > 0 for c in candidates)  # the per-request layer thresholds skipped
    within = [c for c in candidates if c["loss_points"] <= 30]
    policy = json.loads(out.read_text())
    chosen = policy["calibration"]
    assert chosen["calib"]["rho"] == pytest.approx(max(c["rho"] for c in within), abs=1e-4)
    assert chosen["calib"]["loss_points"] <= 30
    assert chosen["heldout"]["questions"] == 4 and report["test"][1]["rho"] > 0
    assert calibrate.policy_thresholds(policy, NUM_LAYERS).shape == (NUM_LAYERS,)


def test_eval_and_lm_eval(work, policies):
    """A sweep point and a per-layer policy file, both sent per request on one engine and
    scored against dense; lm-eval runs the same questions through a served endpoint whose
    default policy skips so much that skip answers must differ from dense ones (proof that
    the request body's vllm_xargs reached the server for each task)."""
    aggressive = work / "aggressive.json"
    aggressive.write_text(json.dumps({"threshold": 0.5, "warmup": 0}))
    out = work / "eval.json"
    cli.main(["eval", "--sweep", "0.97", "--policy", str(policies["quantile"]), "--limit", "4",
              "--qa-tokens", "12", "--summary-tokens", "12", "--out", str(out),
              "--lm-eval", "--lm-eval-policy", str(aggressive)])  # fmt: skip
    report = json.loads(out.read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert set(rows) == {"dense", "global t=0.97", "quantile"}
    assert rows["dense"]["identical"] == 1.0 and rows["dense"]["rho"] == 0.0
    assert rows["quantile"]["rho"] > 0  # the per-layer thresholds sent per request skipped
    for row in rows.values():
        for key in ("qa_accuracy", "rougeL_ref", "rougeL_dense", "identical", "rho_qa"):
            assert 0.0 <= row[key] <= 1.0
    assert out.with_suffix(".png").stat().st_size > 0
    lm = report["lm_eval"]
    assert set(lm["accuracy"]) == {"ffnskip_factoid_dense", "ffnskip_factoid_skip"}
    assert all(0.0 <= a <= 1.0 for a in lm["accuracy"].values())
    assert lm["identical_responses"] < 1.0


def expected_share(row: dict) -> float:
    """The share of the ideal gain by its definition, none below ``MIN_IDEAL_GAIN``."""
    gain = row["ideal"] - 1
    return (row["speedup"] - 1) / gain if gain >= MIN_IDEAL_GAIN else float("nan")


def test_bench(work, policies):
    out = work / "bench.json"
    cli.main(["bench", "--mode", "engine", "--policy", str(policies["quantile"]),
              "--batch-sizes", "1,2", "--output-tokens", "8", "--repeats", "1",
              "--overhead-repeats", "0", "--eager", "--out", str(out)])  # fmt: skip
    report = json.loads(out.read_text())
    assert 0.5 < report["phi"] < 0.7
    assert [r["batch"] for r in report["rows"]] == [1, 2]
    for row in report["rows"]:
        assert row["dense_tok_s"] > 0 and row["skip_tok_s"] > 0
        assert row["ideal"] == pytest.approx(1 / (1 - row["rho"] * report["phi"]))
        assert row["share"] == pytest.approx(expected_share(row), nan_ok=True)
    assert "overhead" not in report  # --overhead-repeats 0: no extra engines


def test_served_bench(work, policies):
    """``vllm bench serve`` against one ffnskip server: the skip runs' ρ comes from the
    server's counters, which dense runs leave alone (else the run raises), and every round
    of both is recorded."""
    out = work / "served.json"
    cli.main(["bench", "--policy", str(policies["quantile"]), "--concurrency", "2",
              "--rounds", "1", "--input-len", "8", "--output-len", "8", "--prompts-per-stream",
              "1", "--min-prompts", "2", "--eager", "--out", str(out)])  # fmt: skip
    report = json.loads(out.read_text())
    assert report["mode"] == "served" and [r["concurrency"] for r in report["rows"]] == [2]
    for row in report["rows"]:
        skip, dense = row["samples"]["skip"], row["samples"]["dense"]
        assert len(skip) == len(dense) == 1
        # 2 requests x 7 decode tokens x 30 layers, each block counted once
        assert skip[0]["evaluated"] == 2 * 7 * NUM_LAYERS and skip[0]["skipped"] > 0
        assert dense[0]["evaluated"] == dense[0]["skipped"] == 0
        assert row["rho"] == pytest.approx(skip[0]["skipped"] / skip[0]["evaluated"])
        assert row["share"] == pytest.approx(expected_share(row), nan_ok=True)
