"""Per-step, per-token skip state built from the requests in vLLM's persistent batch.

``RequestSkipState`` lives as long as a skipping request sits in the worker's persistent
batch (``SkipPolicyTracker`` keeps them by batch row). ``SkipBatch`` is rebuilt at the first
decoder layer of every forward pass from those rows, the step's ``query_start_loc`` (request
``i`` owns tokens ``qsl[i]:qsl[i+1]``) and the token positions, and is carried through the
layers in the forward context. Everything here derives from data that is identical on every
tensor-parallel rank, so every rank builds the same batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch

from vllm_ffnskip.stats import STORE

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
    when its score reaches the threshold (else 0), a cold layer clears it. One definition
    for the graph path (graph_skip.py) and the device-state path (device_skip.py).
    """
    h = residual.float()
    s = h + ffn_out.float()
    norms = (h * h).sum(-1) * (s * s).sum(-1)
    score = (h * s).sum(-1) / norms.clamp_min(1e-16).sqrt()
    tested = torch.where(score >= thresholds, span, 0)
    return torch.where(hot, torch.where(skip, budget - 1, tested), 0), score


@dataclass
class RequestSkipState:
    """One skipping request's resolved policy and running counters."""

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
    skipped: int = 0  # FFN blocks skipped so far
    evaluated: int = 0  # FFN blocks (run or skipped) of its decode tokens so far

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

    @cached_property
    def hot_layers(self) -> np.ndarray:
        """[num_layers] bool: the layers outside this request's cold regions."""
        layers = np.arange(len(self.thresholds))
        return (layers >= self.cold_start) & (layers < len(layers) - self.cold_end)


@dataclass
class SkipBatch:
    """Per-token skip state of one forward pass.

    ``hot[t, l]``: token ``t`` may skip layer ``l`` (decode token past warm-up of a skipping
    request, ``l`` outside its cold regions). ``budget[t]``: how many following hot layers
    token ``t`` still skips. The state is host-side numpy: per layer it costs a few
    microseconds where small torch ops would cost tens (measured on the CPU at batch 1).
    """

    hot: np.ndarray  # [T, L] bool
    thresholds: np.ndarray  # [T, L] float32
    span: np.ndarray  # [T] int32
    budget: np.ndarray  # [T] int32
    skipped: np.ndarray  # [T] int32, FFN blocks skipped per token in this pass
    token_rows: np.ndarray  # [T] index into ``states`` (-1: not a skipping request)
    counted: np.ndarray  # [T] bool: the token's blocks count (see counted_from)
    states: list[RequestSkipState]
    evaluated: int  # FFN blocks of this pass's counted decode tokens

    @classmethod
    def build(
        cls,
        rows: dict[int, RequestSkipState],
        query_start_loc: torch.Tensor,
        positions: torch.Tensor,
        num_layers: int,
        stage_layers: int,
    ) -> SkipBatch | None:
        """None when no token of this pass may skip (the dense fast path).

        Counts the pass's decode tokens as evaluated FFN blocks (``stage_layers`` per token:
        the layers this pipeline stage runs) whether or not any of them may skip, each
        token once over the request's stays.
        """
        qsl = query_start_loc.cpu().numpy()
        num_tokens = positions.shape[0]
        token_rows = np.full(num_tokens, -1, dtype=np.int64)
        states: list[RequestSkipState] = []
        for row, state in rows.items():
            if row + 1 < len(qsl):  # else not scheduled in this step
                token_rows[qsl[row] : qsl[row + 1]] = len(states)
                states.append(state)
        if not states:
            return None
        idx = np.flatnonzero(token_rows >= 0)
        state_of = token_rows[idx]
        pos = positions.cpu().numpy()[idx]
        # Per request: prompt_len, warm-up, span, counted_from (one small array, indexed once
        # per pass).
        scalars = np.array(
            [(s.prompt_len, s.warmup, s.span, s.counted_from) for s in states]
        )[state_of]
        counted = pos >= scalars[:, 3]  # decode tokens not counted in an earlier stay
        decode_tokens = np.bincount(state_of[counted], minlength=len(states))
        for state, n in zip(states, decode_tokens.tolist()):
            state.evaluated += n * stage_layers
        evaluated = int(decode_tokens.sum()) * stage_layers
        eligible = pos >= scalars[:, 0] + scalars[:, 1]
        if not eligible.any():
            if evaluated:
                STORE.count(0, evaluated)
            return None
        hot = np.zeros((num_tokens, num_layers), dtype=bool)
        hot[idx] = np.stack([s.hot_layers for s in states])[state_of] & eligible[:, None]
        thresholds = np.ones((num_tokens, num_layers), dtype=np.float32)
        thresholds[idx] = np.stack([s.thresholds for s in states])[state_of]
        span = np.zeros(num_tokens, dtype=np.int32)
        span[idx] = scalars[:, 2]
        counted_tokens = np.zeros(num_tokens, dtype=bool)
        counted_tokens[idx] = counted
        return cls(
            hot=hot,
            thresholds=thresholds,
            span=span,
            budget=np.zeros(num_tokens, dtype=np.int32),
            skipped=np.zeros(num_tokens, dtype=np.int32),
            token_rows=token_rows,
            counted=counted_tokens,
            states=states,
            evaluated=evaluated,
        )

    @cached_property
    def layer_hot_any(self) -> list[bool]:
        """Per layer: whether any token of the pass is hot there."""
        return self.hot.any(axis=0).tolist()

    def finish(self) -> None:
        """Fold this pass's skip counts into the requests' counters (after the last layer)."""
        # Bin 0 holds the tokens of other requests (row -1), which never skip. Few numpy calls:
        # right after the graph each one runs with cold caches (~10 us, measured).
        per_state = np.bincount(
            self.token_rows + 1, weights=self.skipped * self.counted, minlength=len(self.states) + 1
        ).tolist()
        for state, n in zip(self.states, per_state[1:]):
            state.skipped += int(n)
        STORE.count(int(sum(per_state)), self.evaluated)
