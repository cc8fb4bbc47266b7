"""FFN skipping through vLLM's offline API on the embedded model (real engines, CPU).

One vanilla engine (``--model-impl vllm``) and one ffnskip engine whose server default is
off, shared by the whole module; every comparison is exact token equality. All eager: the
compiled skip graph is checked against eager and the reference on the tiny model
(tests/test_parallel.py), which compiles in a fraction of this model's time.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from vllm import SamplingParams

from tests.conftest import PROMPTS, close_llm, make_llm
from tests.reference import SkipReference
from vllm_ffnskip.masked_mlp import FORM_ENV
from vllm_ffnskip.policy import SkipPolicy
from vllm_ffnskip.stats import collect_request_stats

MAX_TOKENS = 24
ABORTED = 100
LAYERS = 30  # the embedded model
#: The rule in every pass (max_skip_rows 0): these tests compare its decisions exactly.
RULE_EXACT = {"enabled": False, "warmup": 2, "cold_start": 2, "cold_end": 2, "max_skip_rows": 0}


def greedy(xargs: dict | None = None, max_tokens: int = MAX_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, extra_args=xargs)


def token_ids(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.fixture(scope="module")
def skip_llm(embedded_model: str) -> Iterator[object]:
    llm = make_llm(
        embedded_model,
        model_impl="ffnskip",
        additional_config={"ffnskip": RULE_EXACT},
    )
    yield llm
    close_llm(llm)


@pytest.fixture(scope="module")
def vanilla_ids(vanilla_llm) -> list[list[int]]:
    return token_ids(vanilla_llm.generate(PROMPTS, greedy()))


def test_dense_requests_match_vanilla(skip_llm, vanilla_ids):
    """Server default off, and a per-request opt-out: both token-identical to vanilla."""
    assert len(PROMPTS) >= 8
    assert token_ids(skip_llm.generate(PROMPTS, greedy())) == vanilla_ids
    outputs = skip_llm.generate(PROMPTS, greedy({"ffnskip": 0}))
    assert token_ids(outputs) == vanilla_ids
    assert all(o.ffnskip is None for o in outputs)
    stats = collect_request_stats(skip_llm)
    assert all(s["skipped"] == 0 for s in stats["requests"].values())


def test_skipping_matches_single_sequence_reference(skip_llm, embedded_model):
    """The batched implementation reproduces the plain-transformers reference of the rule."""
    assert_matches_reference(skip_llm, embedded_model)


def assert_matches_reference(llm, embedded_model: str) -> None:
    policy = SkipPolicy(threshold=0.96, warmup=2, cold_start=2, cold_end=2, span=1)
    xargs = {"ffnskip": 1, "ffnskip_threshold": 0.96}
    prompts = PROMPTS[:4]
    outputs = llm.generate(prompts, greedy(xargs))
    stats = collect_request_stats(llm)["requests"]
    reference = SkipReference(embedded_model)
    tokenizer = llm.get_tokenizer()
    total_skipped = 0
    for prompt, out in zip(prompts, outputs):
        expected = reference.generate(tokenizer.encode(prompt), MAX_TOKENS, policy)
        assert list(out.outputs[0].token_ids) == expected.token_ids, prompt
        assert stats[out.request_id] == {
            "skipped": expected.skipped,
            "evaluated": expected.evaluated,
        }, prompt
        assert (out.ffnskip["ffn_blocks_skipped"], out.ffnskip["ffn_blocks_evaluated"]) == (
            expected.skipped, expected.evaluated), prompt
        total_skipped += expected.skipped
    assert total_skipped > 0  # the comparison exercised skipping


@pytest.fixture(scope="module")
def mask_form_llm(embedded_model: str) -> Iterator[object]:
    """An engine running the GPU's graph on the CPU: the rule with a fixed-shape masked MLP,
    no torch.cond (the module's MLP in place of the GPU's kernel op, masked_mlp.py)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv(FORM_ENV, "mask")  # read by the engine's worker, spawned now
        llm = make_llm(embedded_model, model_impl="ffnskip", additional_config={
            "ffnskip": RULE_EXACT})
    yield llm
    close_llm(llm)


def test_mask_form_matches_reference(mask_form_llm, embedded_model):
    """The graph used on GPUs follows the same rule, token for token and count for count."""
    assert_matches_reference(mask_form_llm, embedded_model)


def test_mask_form_equals_cond_form_in_mixed_batches(mask_form_llm, skip_llm):
    params = [greedy({"ffnskip": 0} if i % 3 == 0 else {
        "ffnskip": 1, "ffnskip_threshold": 0.95 + i / 200, "ffnskip_span": 1 + i % 2})
        for i in range(8)]
    results = []
    for llm in (skip_llm, mask_form_llm):
        outputs = llm.generate(PROMPTS[:8], params)
        stats = collect_request_stats(llm)["requests"]
        counts = [stats.get(o.request_id, {}).get("skipped", 0) for o in outputs]
        results.append((token_ids(outputs), counts))
    assert results[0] == results[1]
    assert sum(results[0][1]) > 0


def test_mixed_batch(skip_llm, vanilla_ids):
    """8 concurrent requests, half dense, half skipping at different thresholds: dense ones
    equal vanilla, skipping ones equal their output when served alone."""
    thresholds = [0.95, 0.96, 0.97, 0.98]
    params = []
    for i in range(8):
        params.append(greedy({"ffnskip": 0} if i % 2 == 0 else {
            "ffnskip": 1, "ffnskip_threshold": thresholds[i // 2]}))
    prompts = PROMPTS[:8]
    batched = token_ids(skip_llm.generate(prompts, params))
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        if i % 2 == 0:
            assert batched[i] == vanilla_ids[i], prompt
        else:
            alone = token_ids(skip_llm.generate([prompt], p))[0]
            assert batched[i] == alone, prompt
    stats = collect_request_stats(skip_llm)
    assert stats["total"]["skipped"] > 0


def test_prefix_cache_keeps_policies_apart(skip_llm, vanilla_llm):
    """A dense request whose prompt holds a skipping request's prompt and reply gets no KV
    computed under skipping; a skipping request still hits dense prompt blocks."""
    block = skip_llm.llm_engine.vllm_config.cache_config.block_size
    tokenizer = skip_llm.get_tokenizer()
    question = tokenizer.decode(tokenizer.encode(" ".join(PROMPTS * 8))[: 2 * block + block // 2])
    turn1 = skip_llm.generate(
        [question], greedy({"ffnskip": 1, "ffnskip_threshold": 0.95}, block)
    )[0]
    prompt_len = len(turn1.prompt_token_ids)
    assert prompt_len + block >= 3 * block  # turn 1 filled a block holding reply tokens
    follow_up = list(turn1.prompt_token_ids) + list(turn1.outputs[0].token_ids)
    follow_up += tokenizer.encode(" Say it again in French:", add_special_tokens=False)
    prompt = {"prompt_token_ids": follow_up}
    dense = skip_llm.generate([prompt], greedy({"ffnskip": 0}))[0]
    expected = vanilla_llm.generate([prompt], greedy())[0]
    assert list(dense.outputs[0].token_ids) == list(expected.outputs[0].token_ids)
    # The dense request re-used turn 1's prompt-only blocks, and not the block that holds
    # KV computed while turn 1 was skipping.
    assert dense.num_cached_tokens == (prompt_len // block) * block > 0
    # A skipping request with another policy still hits the dense prompt blocks.
    again = skip_llm.generate([question], greedy({"ffnskip": 1, "ffnskip_threshold": 0.97}))[0]
    assert again.num_cached_tokens == (prompt_len // block) * block


def test_aborted_requests_free_their_skip_state(skip_llm):
    """A hundred requests aborted mid-generation leave no skip state behind: each one's
    state is released (its counters recorded) and nothing stays in the tracker."""
    engine = skip_llm.llm_engine
    prompt = {"prompt_token_ids": skip_llm.get_tokenizer().encode(PROMPTS[0])}
    params = greedy({"ffnskip": 1, "ffnskip_threshold": 0.95, "ffnskip_warmup": 0}, 64)
    collect_request_stats(skip_llm)
    for i in range(ABORTED):
        engine.add_request(f"abort-{i}", prompt, params)
        engine.step()  # prefill
        engine.step()  # a decode step that may skip
        engine.abort_request([f"abort-{i}"])
    while engine.has_unfinished_requests():
        engine.step()
    skip_llm.generate([PROMPTS[1]], greedy({"ffnskip": 0}, 2))  # a step after the aborts
    stats = collect_request_stats(skip_llm)
    assert stats["in_batch"] == 0
    aborted = {k: v for k, v in stats["requests"].items() if k.startswith("abort-")}
    assert len(aborted) == ABORTED
    assert sum(r["evaluated"] for r in aborted.values()) > 0  # they were decoding


def test_wide_passes_run_the_dense_graph(embedded_model, vanilla_ids):
    """The default ``max_skip_rows``: a skipping request skips alone; beside dense requests
    every pass is wider than that, so the dense graph runs it: its tokens equal vanilla's and
    its blocks count as evaluated, none as skipped. (It is added first, so it never runs a
    step with fewer rows: the offline engine may start a step before the last request is in.)"""
    from vllm_ffnskip.policy import DEFAULT_MAX_SKIP_ROWS

    width = DEFAULT_MAX_SKIP_ROWS + 1
    xargs = {"ffnskip": 1, "ffnskip_threshold": 0.96}
    llm = make_llm(embedded_model, model_impl="ffnskip",
                   additional_config={"ffnskip": {"enabled": False}})  # fmt: skip
    try:
        alone = llm.generate(PROMPTS[:1], greedy(xargs))[0]
        assert alone.ffnskip["ffn_blocks_skipped"] > 0
        assert list(alone.outputs[0].token_ids) != vanilla_ids[0]
        wide = llm.generate(PROMPTS[:width], [greedy(xargs)] + [greedy({"ffnskip": 0})] * (width - 1))
        assert token_ids(wide) == vanilla_ids[:width]
        counts = wide[0].ffnskip
        assert (counts["ffn_blocks_skipped"], counts["ffn_blocks_evaluated"]) == (
            0, (MAX_TOKENS - 1) * LAYERS)
    finally:
        close_llm(llm)

