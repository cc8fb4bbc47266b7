"""FFNSkipLlamaForCausalLM: vLLM's LLaMa with the skip-aware FFN in every decoder layer.

Weights, attention, KV cache, compilation and loading are vLLM's own (``LlamaForCausalLM``
composed with ``layer_type=``); only the decoder layer's FFN call changes, to the one skip
driver (skip_state.py) on every platform. Under vLLM's V1 runner (the CPU) a pass that cannot
save runs a second compiled graph over the same modules with vLLM's own decoder-layer forward
(``DenseLlamaModel``): one in which no token may skip, so dense traffic pays nothing for the
plugin, and one where skipping would cost the rule and save less (``SkipState.runs_skip_graph``:
wider than the server's ``max_skip_rows`` or with a row that cannot skip, unless at least
``wide_skip_rows`` of its tokens may skip).
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.compilation.backends import set_model_tag
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from vllm.model_executor.models.utils import extract_layer_index
from vllm.sequence import IntermediateTensors

from vllm_ffnskip.masked_mlp import form_for
from vllm_ffnskip.patches.model_impl import key_compile_cache_by_stage
from vllm_ffnskip.policy import max_skip_rows, runs_wide_passes, wide_skip_rows
from vllm_ffnskip.skip_state import PassCarry, SkipState
from vllm_ffnskip.tracker import SkipPolicyTracker

#: IntermediateTensors key of the per-token skip budgets sent to the next pipeline stage.
BUDGET_KEY = "ffnskip_budget"


class FFNSkipDecoderLayer(LlamaDecoderLayer):
    """A LLaMa decoder layer whose FFN may be skipped per token."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", **kwargs) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self.layer_idx = extract_layer_index(prefix)
        server_config = (vllm_config.additional_config or {}).get("ffnskip")
        self.mlp_form = form_for(self.mlp, runs_wide_passes(server_config))
        # The model's shared SkipState (set by the model; not a registered submodule here).
        self.skip_state: SkipState | None = None

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
        skip_carry: PassCarry,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        hidden_states = self.skip_state.step(
            self.layer_idx, self.mlp_form, self.mlp, positions, hidden_states, residual,
            skip_carry,
        )
        return hidden_states, residual


class FFNSkipLlamaModel(LlamaModel):
    """vLLM's ``LlamaModel`` over ``FFNSkipDecoderLayer``s, whose forward opens the pass's
    ``PassCarry`` and hands it to every layer (vLLM's layer loop passes extra keyword
    arguments through): the rule's values go from layer to layer inside the graph."""

    #: The model's shared SkipState (set by the model; not a registered submodule here).
    skip_state: SkipState

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        carry = self.skip_state.begin_carry(positions)
        return super().forward(
            input_ids, positions, intermediate_tensors, inputs_embeds, skip_carry=carry
        )


class DenseDecoderLayer(nn.Module):
    """vLLM's own ``LlamaDecoderLayer.forward`` over an ``FFNSkipDecoderLayer``'s modules."""

    def __init__(self, layer: FFNSkipDecoderLayer) -> None:
        super().__init__()
        self.layer = layer

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return LlamaDecoderLayer.forward(self.layer, positions, hidden_states, residual)


class DenseLlamaModel(LlamaModel):
    """The dense twin of a skip-aware ``LlamaModel``: the same modules and weights, the stock
    decoder-layer forward, and a compiled graph of its own.

    The skip-aware graph costs a pass in which nothing skips ~8% of its decode speed on the
    CPU (the rule's ops and the ``torch.cond`` boundaries; benchmarks/decode_ab.py). Passes in which no token may skip run this graph instead,
    which is vLLM's. Built under its
    own model tag and with its own ``forward`` (vLLM keys compile caches by both), on the
    meta device: every module it computes with is taken from ``model``.
    """

    def __init__(self, *, vllm_config: VllmConfig, prefix: str, model: LlamaModel) -> None:
        layers = model.layers

        def dense_layer(vllm_config: VllmConfig, prefix: str) -> DenseDecoderLayer:
            return DenseDecoderLayer(layers[extract_layer_index(prefix)])

        with torch.device("meta"), set_model_tag("ffnskip_dense"):
            super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=dense_layer)
        self.embed_tokens = model.embed_tokens
        self.norm = model.norm

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)


class FFNSkipLlamaForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` built from ``FFNSkipDecoderLayer``s.

    Requests reach the skip state through the runner's own channel: under V2 the model state
    (``get_model_state_cls``, model_state.py), under V1 the tracker, whose rows this forward
    routes. The pass's device ops around the compiled ``LlamaModel`` (begin/end of the skip
    state's pass) are fixed-shape, so a FULL CUDA graph captures them with the model.

    Under pipeline parallelism a token's skip run may cross a stage boundary: each stage
    sends its tokens' remaining skip budgets to the next one in ``IntermediateTensors``
    (``BUDGET_KEY``), beside the hidden states.
    """

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=FFNSkipDecoderLayer)
        self.follows_v1 = not vllm_config.use_v2_model_runner
        self.dense_model: DenseLlamaModel | None = None
        if self.follows_v1:
            # Not a registered submodule: its parameters are self.model's, loaded once, there.
            dense_model = DenseLlamaModel(
                vllm_config=vllm_config,
                prefix=f"{prefix}.model" if prefix else "model",
                model=self.model,
            )
            object.__setattr__(self, "dense_model", dense_model)
        self.skip_graph_ready = False
        server_config = (vllm_config.additional_config or {}).get("ffnskip")
        self.max_skip_rows = max_skip_rows(server_config)
        self.wide_skip_rows = wide_skip_rows(server_config)
        self.stage_layers = range(self.model.start_layer, self.model.end_layer)
        key_compile_cache_by_stage(vllm_config, self.stage_layers)
        scheduler_config = vllm_config.scheduler_config
        skip_state = SkipState(
            max_slots=scheduler_config.max_num_seqs,
            max_tokens=scheduler_config.max_num_batched_tokens,
            num_layers=vllm_config.model_config.hf_config.num_hidden_layers,
            stage_layers=self.stage_layers,
        )
        # Not registered either: no weights, and its buffers are written in place.
        object.__setattr__(self, "skip_state", skip_state)
        object.__setattr__(self.model, "skip_state", skip_state)
        for layer in self.model.layers[self.model.start_layer : self.model.end_layer]:
            object.__setattr__(layer, "skip_state", skip_state)
        make_model_tensors = self.make_empty_intermediate_tensors

        def make_empty_intermediate_tensors(
            batch_size: int, dtype: torch.dtype, device: torch.device
        ) -> IntermediateTensors:
            tensors = make_model_tensors(batch_size, dtype, device)
            tensors[BUDGET_KEY] = torch.zeros(batch_size, dtype=torch.int32, device=device)
            return tensors

        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors

    def _init_model(
        self,
        vllm_config: VllmConfig,
        prefix: str = "",
        layer_type: type[nn.Module] = FFNSkipDecoderLayer,
    ) -> FFNSkipLlamaModel:
        return FFNSkipLlamaModel(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)

    @staticmethod
    def get_model_state_cls() -> type:
        """The V2 runner's per-request channel (never called by V1)."""
        from vllm_ffnskip.model_state import FFNSkipModelState

        return FFNSkipModelState

    def route_v1(self, positions: torch.Tensor) -> tuple[bool, bool]:
        """V1 (the CPU): route this pass's tokens from the tracker's rows and the step's
        ``query_start_loc`` (request ``i`` owns tokens ``qsl[i]:qsl[i+1]``). Returns whether
        a skipping request is in the pass, and whether the pass runs the skip graph
        (``SkipState.runs_skip_graph``, by the server's ``max_skip_rows`` and
        ``wide_skip_rows``)."""
        tracker = SkipPolicyTracker.current
        if tracker is None or not (tracker.rows or self.skip_state.routed):
            return False, False
        qsl = _query_start_loc(get_forward_context().attn_metadata)
        if qsl is None:
            return False, False
        qsl = qsl.numpy()
        slots = tracker.batch_slots(len(qsl) - 1)
        if not self.skip_state.route(qsl, slots, positions.shape[0]):
            return False, False
        return True, self.skip_state.runs_skip_graph(
            qsl, slots, positions.numpy(), self.max_skip_rows, self.wide_skip_rows
        )

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        incoming = None
        if intermediate_tensors is not None:
            tensors = dict(intermediate_tensors.tensors)
            incoming = tensors.pop(BUDGET_KEY, None)
            intermediate_tensors = IntermediateTensors(tensors)
        args = (input_ids, positions, intermediate_tensors, inputs_embeds)
        skip_state, num_tokens = self.skip_state, positions.shape[-1]
        if self.follows_v1:
            routed, skip_graph = self.route_v1(positions)
        else:  # V2: routed by the model state; one graph, as captured
            routed = skip_graph = True
        if routed:
            skip_state.begin_pass(num_tokens, incoming)
        if skip_graph:
            output = self.model(*args)
        else:
            if not self.skip_graph_ready:  # start-up dummy run: compile both graphs
                self.model(*args)
            output = self.dense_model(*args)
        self.skip_graph_ready = True
        if routed:
            skip_state.end_pass(positions, skipped=skip_graph)
        if isinstance(output, IntermediateTensors):
            budget = skip_state.budget[:num_tokens]
            output[BUDGET_KEY] = budget.clone() if skip_graph else torch.zeros_like(budget)
        return output


def _query_start_loc(attn_metadata: object) -> torch.Tensor | None:
    if isinstance(attn_metadata, dict):
        attn_metadata = next(iter(attn_metadata.values()), None)
    return getattr(attn_metadata, "query_start_loc", None)
