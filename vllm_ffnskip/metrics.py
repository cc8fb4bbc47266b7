"""Prometheus metrics for FFN skipping, on vLLM's own ``/metrics``.

The counts are made in the worker, the ``/metrics`` endpoint is served by the API server:
two processes. The worker keeps its metrics in a private ``CollectorRegistry`` and writes it
in the Prometheus text format with ``prometheus_client.write_to_textfile`` (the textfile
collector pattern) to a directory the API server created; the API server registers a
collector in vLLM's registry that parses those files (``prometheus_client.parser``) and sums
them across workers. Only tensor-parallel rank 0 writes: every rank makes the same decisions.
A daemon thread writes the file at most every ``FLUSH_INTERVAL_S`` when something changed:
written from the forward pass, the file cost ~1 ms per decode step (measured on the CPU).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, write_to_textfile
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

#: Directory shared by the API server and its workers (set by the API server at start).
DIR_ENV = "VLLM_FFNSKIP_METRICS_DIR"
RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0)
#: Longest delay between a count in the worker and its appearance on /metrics.
FLUSH_INTERVAL_S = 0.5


class WorkerSkipMetrics:
    """The worker's counters, published to the API server by a flusher thread."""

    def __init__(self, directory: str, model_name: str, per_request: bool = True) -> None:
        """``per_request``: also count requests and their skip ratios. Under pipeline
        parallelism only the first stage does, so a request is counted once; its ratio there
        is over that stage's layers."""
        self.registry = CollectorRegistry(auto_describe=True)
        self.path = Path(directory) / f"worker-{os.getpid()}.prom"
        labels = {"model_name": model_name}
        self.skipped = Counter(
            "vllm_ffnskip_ffn_blocks_skipped", "FFN blocks skipped.",
            list(labels), registry=self.registry,
        ).labels(**labels)
        self.evaluated = Counter(
            "vllm_ffnskip_ffn_blocks_evaluated",
            "FFN blocks, run or skipped, of decode tokens of requests with skipping on.",
            list(labels), registry=self.registry,
        ).labels(**labels)
        self.requests: dict[str, Counter] = {}
        self.request_ratio: Histogram | None = None
        if per_request:
            requests = Counter(
                "vllm_ffnskip_requests", "Requests served, by whether skipping was on.",
                [*labels, "skipping"], registry=self.registry,
            )
            self.requests = {s: requests.labels(**labels, skipping=s) for s in ("true", "false")}
            self.request_ratio = Histogram(
                "vllm_ffnskip_request_skip_ratio",
                "Per-request share of its decode FFN blocks that were skipped.",
                list(labels), buckets=RATIO_BUCKETS, registry=self.registry,
            ).labels(**labels)
        self._changed = threading.Event()
        self.flush()
        threading.Thread(target=self._flush_loop, name="ffnskip-metrics", daemon=True).start()

    def changed(self) -> None:
        """Counts changed: the flusher writes them within ``FLUSH_INTERVAL_S``."""
        self._changed.set()

    def flush(self) -> None:
        self._changed.clear()
        write_to_textfile(str(self.path), self.registry)

    def _flush_loop(self) -> None:
        while True:
            self._changed.wait()
            time.sleep(FLUSH_INTERVAL_S)  # one write for everything counted meanwhile
            try:
                self.flush()
            except OSError:
                return  # the API server removed the directory: it is shutting down


class SkipMetricsCollector(Collector):
    """API-server side: the sum of the workers' metrics files, at scrape time."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        sums: dict[tuple, float] = {}
        for path in sorted(self.directory.glob("*.prom")):
            try:
                text = path.read_text()
            except OSError:
                continue  # a worker replaced it right now; the next scrape reads it
            for family in text_string_to_metric_families(text):
                families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                for s in family.samples:
                    key = (family.name, s.name, tuple(sorted(s.labels.items())))
                    sums[key] = sums.get(key, 0.0) + s.value
        for (name, sample, labels), value in sums.items():
            families[name].add_sample(sample, dict(labels), value)
        yield from families.values()


_collector: SkipMetricsCollector | None = None


def setup_api_server_metrics() -> None:
    """Create the shared directory and expose it on vLLM's registry (once per process)."""
    global _collector
    if _collector is not None:
        return
    directory = os.environ.get(DIR_ENV)
    if not directory:
        directory = tempfile.mkdtemp(prefix="vllm-ffnskip-metrics-")
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        os.environ[DIR_ENV] = directory  # inherited by the engine and worker processes
    _collector = SkipMetricsCollector(directory)
    REGISTRY.register(_collector)
