"""FFNSkipLlamaForCausalLM: vLLM's LLaMa with the skip-aware FFN in every decoder layer.

Weights, attention, KV cache, compilation and loading are vLLM's own (``LlamaForCausalLM``
composed with ``layer_type=``); only the decoder layer's FFN call changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import CompilationMode, VllmConfig
from vllm.distributed import get_pp_group
from vllm.distributed.utils import get_pp_indices
from vllm.forward_context import get_forward_context
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.utils import extract_layer_index
from vllm.sequence import IntermediateTensors

from vllm_ffnskip.skip_ffn import BATCH_KEY, INCOMING_BUDGET_KEY

#: IntermediateTensors key of the per-token skip budgets sent to the next pipeline stage.
BUDGET_KEY = "ffnskip_budget"


class SiluAndMulInOp(nn.Module):
    """SiLU-and-mul for an MLP that runs inside an opaque op, outside the compiled graph.

    With compilation on, vLLM disables its custom ops and gives ``SiluAndMul`` a
    ``torch.compile``d native forward, meant to be inlined into the model's graph. Called
    eagerly from our op, that wrapper costs ~145 us per layer on the CPU (measured; the
    GEMMs around it take ~80-140 us). This eager version computes in float32 and rounds once,
    as inductor's fused kernel does.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        return (F.silu(x[..., :d].float()) * x[..., d:].float()).to(x.dtype)


class FFNSkipDecoderLayer(LlamaDecoderLayer):
    """A LLaMa decoder layer whose FFN may be skipped per token."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", **kwargs) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        if vllm_config.compilation_config.mode != CompilationMode.NONE:
            self.mlp.act_fn = SiluAndMulInOp()
        config = vllm_config.model_config.hf_config
        self.layer_idx = extract_layer_index(prefix)
        self.num_layers = config.num_hidden_layers
        pp = get_pp_group()
        self.first_layer, end = get_pp_indices(self.num_layers, pp.rank_in_group, pp.world_size)
        self.last_layer = end - 1
        # Registered like vLLM's attention and MoE layers, so the opaque op finds its layer.
        self.layer_name = f"{prefix}.ffnskip"
        context = vllm_config.compilation_config.static_forward_context
        if self.layer_name in context:
            raise ValueError(f"Duplicate layer name: {self.layer_name}")
        context[self.layer_name] = self

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
        hidden_states = torch.ops.vllm.ffnskip_mlp(
            hidden_states, residual, positions, self.layer_name
        )
        return hidden_states, residual


class FFNSkipLlamaForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` built from ``FFNSkipDecoderLayer``s.

    Under pipeline parallelism a token's skip run may cross a stage boundary: each stage
    sends its tokens' remaining skip budgets to the next one in ``IntermediateTensors``
    (``BUDGET_KEY``), beside the hidden states. This happens here, outside the compiled
    ``LlamaModel``, so its traced graph stays vLLM's own.
    """

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=FFNSkipDecoderLayer)
        make_model_tensors = self.make_empty_intermediate_tensors

        def make_empty_intermediate_tensors(
            batch_size: int, dtype: torch.dtype, device: torch.device
        ) -> IntermediateTensors:
            tensors = make_model_tensors(batch_size, dtype, device)
            tensors[BUDGET_KEY] = torch.zeros(batch_size, dtype=torch.int32, device=device)
            return tensors

        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        context = get_forward_context()
        if intermediate_tensors is not None:
            tensors = dict(intermediate_tensors.tensors)
            context.additional_kwargs[INCOMING_BUDGET_KEY] = tensors.pop(BUDGET_KEY, None)
            intermediate_tensors = IntermediateTensors(tensors)
        output = super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)
        if isinstance(output, IntermediateTensors):
            batch = context.additional_kwargs.get(BATCH_KEY)
            budget = torch.zeros(positions.shape[0], dtype=torch.int32)
            if batch is not None:
                budget = torch.from_numpy(batch.budget)
            output[BUDGET_KEY] = budget.to(positions.device)
        return output
