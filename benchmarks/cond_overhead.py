"""What ``torch.cond`` around an MLP costs in plain ``torch.compile`` on the CPU (no vLLM):
the spike behind graph_skip.py (docs/results.md §4).

    python benchmarks/cond_overhead.py

30 layers of SmolLM2-135M's MLP shapes (fp32, distinct weights, batch 1), every MLP run.
Rows: no cond; cond with a predicate computed in the graph; cond with a predicate from a
Python custom op (what an opaque decision op per layer would cost).
"""

import statistics
import time

import torch
from torch.library import custom_op

H, I, LAYERS = 576, 1536, 30


@custom_op("ffnskip_bench::decide", mutates_args=())
def decide(h: torch.Tensor) -> torch.Tensor:
    return (h.sum() > -1e30).reshape(())


@decide.register_fake
def _(h: torch.Tensor) -> torch.Tensor:
    return torch.empty((), dtype=torch.bool)


def build(predicate):
    w_up = [torch.randn(2 * I, H) for _ in range(LAYERS)]
    w_down = [torch.randn(H, I) for _ in range(LAYERS)]

    def mlp(x, up, down):
        y = x @ up.t()
        return (torch.nn.functional.silu(y[..., :I]) * y[..., I:]) @ down.t()

    def forward(x):
        for up, down in zip(w_up, w_down):
            if predicate is None:
                out = mlp(x, up, down)
            else:
                out = torch.cond(
                    predicate(x), lambda x, u=up, d=down: mlp(x, u, d), torch.zeros_like, (x,)
                )
            x = torch.nn.functional.rms_norm(x + out, (H,))
        return x

    return torch.compile(forward)


def timed(fn, x, calls=50, rounds=5) -> float:
    fn(x)
    fn(x)
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn(x)
        samples.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(samples)


if __name__ == "__main__":
    torch.manual_seed(0)
    x = torch.randn(1, H)
    variants = {
        "no cond": None,
        "cond, predicate in the graph": lambda h: h.sum() > -1e30,
        "cond, predicate from a Python custom op": decide,
    }
    base = None
    print("| variant | ms per pass | vs no cond |\n|---|---|---|")
    for name, predicate in variants.items():
        ms = timed(build(predicate), x)
        base = base or ms
        print(f"| {name} | {ms:.2f} | {ms / base:.3f} |")
