"""Does a pass of T rows with k running cost k rows of FFN when the running rows are gathered?

The question behind issue 15's "compute-bound passes compute only the rows that run": on this
CPU, is an FFN of T rows weight-bound (then only an all-skip layer saves) or compute-bound
(then computing the k running rows saves (T − k)/T of it)? Times, per layer of the embedded
model's shape (fp32 and bf16, torch's threads as vLLM sets them on this machine):

* ``full``: the MLP on all T rows, then the row mask (what the ``cond`` form runs when any
  row runs);
* ``gather k``: ``index_select`` of the k running rows, the MLP on them, ``index_copy`` back
  into zeros — the cost of a bucketed gather whose bucket is k rows;
* ``k rows``: the MLP on k rows alone (the floor a gather can reach).

    python benchmarks/row_gather.py [--rows 1,8,16,32,64] [--dtype float32,bfloat16]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

HIDDEN, INTERMEDIATE = 576, 1536  # SmolLM2-135M


def mlp(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, w_gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w_down)


def per_call_us(fn, repeats: int) -> float:
    for _ in range(10):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return 1e6 * (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,8,16,32,64")
    parser.add_argument("--dtype", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| dtype | T | full (µs) | k/T | gather k (µs) | k rows alone (µs) | gather / full |")
    print("|---|---|---|---|---|---|---|")
    for dtype in (getattr(torch, d) for d in args.dtype.split(",")):
        w_gate_up = torch.randn(2 * INTERMEDIATE, HIDDEN, dtype=dtype) * 0.02
        w_down = torch.randn(HIDDEN, INTERMEDIATE, dtype=dtype) * 0.02
        for t in map(int, args.rows.split(",")):
            x = torch.randn(t, HIDDEN, dtype=dtype)
            run = torch.ones(t, dtype=torch.bool)

            def full() -> torch.Tensor:
                return torch.where(run.unsqueeze(-1), mlp(x, w_gate_up, w_down), 0)

            full_us = per_call_us(full, args.repeats)
            for share in (0.25, 0.5, 0.75):
                k = max(1, round(share * t))
                if k == t:
                    continue
                rows = torch.randperm(t)[:k].sort().values

                def gathered() -> torch.Tensor:
                    out = torch.zeros_like(x)
                    return out.index_copy_(0, rows, mlp(x.index_select(0, rows), w_gate_up, w_down))

                alone = x[:k].clone()
                gather_us = per_call_us(gathered, args.repeats)
                alone_us = per_call_us(lambda: mlp(alone, w_gate_up, w_down), args.repeats)
                print(f"| {str(dtype).removeprefix('torch.')} | {t} | {full_us:.0f} | {k}/{t} | "
                      f"{gather_us:.0f} | {alone_us:.0f} | {gather_us / full_us:.2f} |")


if __name__ == "__main__":
    main()
