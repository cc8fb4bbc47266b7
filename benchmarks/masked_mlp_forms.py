"""What the CPU's masked-MLP form costs and saves per pass width, compiled as in vLLM.

26 layers of the embedded model's MLP (the hot layers of SmolLM2-135M), oneDNN GEMMs as vLLM's
CPU linear layers call them, one ``torch.compile`` graph with a dynamic pass width. Per width T
and share p of rows skipping each layer (drawn at random, per layer):

* ``mask``: every row computed, then masked (what a pass costs with nothing saved);
* ``cond``: ``masked_mlp``'s ``cond`` form (the default server's narrow passes): no weights read
  where every row skips, every row computed and masked where some skip;
* ``gather``: ``masked_mlp``'s ``gather`` form (wide passes, ``wide_skip_rows``): as ``cond``,
  and where some rows skip, the running rows gathered and computed alone (``running_rows_mlp``).

The floor a perfect gather could reach: the ``mask`` form on ``round(T·(1−p))`` rows alone
(``rows alone``). Times in ms per pass of 26 layers, median of ``--repeats``; run it alone on
the machine, with the thread count of a served vLLM worker (one per core it owns).

    python benchmarks/masked_mlp_forms.py [--rows 1,2,8,16,32,64] [--skip 0,0.25,1] [--dtype float32]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from vllm import _custom_ops as ops

from vllm_ffnskip.masked_mlp import masked_mlp

HIDDEN, INTERMEDIATE, HOT_LAYERS = 576, 1536, 26  # SmolLM2-135M


class OneDNNMLP(nn.Module):
    """A LLaMa MLP whose GEMMs are vLLM's CPU ``onednn_mm`` (as its linear layers run)."""

    def __init__(self, dtype: torch.dtype, hidden: int = HIDDEN, intermediate: int = INTERMEDIATE) -> None:
        super().__init__()
        self.gate_up = ops.create_onednn_mm((torch.randn(2 * intermediate, hidden) * 0.02).to(dtype).t(), 32)
        self.down = ops.create_onednn_mm((torch.randn(hidden, intermediate) * 0.02).to(dtype).t(), 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = ops.onednn_mm(self.gate_up, x, None).chunk(2, dim=-1)
        return ops.onednn_mm(self.down, F.silu(gate) * up, None)


def median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,8,16,32,64")
    parser.add_argument("--skip", default="0,0.25,1")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    mlps = [OneDNNMLP(dtype) for _ in range(HOT_LAYERS)]

    def stack(form: str):
        def run_layers(x: torch.Tensor, runs: torch.Tensor) -> torch.Tensor:
            for mlp, run in zip(mlps, runs):
                x = x + masked_mlp(form, mlp, x, run)
            return x

        return torch.compile(run_layers, fullgraph=True, dynamic=True)

    forms = {name: stack(name) for name in ("mask", "cond", "gather")}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}")
    print("| T | p skip | mask ms | cond / mask | gather / mask | rows alone / mask |")
    print("|---|---|---|---|---|---|")
    with torch.no_grad():
        for t in map(int, args.rows.split(",")):
            x = torch.randn(t, HIDDEN, dtype=dtype) * 0.1
            for p in map(float, args.skip.split(",")):
                runs = torch.rand(HOT_LAYERS, t) >= p
                ms = {name: median_ms(lambda f=f: f(x, runs), args.repeats) for name, f in forms.items()}
                k = round(t * (1 - p))
                every_row = torch.ones(HOT_LAYERS, k, dtype=torch.bool)
                alone = median_ms(lambda: forms["mask"](x[:k], every_row), args.repeats) if k else 0.0
                print(f"| {t} | {p:g} | {ms['mask']:.2f} | {ms['cond'] / ms['mask']:.3f} | "
                      f"{ms['gather'] / ms['mask']:.3f} | {alone / ms['mask']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
