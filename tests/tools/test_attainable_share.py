"""Engine-free checks of ``benchmarks/attainable_share.py``'s batch model (its timings are a
benchmark's, not a test's)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "attainable_share.py"
_spec = importlib.util.spec_from_file_location("_ffnskip_attainable_share", BENCH)
model = sys.modules.setdefault(_spec.name, importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(model)


def skips(tokens: int, layers: int, rho: float, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((tokens, layers)) < rho


def test_per_row_cost_saves_the_skipped_share_at_every_batch():
    """t(k) ∝ k: a pass saves exactly its skipped blocks, so the ceiling is the ideal."""
    skipped = skips(4000, 30, 0.25)
    cost = np.arange(65, dtype=np.float64)
    for batch in (1, 8, 64):
        saved = model.saved_share(skipped, 0.0, batch, cost, 500, np.random.default_rng(1))
        assert saved == pytest.approx(skipped.mean(), abs=0.01)
        assert model.ceiling(saved, skipped.mean(), 0.6) == pytest.approx(1.0, abs=0.05)


def test_weight_bound_cost_saves_only_layers_every_row_skips():
    """Independent skips with probability p: a layer of B rows is free with probability p^B."""
    skipped = skips(4000, 30, 0.5)
    cost = np.minimum(np.arange(9), 1.0)
    for batch, expected in ((1, 0.5), (2, 0.25), (8, 0.5**8)):
        saved = model.saved_share(skipped, 0.0, batch, cost, 4000, np.random.default_rng(2))
        assert saved == pytest.approx(expected, abs=0.01)


def test_warm_up_rows_run_every_layer():
    """At batch 1 a warm-up share w removes w of the skips; every row in warm-up saves nothing."""
    skipped = np.ones((100, 10), dtype=bool)
    cost = np.arange(5, dtype=np.float64)
    rng = np.random.default_rng(3)
    assert model.saved_share(skipped, 0.3, 1, cost, 4000, rng) == pytest.approx(0.7, abs=0.03)
    assert model.saved_share(skipped, 1.0, 4, cost, 100, rng) == 0.0


def test_skip_blocks_replays_the_policy_on_the_profile():
    """Layer 0 and the last are cold; a trigger at layer 1 skips layer 2."""
    profile = {"scores": [[0.1, 0.99, 0.5, 0.2], [0.1, 0.5, 0.99, 0.2]], "mean_decode_tokens": 8}
    policy = {"threshold": 0.9, "cold_start": 1, "cold_end": 1, "span": 1, "warmup": 2}
    skipped, warmup_share = model.skip_blocks(profile, policy)
    assert skipped.tolist() == [[False, False, True, False], [False, False, False, False]]
    assert warmup_share == 0.25
    assert model.skip_blocks(profile, policy, decode_tokens=63)[1] == pytest.approx(2 / 63)


def test_padding_takes_the_cheapest_width_that_holds_the_running_rows():
    """A GEMV of 1-2 rows dearer than 3 rows: 1 running row pads to 3, never past the pass."""
    cost = np.array([0.0, 5.0, 6.0, 3.0, 4.0, 9.0])
    assert model.padded(cost, 3).tolist() == [0.0, 3.0, 3.0, 3.0]
    assert model.padded(cost, 5).tolist() == [0.0, 3.0, 3.0, 3.0, 4.0, 9.0]
