"""SkipPolicyTracker: follows the skipping requests in the worker's persistent batch.

vLLM's V1 logits-processor interface is the supported channel that tells a worker, before
every forward pass, which request sits in which batch row with which ``SamplingParams``
(``update_state(BatchUpdate)``). The tracker uses it for exactly that and never touches
logits. It is added to ``model_config.logits_processors`` only when the server runs
``--model-impl ffnskip`` (see patches/model_impl.py), so other servers never load it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from vllm_ffnskip.batch import RequestSkipState
from vllm_ffnskip.policy import REQUEST_ID_KEY, RESOLVED_KEY
from vllm_ffnskip.stats import STORE, add_counts

if TYPE_CHECKING:
    from vllm.config import VllmConfig


class SkipPolicyTracker(LogitsProcessor):
    """Batch row -> ``RequestSkipState`` for every request that has skipping on."""

    #: The tracker of this worker process; the skip-aware FFN reads its rows.
    current: ClassVar[SkipPolicyTracker | None] = None

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool):
        self.rows: dict[int, RequestSkipState] = {}
        SkipPolicyTracker.current = self

    def is_argmax_invariant(self) -> bool:
        return True

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        STORE.maybe_log()
        if batch_update is not None:
            self._apply(batch_update)

    def _apply(self, batch_update: BatchUpdate) -> None:
        # A removed row is listed only while nothing refills it: an added request, or a
        # one-way move that condenses the batch, may replace a row in place, which ends
        # the stay of the request that was there.
        for index in batch_update.removed:
            self._release(index)
        for index, params, prompt_ids, output_ids in batch_update.added:
            self._release(index)
            extra_args = params.extra_args or {}
            wire = extra_args.get(RESOLVED_KEY)
            request_id = str(extra_args.get(REQUEST_ID_KEY, ""))
            skipping = wire is not None and prompt_ids is not None
            STORE.admit(request_id, skipping)
            if skipping:
                self.rows[index] = RequestSkipState.from_wire(
                    request_id, len(prompt_ids), wire, num_outputs=len(output_ids or ())
                )
        for a, b, direction in batch_update.moved:
            if direction == MoveDirectionality.SWAP:
                state_a, state_b = self.rows.pop(a, None), self.rows.pop(b, None)
                if state_b is not None:
                    self.rows[a] = state_b
            else:
                self._release(b)
                state_a = self.rows.pop(a, None)
            if state_a is not None:
                self.rows[b] = state_a

    def _release(self, index: int) -> None:
        state = self.rows.pop(index, None)
        if state is not None:
            STORE.record(state.request_id, state.skipped, state.evaluated)

    def snapshot(self) -> dict[str, dict[str, int]]:
        """Counts of the skipping requests now in the batch, by request id (the parallel
        samples of one request, ``n > 1``, share its id and are summed)."""
        counts: dict[str, dict[str, int]] = {}
        for s in self.rows.values():
            add_counts(counts, {s.request_id: {"skipped": s.skipped, "evaluated": s.evaluated}})
        return counts
