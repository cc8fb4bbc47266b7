"""Prometheus metrics for FFN skipping, on vLLM's own ``/metrics``.

Counted in the API server, once per request when it ends, from the per-request counts that
its response carries (patches/request_stats.py): the numbers on ``/metrics`` are the sums of
what the callers were told. Nothing is exchanged between processes by hand, so a worker on
another node (pipeline parallel over Ray) publishes nothing and needs no shared directory.

The metrics live in ``prometheus_client``'s default registry, as vLLM's own do. With
``--api-server-count`` above 1, vLLM puts ``prometheus_client`` in multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR``, set before the API servers are spawned) and ``/metrics``
sums every API server's values; these metrics, created in each API server, are summed the
same way (counters and the histogram are both sums across processes).
"""

from __future__ import annotations

import threading

from prometheus_client import Counter, Histogram

from vllm_ffnskip.stats import SkipStats

RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0)


class ServerSkipMetrics:
    """The API server's skip metrics, labelled by served model name."""

    def __init__(self, model_name: str) -> None:
        labels = {"model_name": model_name}
        self.skipped = Counter(
            "vllm_ffnskip_ffn_blocks_skipped", "FFN blocks skipped (requests that ended).",
            list(labels),
        ).labels(**labels)
        self.evaluated = Counter(
            "vllm_ffnskip_ffn_blocks_evaluated",
            "FFN blocks, run or skipped, of decode tokens of skipping requests that ended.",
            list(labels),
        ).labels(**labels)
        requests = Counter(
            "vllm_ffnskip_requests", "Requests served, by whether skipping was on.",
            [*labels, "skipping"],
        )
        self.requests = {s: requests.labels(**labels, skipping=s) for s in ("true", "false")}
        self.request_ratio = Histogram(
            "vllm_ffnskip_request_skip_ratio",
            "Per-request share of its decode FFN blocks that were skipped.",
            list(labels), buckets=RATIO_BUCKETS,
        ).labels(**labels)
        self.fetch_seconds = Histogram(
            "vllm_ffnskip_counts_fetch_seconds",
            "Time a finished skipping request waited for its skip counts from the workers.",
            list(labels), buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
        ).labels(**labels)

    def observe(self, skipping: bool, stats: SkipStats | None) -> None:
        """One request ended; ``stats``: its counts (None when dense or aborted)."""
        self.requests["true" if skipping else "false"].inc()
        if stats is None:
            return
        self.skipped.inc(stats.skipped)
        self.evaluated.inc(stats.evaluated)
        if stats.evaluated:
            self.request_ratio.observe(stats.ratio)


_metrics: ServerSkipMetrics | None = None
_lock = threading.Lock()


def server_metrics(model_name: str) -> ServerSkipMetrics:
    """This process's metrics (created once: prometheus_client refuses a second family)."""
    global _metrics
    with _lock:
        if _metrics is None:
            _metrics = ServerSkipMetrics(model_name)
        return _metrics
