"""Skip counters: per request and in aggregate, kept in the worker that makes the decisions.

A request's counters live on the model's device (skip_state.py) while it is in the batch and
move here when it leaves; the totals (for the worker's log line; ``/metrics`` is counted in
the API server, see metrics.py) grow then too. Finished records are kept
in a bounded buffer (the newest ``MAX_FINISHED``) until a caller collects them, so a server
whose callers never ask does not grow. The offline API reaches them through ``LLM.collective_rpc("ffnskip_stats")``.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

from vllm.logger import init_logger

# Under the "vllm" logger, so vLLM's logging configuration (format, level) applies.
logger = init_logger(f"vllm.{__name__}")

MAX_FINISHED = 4096
#: Seconds between the aggregate log lines (like vLLM's own throughput lines).
LOG_INTERVAL_S = 10.0


@dataclass
class SkipStats:
    """FFN blocks skipped / evaluated (decode tokens of requests with skipping on)."""

    skipped: int = 0
    evaluated: int = 0

    @property
    def ratio(self) -> float:
        return self.skipped / self.evaluated if self.evaluated else 0.0

    def add(self, skipped: int, evaluated: int) -> None:
        self.skipped += skipped
        self.evaluated += evaluated


class SkipStatsStore:
    """This worker's totals and the records of requests that left the batch."""

    def __init__(self) -> None:
        self.total = SkipStats()
        self.requests_skipping = 0
        self._finished: OrderedDict[str, SkipStats] = OrderedDict()
        self._lock = threading.Lock()
        self._logged = SkipStats()
        self._last_log = time.monotonic()
        #: Requests seen, newest last (bounded): a preempted request re-enters the batch.
        self._seen: OrderedDict[str, None] = OrderedDict()

    def admit(self, request_id: str, skipping: bool) -> None:
        """A request entered the persistent batch."""
        with self._lock:
            if request_id in self._seen:
                return
            self._seen[request_id] = None
            if len(self._seen) > MAX_FINISHED:
                self._seen.popitem(last=False)
            self.requests_skipping += skipping

    def record(self, request_id: str, skipped: int, evaluated: int) -> None:
        """A skipping request left the persistent batch (finished, aborted, preempted or
        not scheduled for a step): its stays are summed."""
        with self._lock:
            self.total.add(skipped, evaluated)
            entry = self._finished.pop(request_id, None) or SkipStats()
            entry.add(skipped, evaluated)
            self._finished[request_id] = entry
            while len(self._finished) > MAX_FINISHED:
                self._finished.popitem(last=False)
        logger.debug(
            "ffnskip request %s: %d/%d FFN blocks skipped", request_id, skipped, evaluated
        )

    def maybe_log(self) -> None:
        """An INFO line for operators when requests finished since the last one."""
        now = time.monotonic()
        if now - self._last_log < LOG_INTERVAL_S or self.total == self._logged:
            return
        with self._lock:
            delta = SkipStats(
                self.total.skipped - self._logged.skipped,
                self.total.evaluated - self._logged.evaluated,
            )
            self._logged = SkipStats(self.total.skipped, self.total.evaluated)
        self._last_log = now
        logger.info(
            "FFN skip: %d of %d FFN blocks skipped (%.1f%%) since the last report; "
            "total %.1f%% over %d skipping requests",
            delta.skipped, delta.evaluated, 100 * delta.ratio, 100 * self.total.ratio,
            self.requests_skipping,
        )

    def pop_finished(
        self, request_ids: list[str] | None = None, keep: bool = False
    ) -> dict[str, dict[str, int]]:
        """Hands over the records of these requests (default: all); ``keep``: a copy only."""
        with self._lock:
            ids = list(self._finished) if request_ids is None else request_ids
            take = self._finished.get if keep else self._finished.pop
            return {rid: asdict(take(rid)) for rid in ids if rid in self._finished}

    def __len__(self) -> int:
        return len(self._finished)


#: The store of this process (one model per vLLM worker process).
STORE = SkipStatsStore()


def add_counts(into: dict[str, dict[str, int]], more: dict[str, dict[str, int]]) -> None:
    """Sum per-request ``{"skipped", "evaluated"}`` records of ``more`` into ``into``."""
    for request_id, counts in more.items():
        entry = into.setdefault(request_id, {"skipped": 0, "evaluated": 0})
        for key in ("skipped", "evaluated"):
            entry[key] += counts[key]


def collect_request_stats(llm: Any) -> dict[str, Any]:
    """Per-request and total skip counts of an offline ``vllm.LLM``.

    Returns ``{"requests": {request_id: {"skipped", "evaluated"}}, "total": {...},
    "requests_skipping": n, "in_batch": n}``; per-request records are handed over once.
    """
    ranks = llm.collective_rpc("ffnskip_stats")
    tp = llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size
    out = dict(ranks[0])
    out["requests"] = merge_stages([r["requests"] for r in ranks], tp)
    out["total"] = merge_stages([{"total": r["total"]} for r in ranks], tp)["total"]
    return out


def merge_stages(per_rank: list[dict[str, dict[str, int]]], tp: int) -> dict[str, dict[str, int]]:
    """Counts by request id from every worker rank, as one count per request: tensor-parallel
    ranks count the same blocks, so one rank per pipeline stage is read and the stages (each
    counting its own layers) are summed."""
    out: dict[str, dict[str, int]] = {}
    for stage in per_rank[::tp]:
        add_counts(out, stage)
    return out


class SaturationRecorder:
    """Saturation scores per layer, recorded while ``VLLM_FFNSKIP_RECORD_SCORES=1``.

    ``vllm-ffnskip profile`` serves requests whose policy computes the score at every layer
    (cold regions 0/0, threshold 1.0) and reads the scores back through
    ``collective_rpc("ffnskip_saturation")``.
    """

    def __init__(self) -> None:
        import os

        self.enabled = os.environ.get("VLLM_FFNSKIP_RECORD_SCORES") == "1"
        self._scores: dict[int, list[float]] = {}
        self._lock = threading.Lock()

    def add(self, layer: int, scores: list[float]) -> None:
        with self._lock:
            self._scores.setdefault(layer, []).extend(scores)

    def pop(self) -> dict[int, list[float]]:
        with self._lock:
            out, self._scores = self._scores, {}
        return out


RECORDER = SaturationRecorder()
