"""The GEMM vLLM prepared for an unquantized linear layer on the CPU (vLLM 0.32).

Not a patch: a read of an internal. vLLM 0.32's ``dispatch_cpu_unquantized_gemm`` stores
the kernel it chose for a CPU layer (oneDNN handle, packed sgl weights, zentorch or
``F.linear``) as ``layer.cpu_linear(x, weight, bias)`` when the weights are processed.
The skip op's MLP runs eagerly, where going through ``LinearBase.forward`` and
``UnquantizedLinearMethod.apply`` costs ~30 us of Python per GEMM on a small CPU (measured,
SmolLM2 at batch 1: gate_up 141 -> 112 us, down 92 -> 66 us) — as much as the GEMM.
Retire when vLLM's eager linear path is as cheap as its kernel call.
"""

from __future__ import annotations

from typing import Callable

import torch
from vllm.model_executor.layers.linear import UnquantizedLinearMethod
from vllm.platforms import current_platform


def prepared_gemm(layer: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``x -> x @ W.T`` of a bias-free, unquantized, shard-local CPU linear, as vLLM's own
    kernel; None where the module call must be kept (other platforms, quantized weights,
    a bias, gathered outputs, split inputs, or a vLLM without ``cpu_linear``)."""
    cpu_linear = getattr(layer, "cpu_linear", None)
    if not (
        current_platform.is_cpu()
        and callable(cpu_linear)
        and isinstance(getattr(layer, "quant_method", None), UnquantizedLinearMethod)
        and getattr(layer, "bias", None) is None
        and not getattr(layer, "gather_output", False)
        and getattr(layer, "input_is_parallel", True)
    ):
        return None
    weight = layer.weight
    return lambda x: cpu_linear(x, weight, None)
