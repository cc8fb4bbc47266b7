"""The OpenAI endpoint of ``vllm serve MODEL --model-impl ffnskip`` through the real
``openai`` client: completions and chat, streaming and not, with and without
``vllm_xargs``; invalid policies are answered 400 naming the field, and the server goes on."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.server import vllm_server

XARGS_SKIP = {"ffnskip": 1, "ffnskip_threshold": 0.95}


@pytest.fixture(scope="module")
def client(embedded_model: str) -> Iterator[openai.OpenAI]:
    with vllm_server(
        embedded_model, "--model-impl", "ffnskip", "--dtype", "float32",
        "--max-model-len", "1024", "--served-model-name", "smollm2",
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
    ],
)
def test_bad_policy_is_400_naming_the_field(client, xargs, field):
    with pytest.raises(openai.BadRequestError) as err:
        complete(client, xargs)
    assert err.value.status_code == 400
    assert field in str(err.value.body)
    assert complete(client, {"ffnskip": 0})  # the server goes on serving


def scrape(client: openai.OpenAI) -> dict[str, float]:
    """Our samples on vLLM's /metrics, by sample name with labels."""
    text = requests.get(str(client.base_url).replace("/v1/", "/metrics"), timeout=10).text
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
    n, max_tokens, layers = 3, 12, 30
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
