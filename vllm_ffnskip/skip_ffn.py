"""The skip-aware FFN as an opaque custom op: the device-state path (CUDA).

On CUDA the rule runs per layer inside ``torch.ops.vllm.ffnskip_mlp``, which torch.compile
treats as an opaque node with a same-shape fake implementation (the way vLLM keeps
attention out of its graphs) and the CUDA-graph configuration makes a splitting op, so a
graph replay never repeats a captured decision. The per-layer step is device_skip.py's.
On the CPU the rule runs inside the graph instead (graph_skip.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from vllm.forward_context import get_forward_context
from vllm.utils.torch_utils import direct_register_custom_op

from vllm_ffnskip import device_skip

if TYPE_CHECKING:
    from vllm_ffnskip.model import FFNSkipDecoderLayer

#: Key of the pass's DeviceSkipBatch in ``ForwardContext.additional_kwargs``.
BATCH_KEY = "ffnskip_batch"


def ffnskip_mlp(hidden_states: torch.Tensor, residual: torch.Tensor, layer_name: str) -> torch.Tensor:
    """FFN of one decoder layer with per-token skipping (see docs/algorithm.md).

    ``hidden_states``: post-attention-norm input of the MLP; ``residual``: the stream h
    entering the FFN block. Skipped rows return exactly zero, so the next layer's residual
    add leaves h unchanged. Without a skip state (the start-up dummy run) the stock MLP.
    """
    context = get_forward_context()
    layer: FFNSkipDecoderLayer = context.no_compile_layers[layer_name]
    batch = context.additional_kwargs.get(BATCH_KEY)
    if batch is None:
        return layer.mlp_in_op(hidden_states)
    return device_skip.skip_step(layer, batch, hidden_states, residual)


def _ffnskip_mlp_fake(
    hidden_states: torch.Tensor, residual: torch.Tensor, layer_name: str
) -> torch.Tensor:
    return torch.empty_like(hidden_states)


direct_register_custom_op(
    op_name="ffnskip_mlp",
    op_func=ffnskip_mlp,
    mutates_args=[],
    fake_impl=_ffnskip_mlp_fake,
)
