"""What calling a Python custom op costs, apart from its body (docs/results.md §4).

    python benchmarks/op_dispatch.py

Registers a no-op with vLLM's ``direct_register_custom_op`` (as skip_ffn.py does) and times
a direct Python call against ``torch.ops.vllm.<op>`` on a [1, 576] tensor.
"""

import time

import torch
from vllm.utils.torch_utils import direct_register_custom_op


def probe(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, name: str) -> torch.Tensor:
    return torch.empty_like(a)


def per_call_us(fn, n: int = 20000) -> float:
    for _ in range(200):
        fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


if __name__ == "__main__":
    direct_register_custom_op(op_name="ffnskip_probe", op_func=probe, mutates_args=[],
                              fake_impl=probe)
    a, c = torch.randn(1, 576), torch.zeros(1, dtype=torch.long)
    body = per_call_us(lambda: probe(a, a, c, "x"))
    op = per_call_us(lambda: torch.ops.vllm.ffnskip_probe(a, a, c, "model.layers.0.ffnskip"))
    print(f"python call {body:.2f} us, torch.ops call {op:.2f} us, dispatch {op - body:.2f} us")
