"""Worker methods reachable through vLLM's ``collective_rpc`` (``worker_extension_cls``)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from vllm_ffnskip.skip_state import SkipState
from vllm_ffnskip.stats import RECORDER, STORE, SkipStats, add_counts


class FFNSkipWorkerExtension:
    """Mixed into vLLM's worker class on ``--model-impl ffnskip`` servers."""

    def ffnskip_stats(self) -> dict[str, Any]:
        """Hands over the records of requests that left the batch, the current counts of
        those still in it (a finished request leaves the batch only at the next step), and
        this worker's totals (theirs included)."""
        skip_state = SkipState.current
        live = skip_state.snapshot() if skip_state is not None else {}
        requests = STORE.pop_finished()
        add_counts(requests, live)  # a preempted request may be in both
        total = SkipStats(STORE.total.skipped, STORE.total.evaluated)
        for counts in live.values():
            total.add(counts["skipped"], counts["evaluated"])
        return {
            "requests": requests,
            "total": asdict(total),
            "requests_skipping": STORE.requests_skipping,
            "in_batch": len(live),
        }

    def ffnskip_request_stats(
        self, request_ids: list[str], hand_over: bool = True
    ) -> dict[str, dict[str, int]]:
        """Counts of these requests: records of those that left the batch (handed over once,
        unless ``hand_over`` is false) plus the current counts of those still in it (a
        request that just finished leaves the batch at the next step, after its counts are
        final)."""
        skip_state = SkipState.current
        live = skip_state.snapshot() if skip_state is not None else {}
        requests = STORE.pop_finished(request_ids, keep=not hand_over)
        add_counts(requests, {rid: live[rid] for rid in request_ids if rid in live})
        return requests

    def ffnskip_saturation(self) -> dict[int, list[float]]:
        """Hands over the saturation scores recorded per layer (VLLM_FFNSKIP_RECORD_SCORES=1)."""
        return RECORDER.pop()
