"""FFNSkipLlamaForCausalLM: vLLM's LLaMa with the skip-aware FFN in every decoder layer.

Weights, attention, KV cache, compilation and loading are vLLM's own (``LlamaForCausalLM``
composed with ``layer_type=``); only the decoder layer's FFN call changes. A forward pass in
which no request skips runs a second compiled graph over the same modules with vLLM's own
decoder-layer forward (``DenseLlamaModel``), so dense traffic pays nothing for the plugin.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from vllm.compilation.backends import set_model_tag
from vllm.config import CompilationMode, VllmConfig
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.fusion.fused_act_quant import maybe_fused_act_quant
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from vllm.model_executor.models.utils import extract_layer_index
from vllm.sequence import IntermediateTensors

from vllm_ffnskip import device_skip
from vllm_ffnskip.batch import SkipBatch
from vllm_ffnskip.device_skip import DeviceSkipBatch
from vllm_ffnskip.graph_skip import SkipState
from vllm_ffnskip.patches.model_impl import key_compile_cache_by_stage
from vllm_ffnskip.skip_ffn import BATCH_KEY
from vllm_ffnskip.tracker import SkipPolicyTracker

#: IntermediateTensors key of the per-token skip budgets sent to the next pipeline stage.
BUDGET_KEY = "ffnskip_budget"


class SiluAndMulInOp(nn.Module):
    """SiLU-and-mul for an MLP that runs eagerly inside the opaque op (the CUDA path), with
    compilation on.

    vLLM then gives ``SiluAndMul`` a ``torch.compile``d native forward meant to be inlined
    into the model's graph; called eagerly that wrapper costs ~145 us per layer on the CPU,
    the eager native formula ~37 us, vLLM's fused ``_C.silu_and_mul`` kernel ~11 us
    (measured). The kernel is used where the build has it.
    """

    fused = hasattr(torch.ops._C, "silu_and_mul")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        if self.fused:
            out = torch.empty(x.shape[:-1] + (d,), dtype=x.dtype, device=x.device)
            torch.ops._C.silu_and_mul(out, x)
            return out
        return (F.silu(x[..., :d].float()) * x[..., d:].float()).to(x.dtype)


class FFNSkipDecoderLayer(LlamaDecoderLayer):
    """A LLaMa decoder layer whose FFN may be skipped per token."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", **kwargs) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        compiled = vllm_config.compilation_config.mode != CompilationMode.NONE
        # The dense graph keeps vLLM's own act_fn; only the op's eager calls use this one.
        self.act_in_op = SiluAndMulInOp() if compiled else self.mlp.act_fn
        self.layer_idx = extract_layer_index(prefix)
        # The model's shared SkipState where the rule runs in the graph (set by the model;
        # not a registered submodule here), None where the device-state op runs it.
        self.skip_state: SkipState | None = None
        # Registered like vLLM's attention and MoE layers, so the opaque op finds its layer.
        self.layer_name = f"{prefix}.ffnskip"
        context = vllm_config.compilation_config.static_forward_context
        if self.layer_name in context:
            raise ValueError(f"Duplicate layer name: {self.layer_name}")
        context[self.layer_name] = self

    def mlp_in_op(self, x: torch.Tensor) -> torch.Tensor:
        """``LlamaMLP.forward`` as called eagerly from inside the opaque op."""
        x, _ = self.mlp.gate_up_proj(x)
        x = maybe_fused_act_quant(self.act_in_op, x, self.mlp.down_proj)
        x, _ = self.mlp.down_proj(x)
        return x

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        if self.skip_state is not None:
            hidden_states = self.skip_state.step(self.layer_idx, self.mlp, hidden_states, residual)
        else:
            hidden_states = torch.ops.vllm.ffnskip_mlp(hidden_states, residual, self.layer_name)
        return hidden_states, residual


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

    Before each forward pass the ``SkipBatch`` is built from the tracker's rows (on the host,
    from the step's ``query_start_loc`` and positions). A pass in which no token may skip runs
    ``dense_model`` (see DenseLlamaModel); the others run the skip-aware graph, with the
    pass's state loaded into ``skip_state`` (the rule in the graph, graph_skip.py) or, on
    CUDA, uploaded for the device-state op (device_skip.py). The first pass, vLLM's start-up
    dummy run, runs both graphs so that both are compiled before any request arrives.

    Under pipeline parallelism a token's skip run may cross a stage boundary: each stage
    sends its tokens' remaining skip budgets to the next one in ``IntermediateTensors``
    (``BUDGET_KEY``), beside the hidden states, outside the compiled ``LlamaModel``.
    """

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=FFNSkipDecoderLayer)
        # Not a registered submodule: its parameters are self.model's, loaded once, there.
        dense_model = DenseLlamaModel(
            vllm_config=vllm_config, prefix=f"{prefix}.model" if prefix else "model", model=self.model
        )
        object.__setattr__(self, "dense_model", dense_model)
        self.skip_graph_ready = False
        self.num_layers = vllm_config.model_config.hf_config.num_hidden_layers
        self.stage_layers = range(self.model.start_layer, self.model.end_layer)
        key_compile_cache_by_stage(vllm_config, self.stage_layers)
        self.skip_state: SkipState | None = None
        if not device_skip.use_device_state():
            self.skip_state = SkipState(
                vllm_config.scheduler_config.max_num_batched_tokens, self.num_layers
            )
            for layer in self.model.layers[self.model.start_layer : self.model.end_layer]:
                object.__setattr__(layer, "skip_state", self.skip_state)
        make_model_tensors = self.make_empty_intermediate_tensors

        def make_empty_intermediate_tensors(
            batch_size: int, dtype: torch.dtype, device: torch.device
        ) -> IntermediateTensors:
            tensors = make_model_tensors(batch_size, dtype, device)
            tensors[BUDGET_KEY] = torch.zeros(batch_size, dtype=torch.int32, device=device)
            return tensors

        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors

    def skip_batch(
        self, positions: torch.Tensor, incoming_budget: torch.Tensor | None
    ) -> SkipBatch | None:
        """This pass's skip state; None when no token of it may skip."""
        tracker = SkipPolicyTracker.current
        if tracker is None or not tracker.rows:
            return None
        qsl = _query_start_loc(get_forward_context().attn_metadata)
        if qsl is None:
            return None
        batch = SkipBatch.build(
            tracker.rows,
            qsl,
            positions,
            num_layers=self.num_layers,
            stage_layers=len(self.stage_layers),
        )
        if batch is not None and incoming_budget is not None:
            batch.budget[:] = incoming_budget[: batch.budget.shape[0]].cpu().numpy()
        return batch

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
        batch = self.skip_batch(positions, incoming)
        context = get_forward_context()
        context.additional_kwargs[BATCH_KEY] = None
        if batch is None:
            if not self.skip_graph_ready:
                self.model(*args)
            output = self.dense_model(*args)
        elif self.skip_state is not None:
            self.skip_state.load(batch)
            output = self.model(*args)
            self.skip_state.unload(batch, self.stage_layers)
        else:
            device_batch = DeviceSkipBatch.upload(batch, positions.device)
            context.additional_kwargs[BATCH_KEY] = device_batch
            output = self.model(*args)
            device_batch.download()
        self.skip_graph_ready = True
        if batch is not None:
            batch.finish()
        if isinstance(output, IntermediateTensors):
            budget = torch.zeros(positions.shape[0], dtype=torch.int32)
            if batch is not None:
                budget = torch.from_numpy(batch.budget)
            output[BUDGET_KEY] = budget.to(positions.device)
        return output


def _query_start_loc(attn_metadata: object) -> torch.Tensor | None:
    if isinstance(attn_metadata, dict):
        attn_metadata = next(iter(attn_metadata.values()), None)
    return getattr(attn_metadata, "query_start_loc", None)
