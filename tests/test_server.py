"""The OpenAI endpoint of ``vllm serve MODEL --model-impl ffnskip`` through the real
``openai`` client: completions and chat, streaming and not, with and without
``vllm_xargs``; invalid policies are answered 400 naming the field, and the server goes on."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import openai
import psutil
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.server import vllm_server

XARGS_SKIP = {"ffnskip": 1, "ffnskip_threshold": 0.95}


@pytest.fixture(scope="module")
def client(embedded_model: str) -> Iterator[openai.OpenAI]:
    # Eager: what these tests check is the HTTP layer; compiled mode is tested offline.
    with vllm_server(
        embedded_model, "--model-impl", "ffnskip", "--dtype", "float32", "--enforce-eager",
        "--max-model-len", "1024", "--served-model-name", "smollm2",
        # the rule in every pass, however wide: the load tests run skipping rows beside dense ones
        "--additional-config", '{"ffnskip": {"enabled": true, "max_skip_rows": 0}}',
    ) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


def complete(client: openai.OpenAI, xargs: dict | None = None, stream: bool = False) -> str:
    extra = {"vllm_xargs": xargs} if xargs is not None else None
    kwargs = dict(
        model="smollm2", prompt="The capital of France is", max_tokens=16,
        temperature=0, extra_body=extra,
    )
    if stream:
        return "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs))
    return client.completions.create(**kwargs).choices[0].text


def chat(client: openai.OpenAI, xargs: dict | None = None, stream: bool = False) -> str:
    extra = {"vllm_xargs": xargs} if xargs is not None else None
    kwargs = dict(
        model="smollm2", messages=[{"role": "user", "content": "Name three primary colors."}],
        max_tokens=24, temperature=0, extra_body=extra,
    )
    if stream:
        return "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(stream=True, **kwargs)
            if c.choices
        )
    return client.chat.completions.create(**kwargs).choices[0].message.content


@pytest.mark.parametrize("call", [complete, chat])
@pytest.mark.parametrize("xargs", [None, {"ffnskip": 0}, XARGS_SKIP])
def test_streaming_equals_non_streaming(client, call, xargs):
    text = call(client, xargs)
    assert text
    assert call(client, xargs, stream=True) == text


@pytest.mark.parametrize(
    "xargs, field",
    [
        ({"ffnskip_threshold": 1.5}, "ffnskip_threshold"),
        ({"ffnskip_threshold": 0}, "ffnskip_threshold"),
        ({"ffnskip_threshold": "high"}, "ffnskip_threshold"),
        ({"ffnskip_warmup": -1}, "ffnskip_warmup"),
        ({"ffnskip_span": 0}, "ffnskip_span"),
        ({"ffnskip_cold_start": 20, "ffnskip_cold_end": 10}, "ffnskip_cold_start"),
        ({"ffnskip": 2}, "ffnskip"),
        ({"ffnskip_treshold": 0.9}, "ffnskip_treshold"),
        ({"ffnskip_span": [1]}, "ffnskip_span"),
        ({"ffnskip_layer_thresholds": [0.97] * 29}, "ffnskip_layer_thresholds"),
        ({"ffnskip_layer_thresholds": [0.97] * 29 + [2]}, "ffnskip_layer_thresholds"),
    ],
)
def test_bad_policy_is_400_naming_the_field(client, xargs, field):
    with pytest.raises(openai.BadRequestError) as err:
        complete(client, xargs)
    assert err.value.status_code == 400
    assert field in str(err.value.body)
    assert complete(client, {"ffnskip": 0})  # the server goes on serving


LAYERS = 30  # the embedded model's decoder layers


def skip_field(response) -> dict | None:
    """``metrics.ffnskip`` of a response or chunk, as the caller receives it."""
    return (response.model_dump().get("metrics") or {}).get("ffnskip")


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
@pytest.mark.parametrize("stream", [False, True])
def test_response_carries_per_request_skip_counts(client, endpoint, stream):
    """A skipping request's response says how many FFN blocks it skipped, out of how many
    (every decode token x every layer); a dense one carries no skip counts."""
    max_tokens = 12

    def call(xargs: dict):
        extra = {"vllm_xargs": xargs, "ignore_eos": True}
        kwargs = dict(model="smollm2", max_tokens=max_tokens, temperature=0, extra_body=extra)
        if stream:
            kwargs.update(stream=True, stream_options={"include_usage": True})
        if endpoint == "chat":
            kwargs["messages"] = [{"role": "user", "content": "Describe the sea."}]
            response = client.chat.completions.create(**kwargs)
        else:
            response = client.completions.create(prompt="Describe the sea.", **kwargs)
        if not stream:
            return response
        chunks = list(response)
        assert all(skip_field(c) is None for c in chunks[:-1])
        assert chunks[-1].usage is not None and not chunks[-1].choices
        return chunks[-1]

    counts = skip_field(call({"ffnskip": 1, "ffnskip_threshold": 0.9}))
    assert counts["ffn_blocks_evaluated"] == (max_tokens - 1) * LAYERS
    assert 0 < counts["ffn_blocks_skipped"] < counts["ffn_blocks_evaluated"]
    assert counts["skip_ratio"] == pytest.approx(
        counts["ffn_blocks_skipped"] / counts["ffn_blocks_evaluated"], abs=1e-6
    )
    # A stricter threshold never skips more.
    strict = skip_field(call({"ffnskip": 1, "ffnskip_threshold": 0.999}))
    assert strict["ffn_blocks_skipped"] <= counts["ffn_blocks_skipped"]
    assert skip_field(call({"ffnskip": 0})) is None


def test_multi_prompt_completion_sums_its_requests(client):
    """One completion request with two prompts: its counts cover both engine requests."""
    response = client.completions.create(
        model="smollm2", prompt=["Describe the sea.", "Describe a forest."], max_tokens=8,
        temperature=0, extra_body={"vllm_xargs": {"ffnskip": 1}, "ignore_eos": True},
    )
    assert skip_field(response)["ffn_blocks_evaluated"] == 2 * 7 * LAYERS


def test_parallel_samples_sum_into_their_request(client):
    """Chat with n=2: both samples' FFN blocks count toward the one response."""
    response = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Describe the sea."}],
        max_tokens=8, n=2, temperature=0.8, seed=1,
        extra_body={"vllm_xargs": {"ffnskip": 1}, "ignore_eos": True},
    )
    assert len(response.choices) == 2
    assert skip_field(response)["ffn_blocks_evaluated"] == 2 * 7 * LAYERS


def scrape(client: openai.OpenAI | str) -> dict[str, float]:
    """Our samples on vLLM's /metrics (of a client's server, or at a base URL), by sample
    name with labels. A request is counted before its response is sent."""
    url = client if isinstance(client, str) else str(client.base_url).replace("/v1/", "")
    text = requests.get(f"{url.rstrip('/')}/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("vllm_ffnskip_"):
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}"] = s.value
    return out


def test_metrics_count_what_was_sent(client):
    """Skipped/evaluated FFN blocks and request counters on /metrics match the traffic."""
    before = scrape(client)
    n, max_tokens, layers = 3, 12, LAYERS
    for _ in range(n):
        client.completions.create(
            model="smollm2", prompt="Tell me about the ocean.", max_tokens=max_tokens,
            temperature=0, extra_body={"vllm_xargs": XARGS_SKIP, "ignore_eos": True},
        )
    complete(client, {"ffnskip": 0})
    after = scrape(client)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    label = "{model_name=smollm2}"
    evaluated = delta(f"vllm_ffnskip_ffn_blocks_evaluated_total{label}")
    skipped = delta(f"vllm_ffnskip_ffn_blocks_skipped_total{label}")
    assert evaluated == n * (max_tokens - 1) * layers  # every decode forward, every layer
    assert 0 < skipped < evaluated
    assert delta("vllm_ffnskip_requests_total{model_name=smollm2,skipping=true}") == n
    assert delta("vllm_ffnskip_requests_total{model_name=smollm2,skipping=false}") == 1
    assert delta(f"vllm_ffnskip_request_skip_ratio_count{label}") == n  # each request once
    # The three requests are the same greedy request: each one's ratio is the total ratio.
    assert delta(f"vllm_ffnskip_request_skip_ratio_sum{label}") == pytest.approx(skipped / evaluated * n)


def server_rss_mib(url: str) -> float:
    """Resident memory of the server process tree listening on ``url``'s port."""
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    for conn in psutil.net_connections(kind="tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
            root = psutil.Process(conn.pid)
            procs = [root, *root.children(recursive=True)]
            return sum(p.memory_info().rss for p in procs if p.is_running()) / 2**20
    raise RuntimeError(f"no process listens on {port}")


async def load_round(base_url: str, n: int = 64) -> dict[int, str]:
    """n concurrent requests: skip/dense x streaming/not x lengths; every 8th stream is
    cancelled after its first chunks. Returns outputs of the dense requests that completed."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0)

    async def one(i: int) -> tuple[int, str | None]:
        dense = i % 2 == 0
        xargs = {"ffnskip": 0} if dense else {"ffnskip": 1, "ffnskip_threshold": 0.94 + (i % 5) / 100}
        kwargs = dict(
            model="smollm2", prompt=LOAD_PROMPTS[i % len(LOAD_PROMPTS)], max_tokens=8 + (i % 4) * 4,
            temperature=0, extra_body={"vllm_xargs": xargs, "ignore_eos": True},
        )
        if i % 4 in (1, 2):  # streaming
            stream = await client.completions.create(stream=True, **kwargs)
            text = []
            async for chunk in stream:
                text.append(chunk.choices[0].text)
                if i % 8 == 7 and len(text) == 2:
                    await stream.close()  # the client goes away mid-generation
                    return i, None
            return i, "".join(text) if dense else None
        response = await client.completions.create(**kwargs)
        return i, response.choices[0].text if dense else None

    async with client:
        results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), 600)
    return {i: text for i, text in results if text is not None}


LOAD_PROMPTS = [
    "The capital of France is", "List three fruits:", "Write a haiku about rain.",
    "Explain gravity in one sentence.", "The opposite of hot is",
]


def test_load_mixed_concurrent_requests(client):
    """64 concurrent mixed requests, twice: no errors, dense outputs equal a quiet run,
    memory stable across rounds, counters consistent with what was sent."""
    url = str(client.base_url).rstrip("/").removesuffix("/v1")
    def shape(i: int) -> tuple[int, int]:
        return i % len(LOAD_PROMPTS), i % 4  # (prompt, length) of request i

    quiet = {}  # every dense (prompt, length) of a round, served alone
    for i in range(0, 4 * len(LOAD_PROMPTS), 2):
        quiet[shape(i)] = client.completions.create(
            model="smollm2", prompt=LOAD_PROMPTS[i % len(LOAD_PROMPTS)], max_tokens=8 + (i % 4) * 4,
            temperature=0, extra_body={"vllm_xargs": {"ffnskip": 0}, "ignore_eos": True},
        ).choices[0].text
    before = scrape(client)
    rss = []
    for _ in range(2):
        dense = asyncio.run(load_round(str(client.base_url)))
        assert len(dense) == 32  # every dense request completed (none is cancelled)
        for i, text in dense.items():
            assert text == quiet[shape(i)], f"dense request {i} changed under load"
        rss.append(server_rss_mib(url))
    assert requests.get(f"{url}/health", timeout=10).status_code == 200
    assert rss[1] < rss[0] * 1.1 + 64, f"server memory grew: {rss}"
    after = scrape(client)
    label = "model_name=smollm2"
    sent_skip = sent_dense = 2 * 32
    assert after[f"vllm_ffnskip_requests_total{{{label},skipping=true}}"] - before.get(
        f"vllm_ffnskip_requests_total{{{label},skipping=true}}", 0) == sent_skip
    assert after[f"vllm_ffnskip_requests_total{{{label},skipping=false}}"] - before.get(
        f"vllm_ffnskip_requests_total{{{label},skipping=false}}", 0) == sent_dense
    skipped = after[f"vllm_ffnskip_ffn_blocks_skipped_total{{{label}}}"] - before[
        f"vllm_ffnskip_ffn_blocks_skipped_total{{{label}}}"]
    evaluated = after[f"vllm_ffnskip_ffn_blocks_evaluated_total{{{label}}}"] - before[
        f"vllm_ffnskip_ffn_blocks_evaluated_total{{{label}}}"]
    assert 0 < skipped < evaluated


def test_two_api_servers_count_every_request_once(embedded_model):
    """``--api-server-count 2``: vLLM's multiprocess Prometheus registry sums both API
    servers' counts; every scrape, whichever server answers, shows all the traffic, and
    each response carries its own counts."""
    n_skip, n_dense, max_tokens = 6, 3, 8
    with vllm_server(
        embedded_model, "--model-impl", "ffnskip", "--dtype", "float32", "--enforce-eager",
        "--max-model-len", "512", "--max-num-seqs", "8", "--served-model-name", "smollm2",
        "--api-server-count", "2",
    ) as url:
        evaluated = 0
        for i in range(n_skip + n_dense):
            xargs = {"ffnskip": 1, "ffnskip_threshold": 0.95} if i < n_skip else {"ffnskip": 0}
            body = {"model": "smollm2", "prompt": LOAD_PROMPTS[i % len(LOAD_PROMPTS)],
                    "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                    "vllm_xargs": xargs}
            # A new connection per request, so the kernel spreads them over both servers.
            response = requests.post(f"{url}/v1/completions", json=body, timeout=300,
                                     headers={"Connection": "close"})
            assert response.status_code == 200, response.text
            counts = (response.json().get("metrics") or {}).get("ffnskip")
            assert (counts is None) == (i >= n_skip), i
            if counts is not None:
                assert counts["ffn_blocks_evaluated"] == (max_tokens - 1) * LAYERS
                evaluated += counts["ffn_blocks_evaluated"]
        label = "model_name=smollm2"
        for _ in range(6):
            samples = scrape(url)
            assert samples[f"vllm_ffnskip_requests_total{{{label},skipping=true}}"] == n_skip
            assert samples[f"vllm_ffnskip_requests_total{{{label},skipping=false}}"] == n_dense
            assert samples[f"vllm_ffnskip_ffn_blocks_evaluated_total{{{label}}}"] == evaluated
            assert samples[f"vllm_ffnskip_request_skip_ratio_count{{{label}}}"] == n_skip
