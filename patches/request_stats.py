"""Per-request skip counts in OpenAI responses, beside vLLM's per-request metrics, on the
offline ``LLM``'s outputs, and on ``/metrics`` (vLLM 0.32).

The counts are made in the worker; vLLM has no channel that carries per-request numbers
from a model's forward pass to the response. So ``AsyncLLM.generate`` asks the workers for
the counts of skipping requests that finished (``collective_rpc``, answered by the engine
core between two steps) before it hands their final output on: one call for all requests
that finished while the previous call was out, not one per request. The completion / chat
handlers add them to the response as ``metrics.ffnskip``: in the body of a non-streamed
response, and in the final usage chunk of a stream (sent with
``stream_options.include_usage``, as vLLM sends its own metrics). Every request that ends
is observed once on the API server's Prometheus metrics (metrics.py), with those counts.
``LLM.generate`` asks once per call and sets ``RequestOutput.ffnskip`` (None when dense).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator
from typing import Any

from vllm.outputs import RequestOutput
from vllm.sampling_params import SamplingParams

from vllm_ffnskip.metrics import server_metrics
from vllm_ffnskip.patches._wrap import wrap_method
from vllm_ffnskip.patches.model_impl import is_ffnskip, server_policy
from vllm_ffnskip.policy import PolicyError, parse_request
from vllm_ffnskip.stats import SkipStats, merge_stages

#: Counts of finished requests not yet put in a response, by engine request id (bounded:
#: a stream without usage chunk never collects its entry).
_FINISHED: OrderedDict[str, SkipStats] = OrderedDict()
_MAX_FINISHED = 4096


def response_field(stats: SkipStats) -> dict[str, Any]:
    """The ``metrics.ffnskip`` object of a response."""
    return {
        "ffn_blocks_skipped": stats.skipped,
        "ffn_blocks_evaluated": stats.evaluated,
        "skip_ratio": round(stats.ratio, 6),
    }


def _skipping(engine: Any, params: SamplingParams) -> bool:
    config = engine.vllm_config
    if not is_ffnskip(config.model_config):
        return False
    try:
        layers = config.model_config.hf_config.num_hidden_layers
        return parse_request(params.extra_args, server_policy(config), layers).enabled
    except PolicyError:
        return False  # refused before any output (HTTP 400)


def _merge(ranks: list[dict[str, dict[str, int]]], vllm_config: Any) -> dict[str, dict[str, int]]:
    """One count per request from every worker's ``ffnskip_request_stats`` answer."""
    return merge_stages(ranks, vllm_config.parallel_config.tensor_parallel_size)


class CountsFetcher:
    """Skip counts of finished requests from the workers, in as few calls as possible.

    A request that finishes while a call is out waits for the next one, which asks for
    every request that finished meanwhile. The engine core answers a call between two
    steps, so a request waits at most about one step for its counts.
    """

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.waiting: dict[str, list[asyncio.Future]] = {}
        self.task: asyncio.Task | None = None

    async def counts(self, request_id: str) -> SkipStats | None:
        future = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(request_id, []).append(future)
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._fetch())
        return await future

    async def _fetch(self) -> None:
        while self.waiting:
            batch, self.waiting = self.waiting, {}
            try:
                ranks = await self.engine.collective_rpc("ffnskip_request_stats", args=(list(batch),))
                counts = _merge(ranks, self.engine.vllm_config)
            except Exception as e:  # noqa: BLE001 - handed to every waiting request
                for futures in batch.values():
                    for f in futures:
                        if not f.done():
                            f.set_exception(e)
                continue
            for request_id, futures in batch.items():
                found = counts.get(request_id)
                for f in futures:
                    if not f.done():
                        f.set_result(SkipStats(**found) if found else None)


def _fetcher(engine: Any) -> CountsFetcher:
    fetcher = getattr(engine, "_ffnskip_counts", None)
    if fetcher is None:
        fetcher = engine._ffnskip_counts = CountsFetcher(engine)
    return fetcher


async def _generate(original, self, prompt, sampling_params, request_id, *args, **kwargs):
    if not is_ffnskip(self.vllm_config.model_config):
        async for output in original(self, prompt, sampling_params, request_id, *args, **kwargs):
            yield output
        return
    metrics = server_metrics(self.vllm_config.model_config.served_model_name)
    skipping = isinstance(sampling_params, SamplingParams) and _skipping(self, sampling_params)
    started = observed = False
    try:
        async for output in original(self, prompt, sampling_params, request_id, *args, **kwargs):
            started = True
            if output.finished and not observed:
                stats = await _finished_counts(self, request_id, metrics) if skipping else None
                metrics.observe(skipping, stats)
                observed = True
            yield output
    finally:
        if started and not observed:  # aborted mid-generation: a request, without counts
            metrics.observe(skipping, None)


async def _finished_counts(engine: Any, request_id: str, metrics: Any) -> SkipStats | None:
    """A finished skipping request's counts, kept for its response (``take_response_stats``)."""
    start = time.perf_counter()
    stats = await _fetcher(engine).counts(request_id)
    metrics.fetch_seconds.observe(time.perf_counter() - start)
    if stats is not None:
        _FINISHED[request_id] = stats
        while len(_FINISHED) > _MAX_FINISHED:
            _FINISHED.popitem(last=False)
    return stats


def take_response_stats(response_id: str) -> SkipStats | None:
    """Counts of the engine requests behind a response: ``id``, or its per-prompt
    ``id-i`` (completions) / ``id_i`` (chat) sub-requests; each is handed over once."""
    keys = [k for k in _FINISHED if _belongs_to(k, response_id)]
    if not keys:
        return None
    total = SkipStats()
    for key in keys:
        stats = _FINISHED.pop(key)
        total.add(stats.skipped, stats.evaluated)
    return total


def _belongs_to(request_id: str, response_id: str) -> bool:
    suffix = request_id[len(response_id) :]
    return request_id.startswith(response_id) and (
        suffix == "" or (suffix[0] in "-_" and suffix[1:].isdigit())
    )


def _with_stats(result: Any) -> Any:
    from vllm.entrypoints.generate.base.protocol import PerRequestMetrics

    if isinstance(result, AsyncGenerator):
        return _stream_with_stats(result)
    metrics = getattr(result, "metrics", False)
    if metrics is not False:  # a completion or chat response (not an ErrorResponse)
        stats = take_response_stats(result.id)
        if stats is not None:
            metrics = metrics or PerRequestMetrics()
            metrics.ffnskip = response_field(stats)  # an extra field: extra="allow"
            result.metrics = metrics
    return result


async def _stream_with_stats(chunks: AsyncGenerator[str, None]) -> AsyncGenerator[str, None]:
    async for chunk in chunks:
        # Only the final usage chunk has no choices; every other chunk passes untouched.
        if chunk.startswith("data: {") and '"choices":[]' in chunk and '"usage"' in chunk:
            data = json.loads(chunk[len("data: ") :])
            stats = take_response_stats(data.get("id", ""))
            if stats is not None:
                data.setdefault("metrics", {})["ffnskip"] = response_field(stats)
                chunk = f"data: {json.dumps(data, separators=(',', ':'))}\n\n"
        yield chunk


async def _create_completion(original, self, request, raw_request=None):
    return _with_stats(await original(self, request, raw_request))


def _run_engine(original, self, *args, **kwargs):
    outputs = original(self, *args, **kwargs)
    ids = [o.request_id for o in outputs if isinstance(o, RequestOutput)]
    if ids and is_ffnskip(self.llm_engine.vllm_config.model_config):
        # Records stay for collect_request_stats(llm), which hands them over.
        ranks = self.collective_rpc("ffnskip_request_stats", args=(ids, False))
        counts = _merge(ranks, self.llm_engine.vllm_config)
        for output in outputs:
            if isinstance(output, RequestOutput):
                found = counts.get(output.request_id)
                output.ffnskip = response_field(SkipStats(**found)) if found else None
    return outputs


def apply_offline() -> None:
    """Called by model_impl.py when an offline ``LLM`` creates an ffnskip engine."""
    from vllm.entrypoints.llm import LLM

    wrap_method(LLM, "_run_engine", _run_engine)


def apply() -> None:
    """Called by model_impl.py when an OpenAI server creates an ffnskip engine, so other
    processes (engine core, workers, offline ``LLM``) never import vLLM's HTTP layer for it."""
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
    from vllm.v1.engine.async_llm import AsyncLLM

    wrap_method(AsyncLLM, "generate", _generate)
    wrap_method(OpenAIServingCompletion, "create_completion", _create_completion)
    wrap_method(OpenAIServingChat, "create_chat_completion", _create_completion)
