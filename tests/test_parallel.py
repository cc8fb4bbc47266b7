"""FFN skipping under tensor and pipeline parallelism, and in vLLM's compiled mode (CPU).

The embedded model's 9 query heads cannot be split over 2 ranks, so these tests serve the
tiny random LLaMa of ``tests/tiny_llama.py`` (4 query / 2 KV heads, 8 layers). Every
engine configuration is started once per module, runs the same three workloads, hands its
results and per-rank skip counters over and is shut down before the next one starts (the
test machine has 2 cores; one engine at a time). Comparisons are exact: token ids, and
skip counters per request and per rank. The independent transformers reference of the rule
(``tests/reference.py``) is the oracle for the skipping outputs and counts.

See docs/parallelism.md for why the ranks agree and for what was measured here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from vllm import SamplingParams

from tests.conftest import close_llm, make_llm
from tests.tiny_llama import NUM_LAYERS, SKIP_THRESHOLD, build, prompts
from vllm_ffnskip.policy import SkipPolicy

MAX_TOKENS = 16
#: Two policies, so a batch mixes thresholds and spans; cold 1/1 leaves hot layers 1..6.
POLICIES = [
    SkipPolicy(threshold=SKIP_THRESHOLD, warmup=2, cold_start=1, cold_end=1, span=1),
    SkipPolicy(threshold=0.99, warmup=3, cold_start=1, cold_end=1, span=2),
]
SKIP_PROMPTS = prompts(6, seed=0)
MIXED_PROMPTS = prompts(8, seed=1)

#: Engine configurations. The 2-worker ones pin one OpenMP thread per rank.
CONFIGS: dict[str, dict[str, Any]] = {
    "tp1": {"tensor_parallel_size": 1, "enforce_eager": True},
    "tp2": {"tensor_parallel_size": 2, "enforce_eager": True},
    "compiled": {"tensor_parallel_size": 1, "enforce_eager": False},
    # Eager PP=2 dies at its first request in vLLM 0.32's CPU runner (see docs/parallelism.md);
    # the compiled mode warms up the model, which allocates the intermediate-tensor buffers.
    "pp2": {"pipeline_parallel_size": 2, "enforce_eager": False},
}


#: Environment of an engine configuration's processes. The PP=2 stages see what a worker on
#: another node sees: the API server's metrics directory (vLLM's multiprocess Prometheus
#: directory, on the API server's node) does not exist there. Skip counts must not depend
#: on it (they reach /metrics through the API server, see vllm_ffnskip/metrics.py).
ENVIRONMENTS: dict[str, dict[str, str]] = {
    "pp2": {"PROMETHEUS_MULTIPROC_DIR": "/nonexistent/api-server-node/prometheus"},
}


def xargs(policy: SkipPolicy | None) -> dict[str, Any]:
    if policy is None:
        return {"ffnskip": 0}
    return {
        "ffnskip": 1,
        "ffnskip_threshold": policy.threshold,
        "ffnskip_warmup": policy.warmup,
        "ffnskip_cold_start": policy.cold_start,
        "ffnskip_cold_end": policy.cold_end,
        "ffnskip_span": policy.span,
    }


def greedy(policy: SkipPolicy | None) -> SamplingParams:
    return SamplingParams(
        temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, extra_args=xargs(policy)
    )


#: workload -> (prompts, policy per request; None = dense)
WORKLOADS: dict[str, tuple[list[dict], list[SkipPolicy | None]]] = {
    "skip": (SKIP_PROMPTS, [POLICIES[i % 2] for i in range(len(SKIP_PROMPTS))]),
    "dense": (MIXED_PROMPTS, [None] * len(MIXED_PROMPTS)),
    "mixed": (
        MIXED_PROMPTS,
        [None if i % 2 == 0 else POLICIES[(i // 2) % 2] for i in range(len(MIXED_PROMPTS))],
    ),
}


def _serve(model: str, config: dict[str, Any], env: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Starts one engine, runs every workload, returns tokens and every rank's counters."""
    world = config.get("tensor_parallel_size", 1) * config.get("pipeline_parallel_size", 1)
    with pytest.MonkeyPatch.context() as environment:  # read by the workers, spawned now
        if world == 2:
            environment.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
        else:
            environment.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)  # "auto": one worker
        for key, value in env.items():
            environment.setenv(key, value)
        llm = make_llm(
            model,
            model_impl="ffnskip",
            skip_tokenizer_init=True,
            max_model_len=256,
            max_num_seqs=8,
            additional_config={"ffnskip": {"enabled": False, "max_skip_rows": 0}},
            **config,
        )
    try:
        results = {}
        for name, (batch, policies) in WORKLOADS.items():
            outputs = llm.generate(batch, [greedy(p) for p in policies], use_tqdm=False)
            results[name] = {
                "tokens": [list(o.outputs[0].token_ids) for o in outputs],
                "request_ids": [o.request_id for o in outputs],
                # One dict per worker rank (rank = pp_rank * tp + tp_rank).
                "ranks": llm.collective_rpc("ffnskip_stats"),
            }
        return results
    finally:
        close_llm(llm)


@pytest.fixture(scope="module")
def tiny_model() -> str:
    return build()


@pytest.fixture(scope="module")
def served(tiny_model: str) -> Iterator[Callable[..., dict[str, dict[str, Any]]]]:
    """``served(name)``: the results of configuration ``name``, serving it on first use;
    ``served(name, start=2)``: those of a second engine of it, started after the first one
    had filled vLLM's compile cache (as a restarted server finds it)."""
    cache: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}

    def get(name: str, start: int = 1) -> dict[str, dict[str, Any]]:
        for n in range(1, start + 1):
            if (name, n) not in cache:
                cache[name, n] = _serve(tiny_model, CONFIGS[name], ENVIRONMENTS.get(name, {}))
        return cache[name, start]

    yield get


@pytest.fixture(scope="module")
def reference(tiny_model: str):
    from tests.reference import SkipReference

    return SkipReference(tiny_model)


def expected(reference, workload: str) -> list[Any]:
    """The reference's output per request of ``workload`` (None for dense requests)."""
    batch, policies = WORKLOADS[workload]
    return [
        None if p is None else reference.generate(b["prompt_token_ids"], MAX_TOKENS, p)
        for b, p in zip(batch, policies)
    ]


def request_counts(result: dict[str, Any], rank: int = 0) -> list[dict[str, int] | None]:
    """Per request of the workload (in prompt order): its counters on ``rank``."""
    stats = result["ranks"][rank]["requests"]
    return [stats.get(rid) for rid in result["request_ids"]]


def assert_matches_reference(result: dict[str, Any], refs: list[Any], ranks=(0,)) -> int:
    """Skipping requests: tokens and counters (summed over ``ranks``, the pipeline stages)
    equal the reference's. Returns the number of FFN blocks skipped."""
    skipped = 0
    for i, ref in enumerate(refs):
        if ref is None:
            continue
        assert result["tokens"][i] == ref.token_ids, f"request {i}"
        counts = [request_counts(result, r)[i] for r in ranks]
        assert all(c is not None for c in counts), f"request {i}: no counters"
        total = {k: sum(c[k] for c in counts) for k in ("skipped", "evaluated")}
        assert total == {"skipped": ref.skipped, "evaluated": ref.evaluated}, f"request {i}"
        skipped += ref.skipped
    return skipped


def skip_ratio(result: dict[str, Any]) -> float:
    counts = [c for c in request_counts(result) if c is not None]
    evaluated = sum(c["evaluated"] for c in counts)
    return sum(c["skipped"] for c in counts) / evaluated if evaluated else 0.0


# --- tensor parallel -------------------------------------------------------------------


def test_tp1_matches_reference(served, reference):
    """The oracle check the TP comparison builds on: TP=1 skips exactly like the reference."""
    tp1 = served("tp1")
    assert assert_matches_reference(tp1["skip"], expected(reference, "skip")) > 0
    assert assert_matches_reference(tp1["mixed"], expected(reference, "mixed")) > 0
    assert skip_ratio(tp1["skip"]) > 0.1


def test_tp2_matches_tp1(served, reference):
    """TP=2 vs TP=1 (eager): same tokens and the same per-request counters, for every
    workload; the skipping ones also equal the reference."""
    tp1, tp2 = served("tp1"), served("tp2")
    for name in WORKLOADS:
        assert tp2[name]["tokens"] == tp1[name]["tokens"], name
        assert request_counts(tp2[name]) == request_counts(tp1[name]), name
    assert assert_matches_reference(tp2["skip"], expected(reference, "skip")) > 0
    assert skip_ratio(tp2["skip"]) == skip_ratio(tp1["skip"]) > 0.1


def test_tp2_ranks_count_identically(served):
    """Both TP ranks hold identical counters (per request, totals, request count): the
    check that fails if ranks ever decide differently (their gathered row counts would
    then differ too, and the row-parallel all-reduce would hang or mix rows)."""
    tp2 = served("tp2")
    for name in WORKLOADS:
        rank0, rank1 = tp2[name]["ranks"]
        assert rank0 == rank1, name
    assert tp2["skip"]["ranks"][0]["total"]["skipped"] > 0


def test_tp2_mixed_batch(served):
    """Under TP=2, dense requests batched with skipping ones equal TP=1's all-dense batch;
    the skipping ones equal TP=1's mixed batch and do skip."""
    tp1, tp2 = served("tp1"), served("tp2")
    _, policies = WORKLOADS["mixed"]
    mixed = tp2["mixed"]
    counts = request_counts(mixed)
    for i, policy in enumerate(policies):
        if policy is None:
            assert mixed["tokens"][i] == tp1["dense"]["tokens"][i], f"dense request {i}"
            assert counts[i] is None or counts[i]["skipped"] == 0, f"dense request {i}"
        else:
            assert mixed["tokens"][i] == tp1["mixed"]["tokens"][i], f"skipping request {i}"
            assert counts[i]["skipped"] > 0, f"skipping request {i}"
    assert tp2["dense"]["ranks"][0]["total"] == tp2["dense"]["ranks"][1]["total"]


# --- compiled mode ---------------------------------------------------------------------


def test_compiled_matches_eager(served):
    """vLLM's default (compiled) mode vs enforce_eager, TP=1: same tokens, same counters."""
    eager, compiled = served("tp1"), served("compiled")
    for name in WORKLOADS:
        assert compiled[name]["tokens"] == eager[name]["tokens"], name
        assert request_counts(compiled[name]) == request_counts(eager[name]), name
    assert skip_ratio(compiled["skip"]) == skip_ratio(eager["skip"]) > 0.1


# --- pipeline parallel -----------------------------------------------------------------


def test_pp2_matches_tp1(served, reference):
    """PP=2 (compiled): dense outputs equal TP=1's; skipping outputs and the counters summed
    over both stages equal the reference — skip runs cross the stage boundary (the budget
    travels in IntermediateTensors)."""
    pp2, tp1 = served("pp2"), served("tp1")
    assert pp2["dense"]["tokens"] == tp1["dense"]["tokens"]
    assert pp2["skip"]["tokens"] == tp1["skip"]["tokens"]
    assert assert_matches_reference(pp2["skip"], expected(reference, "skip"), ranks=(0, 1)) > 0
    refs = expected(reference, "mixed")
    assert assert_matches_reference(pp2["mixed"], refs, ranks=(0, 1)) > 0
    for i, ref in enumerate(refs):
        if ref is None:  # dense requests of the mixed batch
            assert pp2["mixed"]["tokens"][i] == tp1["dense"]["tokens"][i], f"request {i}"
    for rank in (0, 1):  # each stage counts its own layers, and each request once
        for c in request_counts(pp2["skip"], rank):
            assert c["evaluated"] == (MAX_TOKENS - 1) * NUM_LAYERS // 2
        # The first workload; PP's batch queue drops and re-adds requests between steps.
        assert pp2["skip"]["ranks"][rank]["requests_skipping"] == len(SKIP_PROMPTS)


# --- restarts ---------------------------------------------------------------------------


def test_restart_on_a_warm_compile_cache(served):
    """The PP=2 engine started a second time, on the compile cache its first start left
    (every graph of each pipeline stage loaded from disk: the skip and the dense graph, under
    the stage-keyed compile key): it starts, and it serves exactly what the first one did,
    tokens and per-rank counters. The one-stage compiled engine loads its graphs through the
    same path, so its restart (72 s of a cold CI run) is not repeated; eager engines keep no
    cache, so a restart of one tests nothing the first start did not."""
    first, second = served("pp2"), served("pp2", start=2)
    for workload in WORKLOADS:
        assert second[workload]["tokens"] == first[workload]["tokens"], workload
        for rank, (a, b) in enumerate(zip(first[workload]["ranks"], second[workload]["ranks"])):
            assert a["total"] == b["total"], (workload, rank)
            assert request_counts(second[workload], rank) == request_counts(
                first[workload], rank), (workload, rank)
