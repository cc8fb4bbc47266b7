"""Skip counts stay exact when vLLM's scheduler moves requests around (real engine, CPU).

A KV cache of a few blocks makes 8 concurrent requests preempt each other: a preempted
request leaves the persistent batch and, resumed, recomputes its prompt and the tokens it
had generated. Its skip decisions are made again for those tokens (so the recomputed KV is
the one it had), but its counts must cover each decode token once. The same engine serves
a prompt longer than one step's token budget (chunked prefill) and requests that end on
EOS. Every comparison is exact: token ids, and counts against the same request served
alone (or the transformers reference of the rule).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from vllm import SamplingParams

from tests.conftest import PROMPTS, close_llm, make_llm
from tests.reference import SkipReference
from vllm_ffnskip.policy import SkipPolicy

LAYERS = 30  # the embedded SmolLM2-135M-Instruct
MAX_TOKENS = 48
#: 8 requests of MAX_TOKENS need 16 KV blocks of 32 tokens: they cannot all stay, and vLLM
#: preempts some of them.
BLOCK_SIZE, KV_BLOCKS = 32, 10
STEP_TOKENS = 64  # max_num_batched_tokens: a longer prompt is prefilled in chunks


@pytest.fixture(scope="module")
def llm(embedded_model: str) -> Iterator[object]:
    llm = make_llm(
        embedded_model,
        model_impl="ffnskip",
        block_size=BLOCK_SIZE,
        num_gpu_blocks_override=KV_BLOCKS,
        max_num_batched_tokens=STEP_TOKENS,
        max_num_seqs=8,
        max_model_len=(KV_BLOCKS - 1) * BLOCK_SIZE,  # what vLLM admits for this cache
        disable_log_stats=False,  # vLLM's preemption counter
        additional_config={"ffnskip": {"enabled": False, "warmup": 2, "cold_start": 2, "cold_end": 2, "span": 1, "max_skip_rows": 0}},
    )
    yield llm
    close_llm(llm)


def skipping(threshold: float, max_tokens: int = MAX_TOKENS, ignore_eos: bool = True) -> SamplingParams:
    return SamplingParams(
        temperature=0, max_tokens=max_tokens, ignore_eos=ignore_eos,
        extra_args={"ffnskip": 1, "ffnskip_threshold": threshold},
    )


def preemptions(llm) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")


def results(outputs) -> list[tuple[list[int], dict | None]]:
    return [(list(o.outputs[0].token_ids), o.ffnskip) for o in outputs]


def test_preempted_requests_keep_tokens_and_exact_counts(llm):
    prompts = PROMPTS[:8]
    params = [skipping(0.95 + i / 200) for i in range(8)]
    alone = [results(llm.generate([p], q, use_tqdm=False))[0] for p, q in zip(prompts, params)]
    before = preemptions(llm)
    together = results(llm.generate(prompts, params, use_tqdm=False))
    assert preemptions(llm) - before > 0, "the KV cache was meant to force preemptions"
    for i, (batched, single) in enumerate(zip(together, alone)):
        assert batched[0] == single[0], f"request {i}: tokens changed under preemption"
        assert batched[1] == single[1], f"request {i}: counts changed under preemption"
        assert single[1]["ffn_blocks_evaluated"] == (MAX_TOKENS - 1) * LAYERS
    assert sum(r[1]["ffn_blocks_skipped"] for r in together) > 0


def test_request_ending_on_eos_counts_its_decode_tokens(llm):
    tokenizer = llm.get_tokenizer()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False, add_generation_prompt=True,
    )
    out = llm.generate([prompt], skipping(0.985, max_tokens=96, ignore_eos=False), use_tqdm=False)[0]
    generated = len(out.outputs[0].token_ids)
    assert out.outputs[0].finish_reason == "stop" and generated < 96
    assert out.ffnskip["ffn_blocks_evaluated"] == (generated - 1) * LAYERS


def test_chunked_prefill_request_matches_reference(llm, embedded_model):
    """A prompt of several steps' token budget: its chunks count nothing, its decode tokens
    skip and count as the single-sequence reference does."""
    tokenizer = llm.get_tokenizer()
    prompt_ids = tokenizer.encode(" ".join(PROMPTS * 3))[: 3 * STEP_TOKENS + 5]
    assert len(prompt_ids) > STEP_TOKENS
    max_tokens = 24
    out = llm.generate(
        [{"prompt_token_ids": prompt_ids}], skipping(0.96, max_tokens=max_tokens), use_tqdm=False
    )[0]
    policy = SkipPolicy(threshold=0.96, warmup=2, cold_start=2, cold_end=2, span=1)
    expected = SkipReference(embedded_model).generate(prompt_ids, max_tokens, policy)
    assert list(out.outputs[0].token_ids) == expected.token_ids
    assert (out.ffnskip["ffn_blocks_skipped"], out.ffnskip["ffn_blocks_evaluated"]) == (
        expected.skipped, expected.evaluated)
    assert expected.evaluated == (max_tokens - 1) * LAYERS and expected.skipped > 0
