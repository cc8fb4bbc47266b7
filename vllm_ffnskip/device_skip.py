"""The skip step with its per-token state on the accelerator: no device-to-host sync per layer.

Used on CUDA, where the rule cannot run in the captured graph the way graph_skip.py runs it
on the CPU (``torch.cond`` reads its predicate on the host). The state of a pass (hot layers,
thresholds, spans, budgets) is uploaded once; every layer's opaque op (skip_ffn.py) runs a
fixed-shape sequence of device ops, and the FFN is the skip-aware kernel
(``kernels.skip_mlp``: on CUDA, Triton programs whose rows are all skipped exit before
reading weights). The pass's skip counts come back once, after its last layer.

``VLLM_FFNSKIP_DEVICE_STATE=1`` forces this path elsewhere, which is how CI checks it
against the graph path and the reference.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from vllm.distributed import get_tensor_model_parallel_world_size, tensor_model_parallel_all_reduce
from vllm.model_executor.layers.linear import UnquantizedLinearMethod
from vllm.platforms import current_platform

from vllm_ffnskip.batch import SkipBatch, rule_step
from vllm_ffnskip.kernels import skip_mlp
from vllm_ffnskip.stats import RECORDER

if TYPE_CHECKING:
    from vllm_ffnskip.model import FFNSkipDecoderLayer

#: Set to 1 to run the device-resident step on any device (tests; the default is CUDA only).
FORCE_ENV = "VLLM_FFNSKIP_DEVICE_STATE"


def use_device_state() -> bool:
    return current_platform.is_cuda() or os.environ.get(FORCE_ENV) == "1"


@dataclass
class DeviceSkipBatch:
    """A SkipBatch's per-token state as tensors on the model's device."""

    host: SkipBatch
    hot: torch.Tensor  # [T, L] bool
    thresholds: torch.Tensor  # [T, L] float32
    span: torch.Tensor  # [T] int32
    budget: torch.Tensor  # [T] int32
    skipped: torch.Tensor  # [T] int32

    @classmethod
    def upload(cls, host: SkipBatch, device: torch.device) -> DeviceSkipBatch:
        def put(array) -> torch.Tensor:  # host -> device, no sync
            return torch.from_numpy(array).to(device, non_blocking=True)

        return cls(
            host=host,
            hot=put(host.hot),
            thresholds=put(host.thresholds),
            span=put(host.span),
            budget=put(host.budget),
            skipped=put(host.skipped),
        )

    def download(self) -> None:
        """After the pass: counts (and budgets, for the next pipeline stage) to the host."""
        self.host.skipped[:] = self.skipped.cpu().numpy()
        self.host.budget[:] = self.budget.cpu().numpy()


def skip_step(
    layer: FFNSkipDecoderLayer,
    batch: DeviceSkipBatch,
    hidden_states: torch.Tensor,
    residual: torch.Tensor,
) -> torch.Tensor:
    """The rule (batch.rule_step) as fixed-shape device ops, around the skip-aware kernel."""
    l = layer.layer_idx
    if not batch.host.layer_hot_any[l]:  # host-side fact of the pass: no sync
        batch.budget.zero_()
        return layer.mlp_in_op(hidden_states)
    hot = batch.hot[:, l]
    skip = hot & (batch.budget > 0)
    batch.skipped += skip
    run = ~skip
    out = masked_mlp(layer, hidden_states, run)
    batch.budget, score = rule_step(
        hot, skip, batch.budget, residual, out, batch.thresholds[:, l], batch.span
    )
    if RECORDER.enabled:  # profiling only: reads the scores back
        RECORDER.add(l, score[(hot & run).cpu()].tolist())
    return out


def masked_mlp(layer: FFNSkipDecoderLayer, x: torch.Tensor, run: torch.Tensor) -> torch.Tensor:
    """The layer's MLP on rows where ``run`` is set, exactly 0 elsewhere, with no sync.

    Unquantized weights go to the skip-aware kernel (tensor-parallel shards are reduced
    after it, as ``RowParallelLinear`` does); other layers compute densely and mask.
    """
    mlp = layer.mlp
    plain = all(
        isinstance(p.quant_method, UnquantizedLinearMethod) and p.bias is None
        for p in (mlp.gate_up_proj, mlp.down_proj)
    )
    if plain and x.is_cuda:
        out = skip_mlp(x, run, mlp.gate_up_proj.weight, mlp.down_proj.weight)
        if get_tensor_model_parallel_world_size() > 1:
            out = tensor_model_parallel_all_reduce(out)
        return out
    return torch.where(run.unsqueeze(-1), layer.mlp_in_op(x), 0)
