"""Skip statistics bookkeeping (no engine)."""

from __future__ import annotations

from vllm_ffnskip.stats import MAX_FINISHED, SkipStatsStore


def test_finished_records_are_bounded_and_handed_over_once():
    store = SkipStatsStore()
    for i in range(MAX_FINISHED + 500):
        store.admit(f"r{i}", skipping=True)
        store.record(f"r{i}", skipped=1, evaluated=30)
    assert len(store) == MAX_FINISHED
    records = store.pop_finished()
    assert f"r{MAX_FINISHED + 499}" in records and "r0" not in records  # newest kept
    assert store.pop_finished() == {}
    assert store.requests_skipping == MAX_FINISHED + 500


def test_preempted_request_is_one_request_with_summed_counters():
    store = SkipStatsStore()
    for _ in range(2):  # preempted, then resumed and finished
        store.admit("r", skipping=True)
        store.record("r", skipped=2, evaluated=30)
    assert store.pop_finished() == {"r": {"skipped": 4, "evaluated": 60}}
    assert store.requests_skipping == 1


def test_re_added_request_counts_each_decode_token_once():
    """A request leaves the batch after 5 outputs and comes back (preempted: it recomputes
    prompt and outputs in one prefill). Its recomputed tokens may skip again, but only the
    tokens from its last output on count: over both stays, each decode token once."""
    import numpy as np
    import torch
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate

    from vllm_ffnskip.batch import SkipBatch
    from vllm_ffnskip.policy import REQUEST_ID_KEY, RESOLVED_KEY, SkipPolicy
    from vllm_ffnskip.stats import STORE
    from vllm_ffnskip.tracker import SkipPolicyTracker

    layers, prompt = 6, 4
    wire = SkipPolicy(threshold=0.5, warmup=0, cold_start=1, cold_end=1).to_wire(layers)
    params = SamplingParams(extra_args={RESOLVED_KEY: wire, REQUEST_ID_KEY: "re-added"})
    tracker = SkipPolicyTracker(None, torch.device("cpu"), False)
    STORE.pop_finished()

    def step(positions: list[int]) -> SkipBatch | None:
        qsl = torch.tensor([0, len(positions)])
        batch = SkipBatch.build(tracker.rows, qsl, torch.tensor(positions), layers, layers)
        if batch is not None:  # None: no token may skip
            batch.skipped[:] = batch.hot.sum(axis=1)  # as if every hot layer skipped
            batch.finish()
        return batch

    tracker.update_state(BatchUpdate(batch_size=1, added=[(0, params, [1] * prompt, [])],
                                     removed=[], moved=[]))
    assert step(list(range(prompt))) is None  # prefill: nothing skips or counts
    for n in range(4):  # decode tokens at positions prompt .. prompt + 3
        step([prompt + n])
    tracker.update_state(BatchUpdate(batch_size=0, added=[], removed=[0], moved=[]))
    outputs = [9] * 5  # five outputs generated; the fifth not yet fed back
    tracker.update_state(BatchUpdate(batch_size=1, added=[(0, params, [1] * prompt, outputs)],
                                     removed=[], moved=[]))
    recompute = step(list(range(prompt + 5)))  # prompt + outputs, one prefill
    assert recompute.counted.tolist() == [False] * (prompt + 4) + [True]
    assert recompute.hot[prompt:].any()  # recomputed decode tokens are decided again
    step([prompt + 5])
    tracker.update_state(BatchUpdate(batch_size=0, added=[], removed=[0], moved=[]))
    counts = STORE.pop_finished(["re-added"])["re-added"]
    hot_layers = layers - 2
    assert counts == {"evaluated": 6 * layers, "skipped": 6 * hot_layers}
    assert np.all(recompute.skipped[:prompt] == 0)
