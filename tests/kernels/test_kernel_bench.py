"""CPU-side checks of ``benchmarks/kernel_bench.py`` (the timings themselves need a GPU)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "kernel_bench.py"
_spec = importlib.util.spec_from_file_location("_ffnskip_kernel_bench", BENCH)
bench = sys.modules.setdefault(_spec.name, importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(bench)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the benchmark would run")
def test_benchmark_refuses_without_cuda(tmp_path: Path) -> None:
    out = tmp_path / "bench.md"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--out", str(out)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "no CUDA GPU" in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("mode", ["iid", "batch"])
@pytest.mark.parametrize("t,frac", [(1, 0.3), (8, 0.1), (64, 0.5), (3, 0.0)])
def test_masks_skip_the_requested_fraction(t: int, frac: float, mode: str) -> None:
    layers = 20
    masks = bench.make_masks(t, layers, frac, mode, torch.Generator().manual_seed(0), device="cpu")
    assert masks.shape == (layers, t) and masks.dtype == torch.bool
    expected = round(frac * layers) * t if mode == "batch" else round(frac * layers * t)
    assert int((~masks).sum()) == expected
    if mode == "batch":  # whole layers skip together
        assert all(bool(row.all()) or not bool(row.any()) for row in masks)
