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
