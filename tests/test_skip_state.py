"""The skip driver and both request followers without an engine: the V1 tracker and the V2
model state (with stand-ins for V2's NewRequestData and InputBatch)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from vllm_ffnskip.policy import REQUEST_ID_KEY, RESOLVED_KEY, SkipPolicy
from vllm_ffnskip.skip_state import SkipState
from vllm_ffnskip.stats import STORE
from vllm_ffnskip.tracker import SkipPolicyTracker

LAYERS, HIDDEN, MAX_SLOTS, MAX_TOKENS = 6, 8, 4, 32
HOT_LAYERS = LAYERS - 2  # cold_start = cold_end = 1


class SmallMLP(nn.Module):
    """An FFN whose output barely turns the residual stream: every score passes 0.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.01 * x + 0.001


def params(request_id: str, warmup: int = 0, span: int = LAYERS) -> SamplingParams:
    policy = SkipPolicy(threshold=0.5, warmup=warmup, cold_start=1, cold_end=1, span=span)
    return SamplingParams(
        extra_args={RESOLVED_KEY: policy.to_wire(LAYERS), REQUEST_ID_KEY: request_id}
    )


def run_pass(state: SkipState, positions: list[int], form: str = "cond") -> torch.Tensor:
    """One pass over every layer, as the model runs it; returns the last layer's FFN output.
    With span = LAYERS, a token computes its first hot layer and skips every later one."""
    pos = torch.tensor(positions)
    x = torch.randn(len(positions), HIDDEN)
    state.begin_pass(len(positions), None)
    carry = state.begin_carry(pos)
    mlp = SmallMLP()
    for layer in range(LAYERS):
        out = state.step(layer, form, mlp, pos, x, x + 1.0, carry)
    state.end_pass(pos, skipped=True)
    return out


@pytest.fixture
def state() -> SkipState:
    STORE.pop_finished()
    return SkipState(MAX_SLOTS, MAX_TOKENS, LAYERS, range(LAYERS))


def buffer_addresses(state: SkipState) -> dict[str, int]:
    return {name: b.data_ptr() for name, b in state.named_buffers()}


# -- V1: the tracker ---------------------------------------------------------------------------


def test_re_added_request_counts_each_decode_token_once(state):
    """A request leaves the batch after 5 outputs and comes back (preempted: it recomputes
    prompt and outputs in one prefill). Its recomputed tokens may skip again, but only the
    tokens from its last output on count: over both stays, each decode token once."""
    prompt = 4
    tracker = SkipPolicyTracker(None, torch.device("cpu"), False)

    def step(positions: list[int]) -> bool:
        slots = tracker.batch_slots(1)
        routed = state.route(np.array([0, len(positions)]), slots, len(positions))
        if routed:
            run_pass(state, positions)
        return routed

    tracker.update_state(BatchUpdate(batch_size=1, added=[(0, params("re-added"), [1] * prompt, [])],
                                     removed=[], moved=[]))
    assert step(list(range(prompt)))  # prefill: routed, but nothing skips or counts
    assert state.snapshot() == {"re-added": {"skipped": 0, "evaluated": 0}}
    for n in range(4):  # decode tokens at positions prompt .. prompt + 3
        step([prompt + n])
    tracker.update_state(BatchUpdate(batch_size=0, added=[], removed=[0], moved=[]))
    outputs = [9] * 5  # five outputs generated; the fifth not yet fed back
    tracker.update_state(BatchUpdate(batch_size=1, added=[(0, params("re-added"), [1] * prompt, outputs)],
                                     removed=[], moved=[]))
    step(list(range(prompt + 5)))  # prompt + outputs, one prefill: only the last one counts
    step([prompt + 5])
    tracker.update_state(BatchUpdate(batch_size=0, added=[], removed=[0], moved=[]))
    counts = STORE.pop_finished(["re-added"])["re-added"]
    # Each counted token computes its first hot layer and skips the other hot ones.
    assert counts == {"evaluated": 6 * LAYERS, "skipped": 6 * (HOT_LAYERS - 1)}
    assert not tracker.rows and not state.requests


def test_v1_runs_the_skip_graph_only_where_it_can_save(state):
    """V1's host choice between the graphs. ``max_rows`` 0: any pass with an eligible token.
    Else only passes of at most ``max_rows`` rows, each an eligible decode token of a
    skipping request; a dense neighbour, a token in warm-up or a prefill chunk rules a pass
    out (a layer saves only when every row skips it). And a pass with at least ``wide_rows``
    eligible tokens, whatever its width (its layers gather the rows that run)."""
    prompt, warmup = 4, 1
    tracker = SkipPolicyTracker(None, torch.device("cpu"), False)
    added = [(0, params("a", warmup), [1] * prompt, []), (1, params("b", warmup), [1] * prompt, []),
             (2, SamplingParams(), [1] * prompt, [])]  # fmt: skip
    tracker.update_state(BatchUpdate(batch_size=3, added=added, removed=[], moved=[]))
    slots = tracker.batch_slots(3)
    assert slots[2] == state.no_slot and slots[0] != state.no_slot

    def skip_graph(
        positions: list[int], max_rows: int, rows: int | None = None, wide_rows: int = 0
    ) -> bool:
        rows = len(positions) if rows is None else rows
        qsl = np.arange(rows + 1) if rows == len(positions) else np.array([0, len(positions)])
        return state.runs_skip_graph(qsl, slots[:rows], np.array(positions), max_rows, wide_rows)

    eligible, in_warmup = prompt + warmup, prompt
    assert skip_graph([eligible], 1) and not skip_graph([in_warmup], 1)
    assert skip_graph([eligible, eligible], 0) and skip_graph([eligible, eligible], 2)
    assert not skip_graph([eligible, eligible], 1)  # wider than max_rows
    assert skip_graph([in_warmup, eligible], 0) and not skip_graph([in_warmup, eligible], 2)
    assert not skip_graph([eligible, eligible, eligible], 3)  # a dense neighbour
    assert skip_graph([eligible, eligible, eligible], 0)
    assert not skip_graph(list(range(eligible + 1)), 8, rows=1)  # a prefill chunk
    assert skip_graph(list(range(eligible + 1)), 0, rows=1)  # its last token is eligible
    # Wide passes: eligible tokens counted across rows, a dense neighbour or not.
    assert skip_graph([eligible, eligible + 3, eligible], 1, wide_rows=2)
    assert not skip_graph([in_warmup, eligible, eligible], 1, wide_rows=2)  # one eligible
    assert skip_graph([in_warmup, eligible, eligible], 1, wide_rows=1)
    # A recomputed request (prefill past its first eligible position): 2 of its tokens may skip.
    assert skip_graph(list(range(eligible + 2)), 1, rows=1, wide_rows=2)
    assert not skip_graph(list(range(eligible + 2)), 1, rows=1, wide_rows=3)


def test_moved_rows_keep_their_slots_and_counts(state):
    """V1 condenses and swaps rows; a request's slot (and its counters) stays with it."""
    tracker = SkipPolicyTracker(None, torch.device("cpu"), False)
    added = [(row, params(f"r{row}"), [1, 2, 3], []) for row in range(3)]
    tracker.update_state(BatchUpdate(batch_size=3, added=added, removed=[], moved=[]))
    slots = dict(tracker.rows)
    qsl = np.array([0, 1, 2, 3])
    state.route(qsl, tracker.batch_slots(3), 3)
    run_pass(state, [3, 3, 3])
    # r0 finishes; r2 moves into row 0; then rows 0 and 1 swap.
    tracker.update_state(BatchUpdate(batch_size=2, added=[], removed=[0],
                                     moved=[(2, 0, MoveDirectionality.UNIDIRECTIONAL),
                                            (0, 1, MoveDirectionality.SWAP)]))
    assert tracker.rows == {1: slots[2], 0: slots[1]}
    assert STORE.pop_finished(["r0"]) == {"r0": {"skipped": HOT_LAYERS - 1, "evaluated": LAYERS}}
    state.route(qsl[:3], tracker.batch_slots(2), 2)
    run_pass(state, [4, 4])
    assert state.snapshot() == {
        f"r{i}": {"skipped": 2 * (HOT_LAYERS - 1), "evaluated": 2 * LAYERS} for i in (1, 2)
    }
    # The freed slot is reused by the next request, with fresh counters.
    tracker.update_state(BatchUpdate(batch_size=3, added=[(2, params("r3"), [1], [])],
                                     removed=[], moved=[]))
    assert tracker.rows[2] == slots[0]
    assert state.snapshot()["r3"] == {"skipped": 0, "evaluated": 0}


# -- V2: the model state -----------------------------------------------------------------------


@pytest.fixture
def model_state(state, tiny_model_config):
    from vllm_ffnskip.model_state import FFNSkipModelState

    model = SimpleNamespace(skip_state=state)
    return FFNSkipModelState(tiny_model_config, model, None, torch.device("cpu"))


@pytest.fixture(scope="module")
def tiny_model_config(tmp_path_factory):
    from vllm.engine.arg_utils import EngineArgs

    from tests.tiny_llama import build

    model = build(tmp_path_factory.mktemp("tiny"))
    return EngineArgs(model=model, dtype="float32", max_model_len=256, enforce_eager=True,
                      max_num_seqs=MAX_SLOTS).create_engine_config()


def new_request(req_id: str, prompt: int, outputs: int = 0, skipping: bool = True):
    """Stand-in for V2's NewRequestData: what FFNSkipModelState and DefaultModelState read."""
    sampling = params(req_id) if skipping else SamplingParams(extra_args={REQUEST_ID_KEY: req_id})
    return SimpleNamespace(
        req_id=req_id, prompt_token_ids=[1] * prompt, prefill_token_ids=[1] * (prompt + outputs),
        sampling_params=sampling, mm_features=[], num_computed_tokens=0, prompt_embeds=None,
    )


def input_batch(req_ids: list[str], tokens: list[int], padded: int | None = None):
    """Stand-in for V2's InputBatch: batch order, tokens per request, CUDA-graph padding."""
    qsl = np.concatenate([[0], np.cumsum(tokens)])
    return SimpleNamespace(req_ids=req_ids, num_reqs=len(req_ids), query_start_loc_np=qsl,
                           num_tokens_after_padding=padded or int(qsl[-1]))


def test_model_state_follows_adds_removals_preemption_and_slot_reuse(state, model_state):
    addresses = buffer_addresses(state)
    model_state.add_request(2, new_request("a", prompt=3))
    model_state.add_request(0, new_request("dense", prompt=3, skipping=False))
    model_state.add_request(1, new_request("b", prompt=5))
    # Batch order differs from slot order; two padding tokens (a CUDA-graph size).
    model_state.prepare_inputs(input_batch(["b", "dense", "a"], [1, 1, 1], padded=5), None)
    assert state.token_slot[:6].tolist() == [1, state.no_slot, 2] + [state.no_slot] * 3
    run_pass(state, [5, 3, 3, 0, 0])
    assert state.snapshot() == {r: {"skipped": HOT_LAYERS - 1, "evaluated": LAYERS} for r in "ab"}
    # b is preempted and resumed in another slot with its 2 outputs: the recomputed tokens
    # are decided again, only the last one counts.
    model_state.remove_request("b")
    assert STORE.pop_finished(["b"]) == {"b": {"skipped": HOT_LAYERS - 1, "evaluated": LAYERS}}
    model_state.add_request(3, new_request("b", prompt=5, outputs=2))
    model_state.prepare_inputs(input_batch(["a", "b"], [1, 7]), None)
    run_pass(state, [4] + list(range(7)))
    assert state.snapshot()["b"] == {"skipped": HOT_LAYERS - 1, "evaluated": LAYERS}
    # a finishes; a new request reuses its slot with fresh counters and its own policy.
    model_state.remove_request("a")
    assert STORE.pop_finished(["a"])["a"] == {"skipped": 2 * (HOT_LAYERS - 1), "evaluated": 2 * LAYERS}
    model_state.add_request(2, new_request("c", prompt=2))
    assert state.snapshot()["c"] == {"skipped": 0, "evaluated": 0}
    model_state.remove_request("dense")  # never skipping: nothing recorded
    assert "dense" not in STORE.pop_finished(["dense"])
    assert buffer_addresses(state) == addresses  # written in place: captured graphs stay valid


def test_dummy_pass_runs_the_skip_graph_all_dense(state, model_state):
    """A capture/warm-up pass after real traffic routes every token nowhere: every row runs
    its FFN and no counter moves, whatever the positions."""
    model_state.add_request(0, new_request("a", prompt=1))
    model_state.prepare_inputs(input_batch(["a"], [1]), None)
    run_pass(state, [1])
    before = state.snapshot()
    model_state.prepare_dummy_inputs(num_reqs=4, num_tokens=8)
    assert state.token_slot.tolist() == [state.no_slot] * MAX_TOKENS
    pos = torch.arange(8) + 100
    x = torch.randn(8, HIDDEN)
    state.begin_pass(8, None)
    carry = state.begin_carry(pos)
    for layer in range(LAYERS):
        out = state.step(layer, "mask", SmallMLP(), pos, x, x + 1.0, carry)
        assert torch.equal(out, SmallMLP()(x)), layer
    state.end_pass(pos, skipped=True)
    assert state.snapshot() == before
    # A DP idle step's dummy batch carries request ids of its own: routed nowhere either.
    model_state.prepare_inputs(input_batch(["req_0_dummy"], [8]), None)
    assert state.token_slot.tolist() == [state.no_slot] * MAX_TOKENS


@pytest.mark.parametrize("form", ["cond", "gather", "mask", "kernel"])
def test_every_masked_mlp_form_gives_the_same_pass(state, form):
    """The four forms of the primitive, eagerly: equal outputs, equal counts."""
    from vllm_ffnskip.skip_state import RequestSkipState

    wire = params("r", span=1).extra_args[RESOLVED_KEY]
    state.admit(0, RequestSkipState.from_wire("r", 2, wire))
    state.route(np.array([0, 1, 2]), np.array([0, state.no_slot]), 2)
    pos = torch.tensor([2, 2])
    x = torch.randn(2, HIDDEN)
    mlp = nn.Module()
    mlp.gate_up_proj = SimpleNamespace(weight=torch.randn(2 * 16, HIDDEN) / 4)
    mlp.down_proj = SimpleNamespace(weight=torch.randn(HIDDEN, 16) / 4, reduce_results=True,
                                    tp_size=1)
    from vllm_ffnskip.kernels import dense_mlp

    mlp.forward = lambda h: dense_mlp(h, mlp.gate_up_proj.weight, mlp.down_proj.weight)
    state.begin_pass(2, None)
    carry = state.begin_carry(pos)
    outs = [state.step(layer, form, mlp, pos, x, 10 * x, carry) for layer in range(LAYERS)]
    state.end_pass(pos, skipped=True)
    dense = mlp.forward(x)
    skipped = carry["skipped"].tolist()
    assert skipped[1] == 0 and skipped[0] > 0  # span 1: skip every other hot layer
    for out in outs:
        assert torch.allclose(out[1], dense[1], atol=1e-6)  # the dense row always runs
        assert torch.equal(out[0], torch.zeros(HIDDEN)) or torch.allclose(out[0], dense[0], atol=1e-6)
    assert state.snapshot() == {"r": {"skipped": skipped[0], "evaluated": LAYERS}}


def test_built_under_a_device_context_stages_routes_on_the_host():
    """vLLM builds the model under ``with torch.device(<accelerator>)``: the buffers go there,
    the routing staging copy stays on the host (on CUDA a pinned tensor cannot be made under
    that context: every GPU server failed at start, seen on an H200 on 2026-12-04)."""
    with torch.device("meta"):
        on_device = SkipState(MAX_SLOTS, MAX_TOKENS, LAYERS, range(LAYERS))
    assert on_device.token_slot.is_meta
    assert on_device._host_token_slot.device.type == "cpu"
    assert on_device.route(np.array([0, 1, 2]), np.array([1, on_device.no_slot]), 2)
    assert on_device._host_token_slot[:2].tolist() == [1, on_device.no_slot]


@pytest.mark.parametrize("form", ["cond", "gather", "mask"])
def test_compiled_pass_skips_as_eager(state, form):
    """A whole stage traced by Dynamo (as vLLM compiles the model) skips and counts exactly
    as it does eagerly. Guards the carry's form: written as attributes of an object, the
    budgets were lost across ``torch.cond`` and the compiled pass skipped nothing."""
    from vllm_ffnskip.skip_state import RequestSkipState

    wire = params("r", span=1).extra_args[RESOLVED_KEY]
    state.admit(0, RequestSkipState.from_wire("r", 2, wire))
    state.route(np.array([0, 1, 2]), np.array([0, state.no_slot]), 2)
    pos = torch.tensor([2, 2])
    x = torch.randn(2, HIDDEN)
    mlp = SmallMLP()

    def stage(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        carry = state.begin_carry(pos)
        h = x
        for layer in range(LAYERS):
            h = h + state.step(layer, form, mlp, pos, h, h + 1.0, carry)
        return h

    counts = []
    for run in (stage, torch.compile(stage, backend="eager", fullgraph=True)):
        before = state.slot_skipped[0].item()
        state.begin_pass(2, None)
        out = run(x, pos)
        counts.append((state.slot_skipped[0].item() - before, out))
    (eager_skips, eager_out), (compiled_skips, compiled_out) = counts
    assert eager_skips == HOT_LAYERS // 2  # span 1: every other hot layer
    assert compiled_skips == eager_skips
    assert torch.equal(compiled_out, eager_out)
