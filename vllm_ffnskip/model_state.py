"""``FFNSkipModelState``: follows skipping requests under vLLM's V2 model runner.

The V2 runner (CUDA's default) gives each request a slot (``req_index``) for its stay and
tells the model's ``ModelState`` when a request enters (``add_request``) and leaves
(``remove_request``: finished, aborted or preempted), and before every pass which batch
entry is which slot (``prepare_inputs``: ``InputBatch.idx_mapping``). The slot is the
``SkipState`` slot, so the request's policy is written once, at entry; a pass only routes
its tokens to their slots. V1 logits processors (the tracker) do not load under V2.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from vllm.v1.core.sched.output import NewRequestData
from vllm.v1.worker.gpu.input_batch import InputBatch
from vllm.v1.worker.gpu.model_states.default import DefaultModelState
from vllm.v1.worker.gpu.states import RequestState

from vllm_ffnskip.policy import REQUEST_ID_KEY, RESOLVED_KEY
from vllm_ffnskip.skip_state import RequestSkipState, SkipState
from vllm_ffnskip.stats import STORE


class FFNSkipModelState(DefaultModelState):
    """vLLM's default model state, plus the skip state's slots and token routing."""

    def __init__(self, vllm_config, model, encoder_cache, device) -> None:
        super().__init__(vllm_config, model, encoder_cache, device)
        self.skip_state: SkipState = model.skip_state
        #: Skipping requests now in the batch: request id -> slot (the runner's req_index).
        self.slots: dict[str, int] = {}

    def add_request(self, req_index: int, new_req_data: NewRequestData) -> None:
        super().add_request(req_index, new_req_data)
        self._release(new_req_data.req_id)
        params = new_req_data.sampling_params
        extra_args = (params.extra_args if params is not None else None) or {}
        wire = extra_args.get(RESOLVED_KEY)
        request_id = str(extra_args.get(REQUEST_ID_KEY, new_req_data.req_id))
        skipping = wire is not None and new_req_data.prompt_token_ids is not None
        STORE.admit(request_id, skipping)
        if not skipping:
            return
        prompt_len = len(new_req_data.prompt_token_ids)
        # A resumed (preempted) request carries its outputs so far after the prompt.
        num_outputs = len(new_req_data.prefill_token_ids or ()) - prompt_len
        self.skip_state.admit(
            req_index,
            RequestSkipState.from_wire(request_id, prompt_len, wire, num_outputs=num_outputs),
        )
        self.slots[new_req_data.req_id] = req_index

    def remove_request(self, req_id: str) -> None:
        super().remove_request(req_id)
        self._release(req_id)

    def _release(self, req_id: str) -> None:
        slot = self.slots.pop(req_id, None)
        if slot is not None:
            self.skip_state.release(slot)

    def prepare_inputs(self, input_batch: InputBatch, req_states: RequestState) -> dict[str, Any]:
        STORE.maybe_log()
        no_slot = self.skip_state.no_slot
        # Dummy batches (DP idle steps) carry ids of their own, which route nowhere.
        batch_slots = np.fromiter(
            (self.slots.get(req_id, no_slot) for req_id in input_batch.req_ids),
            dtype=np.int64,
            count=input_batch.num_reqs,
        )
        self.skip_state.route(
            input_batch.query_start_loc_np, batch_slots, input_batch.num_tokens_after_padding
        )
        return super().prepare_inputs(input_batch, req_states)

    def prepare_dummy_inputs(self, num_reqs: int, num_tokens: int) -> dict[str, Any]:
        """Capture and warm-up passes: every token routed to no request, so the skip-aware
        graph runs with an all-dense mask."""
        no_slot = self.skip_state.no_slot
        self.skip_state.route(np.zeros(num_reqs + 1, dtype=np.int64),
                              np.full(num_reqs, no_slot, dtype=np.int64), num_tokens)
        return super().prepare_dummy_inputs(num_reqs, num_tokens)
