"""Worker methods reachable through vLLM's ``collective_rpc`` (``worker_extension_cls``)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from vllm_ffnskip.stats import RECORDER, STORE, add_counts
from vllm_ffnskip.tracker import SkipPolicyTracker


class FFNSkipWorkerExtension:
    """Mixed into vLLM's worker class on ``--model-impl ffnskip`` servers."""

    def ffnskip_stats(self) -> dict[str, Any]:
        """Hands over the records of requests that left the batch, the current counts of
        those still in it (a finished request leaves the batch only at the next step), and
        this worker's totals."""
        tracker = SkipPolicyTracker.current
        live = tracker.snapshot() if tracker is not None else {}
        requests = STORE.pop_finished()
        add_counts(requests, live)  # a preempted request may be in both
        return {
            "requests": requests,
            "total": asdict(STORE.total),
            "requests_skipping": STORE.requests_skipping,
            "in_batch": len(live),
        }

    def ffnskip_saturation(self) -> dict[int, list[float]]:
        """Hands over the saturation scores recorded per layer (VLLM_FFNSKIP_RECORD_SCORES=1)."""
        return RECORDER.pop()
