"""Dense passes run vLLM's own compiled graph (DenseLlamaModel), so dense requests stay
token-identical to vanilla vLLM even in bf16 compiled mode, where rounding depends on what
inductor fuses. Before the dense graph, 5 of these 10 prompts diverged within 32 tokens."""

from __future__ import annotations

from vllm import SamplingParams

from tests.conftest import PROMPTS, close_llm, make_llm

MAX_TOKENS = 32


def generate(model: str, model_impl: str, xargs: dict | None) -> list[list[int]]:
    llm = make_llm(model, model_impl=model_impl, dtype="bfloat16", enforce_eager=False)
    try:
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True,
                                extra_args=xargs)
        return [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params)]
    finally:
        close_llm(llm)  # one engine at a time


def test_bf16_compiled_dense_requests_match_vanilla(embedded_model):
    vanilla = generate(embedded_model, "vllm", None)
    assert generate(embedded_model, "ffnskip", {"ffnskip": 0}) == vanilla
