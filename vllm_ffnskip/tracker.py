"""SkipPolicyTracker: follows the skipping requests in the worker's persistent batch.

vLLM's V1 logits-processor interface is the supported channel that tells a worker, before
every forward pass, which request sits in which batch row with which ``SamplingParams``
(``update_state(BatchUpdate)``). The tracker uses it for exactly that and never touches
logits. It is added to ``model_config.logits_processors`` only when the server runs
``--model-impl ffnskip`` under the V1 runner (the CPU; see patches/model_impl.py), so other
servers never load it. Under the V2 runner the model state does this (model_state.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from vllm_ffnskip.policy import REQUEST_ID_KEY, RESOLVED_KEY
from vllm_ffnskip.skip_state import RequestSkipState, SkipState
from vllm_ffnskip.stats import STORE

if TYPE_CHECKING:
    from vllm.config import VllmConfig


class SkipPolicyTracker(LogitsProcessor):
    """Batch row -> ``SkipState`` slot for every request that has skipping on.

    A request keeps its slot for its whole stay, while V1 moves it between rows (condensing
    and swaps), so its counters on the device never move. The model's ``SkipState`` exists
    once the first batch arrives (the tracker is built with the runner, before the model).
    """

    #: The tracker of this worker process; the model routes its rows.
    current: ClassVar[SkipPolicyTracker | None] = None

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool):
        self.rows: dict[int, int] = {}
        self._free: list[int] | None = None
        SkipPolicyTracker.current = self

    def is_argmax_invariant(self) -> bool:
        return True

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        STORE.maybe_log()
        if batch_update is not None:
            self._apply(batch_update)

    @property
    def skip_state(self) -> SkipState:
        state = SkipState.current
        if state is None:
            raise RuntimeError("ffnskip: the tracker got requests before the model was built")
        if self._free is None:
            self._free = list(range(state.no_slot - 1, -1, -1))
        return state

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
                skip_state = self.skip_state
                slot = self._free.pop()
                skip_state.admit(slot, RequestSkipState.from_wire(
                    request_id, len(prompt_ids), wire, num_outputs=len(output_ids or ())
                ))
                self.rows[index] = slot
        for a, b, direction in batch_update.moved:
            if direction == MoveDirectionality.SWAP:
                slot_a, slot_b = self.rows.pop(a, None), self.rows.pop(b, None)
                if slot_b is not None:
                    self.rows[a] = slot_b
            else:
                self._release(b)
                slot_a = self.rows.pop(a, None)
            if slot_a is not None:
                self.rows[b] = slot_a

    def _release(self, index: int) -> None:
        slot = self.rows.pop(index, None)
        if slot is not None:
            self.skip_state.release(slot)
            self._free.append(slot)

    def batch_slots(self, num_reqs: int) -> np.ndarray:
        """Slot of each of the pass's first ``num_reqs`` rows (``no_slot``: not skipping)."""
        slots = np.full(num_reqs, self.skip_state.no_slot, dtype=np.int64)
        for row, slot in self.rows.items():
            if row < num_reqs:  # else not scheduled in this step
                slots[row] = slot
        return slots
