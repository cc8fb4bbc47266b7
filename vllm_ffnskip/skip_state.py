"""The per-layer skip driver, one for every platform and model runner.

The rule of docs/algorithm.md runs as fixed-shape tensor ops inside the model's compiled
graph. Its state lives in persistent buffers of ``SkipState``, written in place:

* per slot (one per request in vLLM's batch; the last slot, ``no_slot``, is "no skipping
  request"): the request's hot layers, thresholds, span, first eligible position (prompt
  length + warm-up), first counted position, and its skip counters;
* per token of the pass: its slot (``token_slot``, the pass's one host-to-device copy) and
  its skip budget on entering the stage (``budget``: zero, or the previous pipeline stage's).

Within a pass the layers hand the rule's per-token values (budgets, skips so far) to each
other as traced values in a ``PassCarry``, not through those buffers: a buffer written per
layer is a write of the whole ``max_tokens`` buffer per layer in inductor's code, since the
pass's size is symbolic. The stage's last layer writes them out (counts, outgoing budgets).

Eligibility (a decode token past warm-up) comes from the token positions on the device, so
no per-pass host decision enters the graph and CUDA graphs replay it as captured. A layer's
FFN is ``masked_mlp`` (masked_mlp.py), the one primitive that differs between platforms.
After the pass, skips and evaluated blocks are added into the slots' counters on the device;
they are read when a request leaves the batch (and by ``snapshot``), which on the CPU costs
nothing and on CUDA costs one copy per request, not one per pass.

Who fills the slots: vLLM's V1 runner (the CPU) through the logits-processor tracker
(tracker.py), the V2 runner (CUDA's default) through the model state (model_state.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar, TypedDict

import numpy as np
import torch
from torch import nn

from vllm_ffnskip.masked_mlp import masked_mlp
from vllm_ffnskip.stats import RECORDER, STORE

#: Larger than any position: the first eligible / counted position of a slot that never skips.
NEVER = 1 << 62


def rule_step(
    hot: torch.Tensor,
    skip: torch.Tensor,
    budget: torch.Tensor,
    residual: torch.Tensor,
    ffn_out: torch.Tensor,
    thresholds: torch.Tensor,
    span: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FFN-SkipLLM's rule after one layer (docs/algorithm.md): the tokens' next skip budgets
    and their saturation scores cos(h, h + f), in float32, as fixed-shape tensor ops.

    A skipped hot layer spends one of the budget, a computed hot layer sets it to ``span``
    when its score reaches the threshold (else 0), a cold layer clears it.
    """
    h = residual.float()
    s = h + ffn_out.float()
    norms = (h * h).sum(-1) * (s * s).sum(-1)
    score = (h * s).sum(-1) / norms.clamp_min(1e-16).sqrt()
    tested = torch.where(score >= thresholds, span, 0)
    return torch.where(hot, torch.where(skip, budget - 1, tested), 0), score


class PassCarry(TypedDict):
    """The rule's per-token values that one layer of a pass hands the next, as traced values:
    opened by the model's forward (``SkipState.begin_carry``), passed to every decoder layer.
    What does not change between layers is gathered from the slots once per pass.

    A dict, not an object with attributes: torch 2.13's Dynamo drops an attribute written on
    a Python object when a ``torch.cond`` (the CPU's MLP forms) sits between the writes (the
    compiled graph then skipped nothing), while a dict's items survive
    (tests/test_skip_state.py::test_compiled_pass_skips_as_eager)."""

    slot: torch.Tensor  # [T] int64: the tokens' slots
    eligible: torch.Tensor  # [T] bool: decode tokens past their request's warm-up
    span: torch.Tensor  # [T] int32: the budget a passed test sets
    budget: torch.Tensor  # [T] int32: skips left in the current run
    skipped: torch.Tensor  # [T] int32: FFN blocks skipped in this stage so far


@dataclass
class RequestSkipState:
    """One skipping request's resolved policy, for the stay it is in the batch."""

    request_id: str
    prompt_len: int
    thresholds: np.ndarray  # [num_layers] float32
    warmup: int
    cold_start: int
    cold_end: int
    span: int
    #: First position whose FFN blocks this stay counts. A request that re-enters the batch
    #: (it was not scheduled for a step, or was preempted and is recomputed) carries its
    #: outputs so far; the blocks of the tokens before its last one were counted in an
    #: earlier stay. They are decided again by the same rule (so the recomputed KV equals
    #: the first one) but not counted twice.
    counted_from: int = 0

    @classmethod
    def from_wire(
        cls, request_id: str, prompt_len: int, wire: dict[str, Any], num_outputs: int = 0
    ) -> RequestSkipState:
        """``num_outputs``: tokens the request had generated when it (re-)entered the batch."""
        return cls(
            request_id=request_id,
            prompt_len=prompt_len,
            counted_from=prompt_len + max(num_outputs - 1, 0),
            thresholds=np.asarray(wire["thresholds"], dtype=np.float32),
            warmup=int(wire["warmup"]),
            cold_start=int(wire["cold_start"]),
            cold_end=int(wire["cold_end"]),
            span=int(wire["span"]),
        )

    @property
    def first_eligible(self) -> int:
        """The first position that may skip: the first decode token past the warm-up."""
        return self.prompt_len + self.warmup

    @cached_property
    def hot_layers(self) -> np.ndarray:
        """[num_layers] bool: the layers outside this request's cold regions."""
        layers = np.arange(len(self.thresholds))
        return (layers >= self.cold_start) & (layers < len(layers) - self.cold_end)


class SkipState(nn.Module):
    """The skip state of one model (one pipeline stage), shared by its decoder layers.

    Token buffers are sized for vLLM's largest pass (``max_num_batched_tokens``); a pass
    uses their first ``T`` rows. ``score[t, l]`` is the saturation score of token ``t`` at
    layer ``l`` where it was tested, NaN elsewhere; it exists only in a process that records
    scores for the profiler (``RECORDER.enabled``), whose graphs carry that in their compile
    key (patches/model_impl.compile_key). Written in every pass, it cost 1-2% of a batch-1
    pass on the CPU (benchmarks/graph_ab.py): inductor rewrote the whole ``max_tokens`` x
    layers buffer once per pass, choosing each element's layer among all of them.
    """

    #: The skip state of this worker process (one model per vLLM worker process).
    current: ClassVar[SkipState | None] = None

    def __init__(self, max_slots: int, max_tokens: int, num_layers: int, stage_layers: range):
        super().__init__()
        self.no_slot = max_slots
        self.num_layers = num_layers
        self.stage_layers = stage_layers
        slots = max_slots + 1

        def buffer(name: str, shape: tuple[int, ...], dtype: torch.dtype, fill: Any) -> None:
            self.register_buffer(name, torch.full(shape, fill, dtype=dtype), persistent=False)

        buffer("slot_hot", (slots, num_layers), torch.bool, False)
        buffer("slot_thresholds", (slots, num_layers), torch.float32, 1.0)
        buffer("slot_start", (slots,), torch.int64, NEVER)
        buffer("slot_counted_from", (slots,), torch.int64, NEVER)
        buffer("slot_span", (slots,), torch.int32, 0)
        buffer("slot_skipped", (slots,), torch.int64, 0)
        buffer("slot_evaluated", (slots,), torch.int64, 0)
        buffer("token_slot", (max_tokens,), torch.int64, self.no_slot)
        buffer("budget", (max_tokens,), torch.int32, 0)
        if RECORDER.enabled:
            buffer("score", (max_tokens, num_layers), torch.float32, 0.0)
        #: Host side: the admitted requests by slot, and the staging copy of ``token_slot``
        #: (pinned where the device is an accelerator, so its copy does not block).
        self.requests: dict[int, RequestSkipState] = {}
        device = self.token_slot.device
        # On the host whatever the default device: vLLM builds the model under
        # ``with torch.device("cuda")``, where a pinned tensor could not be made at all.
        self._host_token_slot = torch.full(
            (max_tokens,), self.no_slot, dtype=torch.int64, device="cpu",
            pin_memory=device.type == "cuda",
        )
        #: Leading entries of token_slot that may name a request's slot (0: none).
        self.routed = 0
        self._copied: torch.cuda.Event | None = None  # the last copy out of the staging buffer
        self._last_route: tuple[np.ndarray, np.ndarray] = (np.empty(0), np.empty(0))
        SkipState.current = self

    # -- slots: written when a request enters or leaves the batch --------------------------

    def admit(self, slot: int, state: RequestSkipState) -> None:
        """A skipping request entered the batch in ``slot``."""
        if slot in self.requests:
            self.release(slot)
        self.requests[slot] = state
        device = self.slot_hot.device
        self.slot_hot[slot].copy_(torch.from_numpy(state.hot_layers).to(device, non_blocking=True))
        self.slot_thresholds[slot].copy_(
            torch.from_numpy(state.thresholds).to(device, non_blocking=True)
        )
        self.slot_start[slot] = state.first_eligible
        self.slot_counted_from[slot] = state.counted_from
        self.slot_span[slot] = state.span
        self.slot_skipped[slot] = 0
        self.slot_evaluated[slot] = 0

    def release(self, slot: int) -> None:
        """The request in ``slot`` left the batch: its counts go to the store, the slot stops
        skipping and counting."""
        state = self.requests.pop(slot, None)
        if state is None:
            return
        skipped, evaluated = torch.stack(
            (self.slot_skipped[slot], self.slot_evaluated[slot])
        ).tolist()  # one copy
        self.slot_hot[slot] = False
        self.slot_start[slot] = NEVER
        self.slot_counted_from[slot] = NEVER
        STORE.record(state.request_id, skipped, evaluated)

    def snapshot(self) -> dict[str, dict[str, int]]:
        """Counts of the skipping requests now in the batch, by request id (the parallel
        samples of one request, ``n > 1``, share its id and are summed)."""
        if not self.requests:
            return {}
        skipped, evaluated = self.slot_skipped.tolist(), self.slot_evaluated.tolist()
        counts: dict[str, dict[str, int]] = {}
        for slot, state in self.requests.items():
            entry = counts.setdefault(state.request_id, {"skipped": 0, "evaluated": 0})
            entry["skipped"] += skipped[slot]
            entry["evaluated"] += evaluated[slot]
        return counts

    # -- a pass ------------------------------------------------------------------------------

    def route(self, query_start_loc: np.ndarray, batch_slots: np.ndarray, num_tokens: int) -> bool:
        """Before a pass, on the host: batch entry ``i`` owns tokens ``qsl[i]:qsl[i+1]`` and
        sits in slot ``batch_slots[i]`` (``no_slot``: not skipping). Writes ``token_slot``
        with one non-blocking copy (none while no pass routes a skipping request, and none
        when the batch is routed as in the previous pass); returns whether any token of the
        pass belongs to a skipping request."""
        skipping = bool((batch_slots != self.no_slot).any())
        if not skipping and not self.routed:
            return False
        qsl = query_start_loc[: len(batch_slots) + 1]
        last = self._last_route
        if (skipping and num_tokens == self.routed and np.array_equal(qsl, last[0])
                and np.array_equal(batch_slots, last[1])):
            return True  # an unchanged decode batch: token_slot already holds it
        if self._copied is not None:  # the previous pass's copy has left the staging buffer
            self._copied.synchronize()
        host = self._host_token_slot.numpy()
        n = max(num_tokens, self.routed)
        host[:n] = self.no_slot
        for i in np.flatnonzero(batch_slots != self.no_slot).tolist():
            host[qsl[i] : qsl[i + 1]] = batch_slots[i]
        self.token_slot[:n].copy_(self._host_token_slot[:n], non_blocking=True)
        if self._host_token_slot.is_pinned():
            self._copied = torch.cuda.Event()
            self._copied.record()
        self.routed = num_tokens if skipping else 0
        self._last_route = (qsl.copy(), batch_slots.copy())
        return skipping

    def runs_skip_graph(
        self,
        query_start_loc: np.ndarray,
        batch_slots: np.ndarray,
        positions: np.ndarray,
        max_rows: int,
        wide_rows: int = 0,
    ) -> bool:
        """Whether the pass runs the skip graph (V1, the CPU's host choice between graphs).

        With ``max_rows`` 0: when some token is eligible (the rule applied exactly). Else a
        pass of at most ``max_rows`` rows that are all eligible decode tokens, where a layer
        that every row skips reads no weights; or a pass with at least ``wide_rows`` (> 0)
        eligible tokens, where the ``gather`` form computes only the rows that run a layer
        and an FFN that wide is compute-bound. Any other pass would pay the rule and save
        less: the dense graph runs it at vLLM's speed, and its tokens count as evaluated.
        """
        if not max_rows:
            return self.eligible_tokens(query_start_loc, batch_slots, positions) > 0
        rows = len(batch_slots)
        if wide_rows and self.eligible_tokens(query_start_loc, batch_slots, positions) >= wide_rows:
            return True
        if len(positions) > max_rows or query_start_loc[rows] != rows or rows != len(positions):
            return False  # wider than max_rows, or a prefill chunk (more tokens than rows)
        for i, slot in enumerate(batch_slots.tolist()):
            state = self.requests.get(slot)
            if state is None or positions[i] < state.first_eligible:
                return False
        return True

    def eligible_tokens(
        self, query_start_loc: np.ndarray, batch_slots: np.ndarray, positions: np.ndarray
    ) -> int:
        """The pass's tokens that may skip, from host copies (the CPU's choice between the
        skip and the dense graph; under V2 there is no such choice). A request's positions
        are consecutive, so its last one says how many of its tokens are past its first
        eligible position."""
        count = 0
        for i in np.flatnonzero(batch_slots != self.no_slot).tolist():
            start, end = int(query_start_loc[i]), int(query_start_loc[i + 1])
            past = int(positions[end - 1]) - self.requests[int(batch_slots[i])].first_eligible + 1
            count += min(max(past, 0), end - start)
        return count

    def begin_pass(self, num_tokens: int, incoming_budget: torch.Tensor | None) -> None:
        """Device ops before the graph: budgets from the previous pipeline stage (or none)."""
        if incoming_budget is None:
            self.budget[:num_tokens].zero_()
        else:
            self.budget[:num_tokens].copy_(incoming_budget[:num_tokens])

    def end_pass(self, positions: torch.Tensor, skipped: bool) -> None:
        """After the pass: a dense-graph pass (V1, no token eligible) still counts its decode
        tokens as evaluated; a skip pass counted in the graph (``step``'s last layer)."""
        if not skipped:
            self._count(positions, None)
        # Profiling only (vllm-ffnskip profile): reads the scores back, so never while a CUDA
        # graph is being captured.
        elif RECORDER.enabled and not (
            self.score.is_cuda and torch.cuda.is_current_stream_capturing()
        ):
            scores = self.score[: positions.shape[0]].cpu()
            for l in self.stage_layers:
                column = scores[:, l]
                RECORDER.add(l, column[~column.isnan()].tolist())

    def _count(self, positions: torch.Tensor, skipped: torch.Tensor | None) -> None:
        """The pass's evaluated blocks (decode tokens counted once per request,
        ``stage_layers`` blocks each) and skips into the slots' counters."""
        t = positions.shape[0]
        slot = self.token_slot[:t]
        counted = positions >= self.slot_counted_from[slot]
        self.slot_evaluated.index_add_(0, slot, counted.long() * len(self.stage_layers))
        if skipped is not None:
            self.slot_skipped.index_add_(0, slot, (skipped * counted).long())

    def begin_carry(self, positions: torch.Tensor) -> PassCarry:
        """The pass's carry before the stage's first layer (traced into the graph)."""
        t = positions.shape[0]
        slot = self.token_slot[:t]
        return PassCarry(
            slot=slot,
            eligible=positions >= self.slot_start[slot],
            span=self.slot_span[slot],
            budget=self.budget[:t],
            skipped=torch.zeros_like(self.budget[:t]),
        )

    def step(
        self,
        layer_idx: int,
        form: str,
        mlp: nn.Module,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor,
        carry: PassCarry,
    ) -> torch.Tensor:
        """One layer's FFN under the rule; skipped rows return 0. Traced into the model's
        graph: every op has a fixed shape, no value goes to the host. Updates ``carry``; the
        stage's last layer writes it out."""
        slot = carry["slot"]
        hot = self.slot_hot[slot, layer_idx] & carry["eligible"]
        skip = hot & (carry["budget"] > 0)
        run = ~skip
        out = masked_mlp(form, mlp, hidden_states, run)
        carry["budget"], score = rule_step(
            hot, skip, carry["budget"], residual, out, self.slot_thresholds[slot, layer_idx],
            carry["span"],
        )
        carry["skipped"] = carry["skipped"] + skip.int()
        if layer_idx == self.stage_layers[-1]:  # in the graph, where the adds fuse
            self._count(positions, carry["skipped"])
            if self.stage_layers.stop < self.num_layers:  # to the next pipeline stage
                self.budget[: hidden_states.shape[0]].copy_(carry["budget"])
        if RECORDER.enabled:  # fixed per process, and part of the compile key
            t = hidden_states.shape[0]
            self.score[:t, layer_idx].copy_(torch.where(hot & run, score, torch.nan))
        return out
