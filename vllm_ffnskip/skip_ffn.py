"""The skip-aware FFN: an opaque custom op around a decoder layer's stock MLP.

Row counts that depend on the data cannot live inside a traced or captured graph, so the
whole FFN of a layer (gather active rows -> stock ``LlamaMLP`` -> scatter, then the
saturation test) runs inside ``torch.ops.vllm.ffnskip_mlp``, which torch.compile treats as
an opaque node with a same-shape fake implementation — the way vLLM keeps attention out of
its graphs. Only passes with a skipping request in their batch get here (the others run
the dense graph, see model.py); when none of their tokens may skip yet, the op calls the
stock MLP on all rows and nothing else. On CUDA the per-layer step is device_skip.py's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from vllm.forward_context import get_forward_context
from vllm.utils.torch_utils import direct_register_custom_op

from vllm_ffnskip import device_skip
from vllm_ffnskip.batch import SkipBatch, cosine_rows
from vllm_ffnskip.device_skip import DeviceSkipBatch
from vllm_ffnskip.stats import RECORDER
from vllm_ffnskip.tracker import SkipPolicyTracker

if TYPE_CHECKING:
    from vllm_ffnskip.model import FFNSkipDecoderLayer

#: Key of the pass's SkipBatch in ``ForwardContext.additional_kwargs``.
BATCH_KEY = "ffnskip_batch"
#: Key of the skip budgets received from the previous pipeline stage (see model.py).
INCOMING_BUDGET_KEY = "ffnskip_incoming_budget"


def _query_start_loc(attn_metadata: object) -> torch.Tensor | None:
    if isinstance(attn_metadata, dict):
        attn_metadata = next(iter(attn_metadata.values()), None)
    return getattr(attn_metadata, "query_start_loc", None)


def _batch_for(
    layer: FFNSkipDecoderLayer, positions: torch.Tensor
) -> SkipBatch | DeviceSkipBatch | None:
    """The pass's SkipBatch; built by the first layer of this pipeline stage."""
    ctx = get_forward_context()
    if layer.layer_idx == layer.first_layer:
        tracker = SkipPolicyTracker.current
        qsl = _query_start_loc(ctx.attn_metadata)
        batch = None
        if tracker is not None and tracker.rows and qsl is not None:
            batch = SkipBatch.build(
                tracker.rows,
                qsl,
                positions,
                num_layers=layer.num_layers,
                stage_layers=layer.last_layer - layer.first_layer + 1,
            )
            incoming = ctx.additional_kwargs.get(INCOMING_BUDGET_KEY)
            if batch is not None and incoming is not None:
                batch.budget[:] = incoming[: batch.budget.shape[0]].cpu().numpy()
            if batch is not None and device_skip.use_device_state(positions):
                batch = DeviceSkipBatch.upload(batch, positions.device)
        ctx.additional_kwargs[BATCH_KEY] = batch
        return batch
    return ctx.additional_kwargs.get(BATCH_KEY)


def saturation(h: torch.Tensor, f: torch.Tensor) -> np.ndarray:
    """The score cos(h, h + f) per row, in float32, on the host.

    numpy on zero-copy views of CPU float32 tensors costs a few microseconds per layer at
    small batch, where the same torch ops cost tens (measured).
    """
    if h.dtype != torch.float32 or h.device.type != "cpu":  # each call costs ~5 us
        h, f = h.float().cpu(), f.float().cpu()
    h32 = h.numpy()
    return cosine_rows(h32, h32 + f.numpy())


def ffnskip_mlp(
    hidden_states: torch.Tensor,
    residual: torch.Tensor,
    positions: torch.Tensor,
    layer_name: str,
) -> torch.Tensor:
    """FFN of one decoder layer with per-token skipping (see docs/algorithm.md).

    ``hidden_states``: post-attention-norm input of the MLP; ``residual``: the stream h
    entering the FFN block. Skipped rows return exactly zero, so the next layer's residual
    add leaves h unchanged.
    """
    layer: FFNSkipDecoderLayer = get_forward_context().no_compile_layers[layer_name]
    batch = _batch_for(layer, positions)
    if batch is None:
        out = layer.mlp_in_op(hidden_states)
    elif isinstance(batch, DeviceSkipBatch):
        out = device_skip.skip_step(layer, batch, hidden_states, residual)
    else:
        out = _skip_step(layer, batch, hidden_states, residual)
    if batch is not None and layer.layer_idx == layer.last_layer:
        batch.finish()
    return out


def _skip_step(
    layer: FFNSkipDecoderLayer,
    batch: SkipBatch,
    hidden_states: torch.Tensor,
    residual: torch.Tensor,
) -> torch.Tensor:
    l = layer.layer_idx
    if not batch.layer_hot_any[l]:
        batch.budget[:] = 0  # a cold layer ends every token's skip run
        return layer.mlp_in_op(hidden_states)
    hot = batch.hot[:, l]
    skip = hot & (batch.budget > 0)
    # Budgets: a skipped layer spends one; a cold layer clears it; a computed hot layer
    # sets it below from its score.
    batch.budget -= skip
    batch.budget[~hot] = 0
    batch.skipped += skip
    run = ~skip
    # Decode batches are often all-run or all-skip at a layer: no gathers then.
    if run.all():
        out = layer.mlp_in_op(hidden_states)
    else:
        out = torch.zeros_like(hidden_states)
        rows = np.flatnonzero(run)
        if rows.size:
            index = torch.from_numpy(rows).to(hidden_states.device)
            out[index] = layer.mlp_in_op(hidden_states[index])
    test = hot & run
    if test.all():
        score = saturation(residual, out)
        batch.budget[:] = np.where(score >= batch.thresholds[:, l], batch.span, 0)
    elif test.any():
        rows = np.flatnonzero(test)
        index = torch.from_numpy(rows).to(hidden_states.device)
        score = saturation(residual[index], out[index])
        batch.budget[rows] = np.where(score >= batch.thresholds[rows, l], batch.span[rows], 0)
    else:
        return out
    if RECORDER.enabled:
        RECORDER.add(l, score.tolist())
    return out


def _ffnskip_mlp_fake(
    hidden_states: torch.Tensor,
    residual: torch.Tensor,
    positions: torch.Tensor,
    layer_name: str,
) -> torch.Tensor:
    return torch.empty_like(hidden_states)


direct_register_custom_op(
    op_name="ffnskip_mlp",
    op_func=ffnskip_mlp,
    mutates_args=[],
    fake_impl=_ffnskip_mlp_fake,
)
