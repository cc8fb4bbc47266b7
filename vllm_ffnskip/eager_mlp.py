"""A decoder layer's ``LlamaMLP`` as called eagerly from inside the opaque skip op.

Inside the op the MLP leaves the compiled graph, and on a small CPU the Python around its
three kernels costs as much as the kernels (measured in the engine, SmolLM2 at batch 1:
280 us per MLP through the modules, 190 us through the same kernels called directly; the
compiled graph's MLP takes ~170 us). So where vLLM exposes the kernels it chose, the op
calls them directly; everywhere else it calls the modules, as ``LlamaMLP.forward`` does.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from vllm.distributed import get_tensor_model_parallel_world_size, tensor_model_parallel_all_reduce
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.fusion.fused_act_quant import maybe_fused_act_quant
from vllm.model_executor.models.llama import LlamaMLP

from vllm_ffnskip.patches.cpu_gemm import prepared_gemm

MLPCall = Callable[[torch.Tensor], torch.Tensor]


class SiluAndMulInOp(nn.Module):
    """SiLU-and-mul for an MLP that runs eagerly inside the op, with compilation on.

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


def eager_mlp(mlp: LlamaMLP, act: nn.Module) -> MLPCall:
    """``mlp``'s forward for eager calls, with ``act`` as its activation.

    Call after the weights are processed: the kernels are those vLLM prepared at load time.
    """
    gate_up = prepared_gemm(mlp.gate_up_proj)
    down = prepared_gemm(mlp.down_proj)
    if gate_up is None or down is None or not isinstance(mlp.act_fn, SiluAndMul):

        def through_modules(x: torch.Tensor) -> torch.Tensor:
            x, _ = mlp.gate_up_proj(x)
            x = maybe_fused_act_quant(act, x, mlp.down_proj)
            x, _ = mlp.down_proj(x)
            return x

        return through_modules
    reduce = mlp.down_proj.reduce_results and get_tensor_model_parallel_world_size() > 1

    def through_kernels(x: torch.Tensor) -> torch.Tensor:
        x = down(act(gate_up(x)))
        return tensor_model_parallel_all_reduce(x) if reduce else x

    return through_kernels
