"""Timing on a GPU the way a CUDA-graph decode step runs: replays of one captured graph."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def replay_ms(fn: Callable[[], object], iters: int, warmup: int = 3) -> float:
    """Median milliseconds of one replay of a CUDA graph holding ``fn``, timed with CUDA
    events. The warm-up calls (Triton JIT, compilation) run on a side stream before the
    capture, as ``torch.cuda.graphs`` asks."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(warmup):
        graph.replay()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
