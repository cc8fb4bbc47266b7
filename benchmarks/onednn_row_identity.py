"""Which gathered row counts k give a row bit for bit what it gets among all T rows?

vLLM's CPU GEMM (``onednn_mm``), the embedded model's MLP shape, fp32 and bf16; prints the
(T, k) pairs whose gathered rows differ. Found on the 2-core EPYC: only k = 1 (a GEMV), which
is why ``masked_mlp.running_rows_mlp`` never gathers a single row. k >= 2 is a test
(tests/test_masked_mlp.py); k = 1 is printed here, since it may differ by CPU.

    python benchmarks/onednn_row_identity.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from vllm import _custom_ops as ops

HIDDEN, INTERMEDIATE = 576, 1536  # SmolLM2-135M
ROWS = [*range(1, 17), 24, 32, 48, 64]


def main() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        gate_up = ops.create_onednn_mm((torch.randn(2 * INTERMEDIATE, HIDDEN) * 0.02).to(dtype).t(), 32)
        down = ops.create_onednn_mm((torch.randn(HIDDEN, INTERMEDIATE) * 0.02).to(dtype).t(), 32)

        def mlp(x: torch.Tensor) -> torch.Tensor:
            gate, up = ops.onednn_mm(gate_up, x, None).chunk(2, dim=-1)
            return ops.onednn_mm(down, F.silu(gate) * up, None)

        differ = []
        for t in ROWS:
            x = torch.randn(t, HIDDEN, dtype=dtype)
            every_row = mlp(x)
            for k in range(1, t + 1):
                rows = torch.randperm(t)[:k].sort().values
                if not torch.equal(mlp(x[rows]), every_row[rows]):
                    differ.append((t, k))
        print(f"{dtype}: (T, k) with differing rows: {differ or 'none'}")


if __name__ == "__main__":
    main()
