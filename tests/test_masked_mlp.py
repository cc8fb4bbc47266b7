"""The CPU's ``gather`` form of the masked MLP: which rows its MLP computes, and what it returns,
eagerly and compiled as vLLM compiles the skip graph (one graph for every pass width)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vllm_ffnskip.masked_mlp import masked_mlp

HIDDEN = 8


class RowCountMLP(nn.Module):
    """A stand-in MLP whose every output row carries the number of rows it was computed
    among (``torch.cond`` traces its branches even eagerly, so the count cannot be recorded
    as a side effect), and is never 0 (a zero row was not computed)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(HIDDEN, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(x)) + 2.0 + 1000.0 * x.shape[0]

    def expected(self, x: torch.Tensor, computed_rows: int) -> torch.Tensor:
        return torch.tanh(self.proj(x)) + 2.0 + 1000.0 * computed_rows


@pytest.mark.parametrize(
    "run,computed",  # computed: how many rows the MLP computes
    [
        ([True], 1),
        ([False], 0),  # nothing runs: no MLP call, no weights read
        ([True, True, True, True], 4),  # every row runs: no gather
        ([False, True, False, True], 4),  # the gather's least: MIN_GATHER_ROWS
        ([True, False, False], 3),  # narrower than that: the whole pass (never a GEMV)
        ([False, False, False, False], 0),
        ([False, False, True, False, False, False, False, False], 4),  # one row, padded
        ([True, True, False, True, False, True, True, False], 5),
    ],
)
def test_gather_form_computes_only_the_running_rows(run, computed):
    torch.manual_seed(0)
    mlp = RowCountMLP()
    run = torch.tensor(run)
    x = torch.randn(len(run), HIDDEN)
    with torch.no_grad():
        out = masked_mlp("gather", mlp, x, run)
        expected = mlp.expected(x, computed)
    assert torch.equal(out[run], expected[run])
    assert torch.equal(out[~run], torch.zeros_like(out[~run]))


def test_gather_form_compiles_with_a_dynamic_width():
    """One dynamic-shape graph, as vLLM traces the skip graph (``fullgraph``: the gather's row
    count, read from the device, must not break it): every width and mask gives the eager
    result, with no recompilation."""
    torch.manual_seed(0)
    mlp = RowCountMLP()
    calls = []

    def layer(x: torch.Tensor, run: torch.Tensor) -> torch.Tensor:
        return masked_mlp("gather", mlp, x, run)

    def backend(gm, example_inputs):
        calls.append(gm)
        return gm

    compiled = torch.compile(layer, backend=backend, fullgraph=True, dynamic=True)
    with torch.no_grad():
        cases = [(4, [0, 2]), (6, [1]), (6, []), (6, range(6)), (9, [3, 4, 8]), (3, [1]), (2, [0])]
        for t, running in cases:
            x = torch.randn(t, HIDDEN)
            run = torch.zeros(t, dtype=torch.bool)
            run[list(running)] = True
            got = compiled(x, run)
            assert torch.equal(got, layer(x, run)), (t, running)
    assert len(calls) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_onednn_rows_do_not_depend_on_their_neighbours(dtype):
    """Why the gather keeps dense rows' tokens: vLLM's CPU GEMM (``onednn_mm``, as its linear
    layers call it) gives a row computed among any k >= 2 gathered rows bit for bit what it
    gives among all T (one row alone is a GEMV, which ``running_rows_mlp`` never runs: it
    gathers at least ``MIN_GATHER_ROWS``)."""
    from vllm import _custom_ops as ops

    if not ops._supports_onednn:
        pytest.skip("this vLLM build has no oneDNN GEMM")
    torch.manual_seed(0)
    hidden, inter = 576, 1536  # the embedded model's MLP
    gate_up = ops.create_onednn_mm((torch.randn(2 * inter, hidden) * 0.02).to(dtype).t(), 32)
    down = ops.create_onednn_mm((torch.randn(hidden, inter) * 0.02).to(dtype).t(), 32)

    def mlp(x: torch.Tensor) -> torch.Tensor:
        gate, up = ops.onednn_mm(gate_up, x, None).chunk(2, dim=-1)
        return ops.onednn_mm(down, torch.nn.functional.silu(gate) * up, None)

    for t in [*range(2, 17), 24, 32]:
        x = torch.randn(t, hidden, dtype=dtype)
        every_row = mlp(x)
        for k in range(2, t + 1):
            rows = torch.randperm(t)[:k].sort().values
            assert torch.equal(mlp(x[rows]), every_row[rows]), (t, k)


def test_cuda_runs_the_kernel_form_only_with_a_competitive_tuned_plan(tmp_path, monkeypatch):
    """On a GPU, an FFN shape without a tuned kernel plan close to cuBLAS runs the ``mask``
    form (cuBLAS): the untuned kernels were 1.3-7x slower than cuBLAS on an H200."""
    from types import SimpleNamespace

    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    from vllm_ffnskip import masked_mlp as mm
    from vllm_ffnskip.kernels import plans

    monkeypatch.setattr(mm, "current_platform", SimpleNamespace(is_cuda_alike=lambda: True))
    monkeypatch.setattr(mm, "device_name_of", lambda device: "GPU_X")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(plans, "CONFIG_DIR", tmp_path)
    monkeypatch.delenv("VLLM_FFNSKIP_MASKED_MLP", raising=False)

    def linear(rows: int, cols: int):
        return SimpleNamespace(quant_method=UnquantizedLinearMethod(), bias=None,
                               weight=torch.empty(rows, cols, dtype=torch.bfloat16))

    mlp = SimpleNamespace(gate_up_proj=linear(2 * 48, 16), down_proj=linear(16, 48))
    mm._kernels_pay.cache_clear()
    plans.tuned_plans.cache_clear()
    assert mm.form_for(mlp, wide_passes=False) == "mask"  # no file

    tile = plans.TileConfig(16, 16, 64, True)
    fast = plans.TunedPlan(plans.SkipMLPPlan(False, tile, tile), 70.0, 74.0)
    plans.write_tuned_plans(
        tmp_path / plans.config_file_name(16, 48, torch.bfloat16, "GPU_X"), {1: fast}, {})
    mm._kernels_pay.cache_clear()
    plans.tuned_plans.cache_clear()
    assert mm.form_for(mlp, wide_passes=False) == "kernel"
    mm._kernels_pay.cache_clear()
    plans.tuned_plans.cache_clear()
