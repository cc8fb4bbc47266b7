"""Tuned launch plans (``vllm_ffnskip/kernels/plans.py``): the files ``kernel_tune.py`` writes,
how the op looks them up, and where it runs the Triton kernels rather than cuBLAS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_ffnskip.kernels import plans

TUNER = Path(__file__).resolve().parents[2] / "benchmarks" / "kernel_tune.py"


def tuned(us: float, cublas_us: float, block_n: int = 16) -> plans.TunedPlan:
    tile = plans.TileConfig(16, block_n, 128, True, num_warps=4, num_stages=4)
    return plans.TunedPlan(plans.SkipMLPPlan(False, tile, tile), us, cublas_us)


def test_file_name_follows_vllms_tuned_config_layout() -> None:
    assert (plans.config_file_name(4096, 11008, torch.bfloat16, "NVIDIA_H200")
            == "H=4096,I=11008,dtype=bfloat16,device_name=NVIDIA_H200.json")


def test_written_plans_read_back_and_the_nearest_batch_size_is_used(tmp_path: Path) -> None:
    written = {1: tuned(70.0, 74.0, 16), 8: tuned(90.0, 80.0, 32), 32: tuned(85.0, 82.0, 64)}
    name = plans.config_file_name(64, 128, torch.float16, "GPU_X")
    plans.write_tuned_plans(tmp_path / name, written, {"device": "GPU_X"})
    read = plans.tuned_plans(64, 128, torch.float16, "GPU_X", tmp_path)
    assert read == written
    assert plans.tuned_plans(64, 128, torch.bfloat16, "GPU_X", tmp_path) == {}  # other dtype
    assert [plans.nearest(read, t).plan.gate_up.block_n for t in (1, 4, 5, 20, 21, 500)] == [
        16, 16, 32, 32, 64, 64]  # ties go to the smaller batch size


def test_kernels_run_only_where_their_tuned_time_is_close_to_cublas() -> None:
    table = {1: tuned(70.0, 74.0), 8: tuned(90.0, 80.0), 32: tuned(88.0, 80.0)}
    assert plans.competitive_plan(table, 1) == table[1].plan  # faster than cuBLAS
    assert plans.competitive_plan(table, 8) is None  # 1.125x cuBLAS: cuBLAS runs
    assert plans.competitive_plan(table, 32) == table[32].plan  # 1.1x: at the limit
    assert plans.competitive_plan({}, 1) is None  # untuned: cuBLAS


def test_kernel_form_pays_only_with_a_competitive_tuned_plan(tmp_path: Path) -> None:
    slow = {1: tuned(99.0, 74.0), 8: tuned(134.0, 80.0)}  # the untuned tiles on an H200
    plans.write_tuned_plans(tmp_path / plans.config_file_name(8, 16, torch.bfloat16, "A"), slow, {})
    plans.write_tuned_plans(tmp_path / plans.config_file_name(8, 16, torch.bfloat16, "B"),
                            {**slow, 2: tuned(75.0, 76.0)}, {})
    assert not plans.kernels_pay(8, 16, torch.bfloat16, "A", tmp_path)
    assert plans.kernels_pay(8, 16, torch.bfloat16, "B", tmp_path)
    assert not plans.kernels_pay(8, 16, torch.bfloat16, "C", tmp_path)  # no file


def test_kernel_plan_is_cublas_off_cuda() -> None:
    assert plans.kernel_plan(torch.zeros(1, 8), torch.zeros(32, 8)) is None


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="sets it itself")
def test_tuner_writes_a_file_the_op_reads(tmp_path: Path) -> None:
    """The tuner's plumbing end to end under Triton's interpreter (its timings mean nothing
    there): one plan per batch size, each with both kernels' tiles and cuBLAS's time."""
    pytest.importorskip("triton")
    proc = subprocess.run(
        [sys.executable, str(TUNER), "--device", "cpu", "--shapes", "16x32", "--batches", "2,17",
         "--write", "--config-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    read = plans.tuned_plans(16, 32, torch.bfloat16, "cpu", tmp_path)
    assert sorted(read) == [2, 17]
    assert not read[2].plan.compact and read[17].plan.compact
    assert all(p.us > 0 and p.cublas_us > 0 for p in read.values())
    meta = json.loads(next(tmp_path.iterdir()).read_text())["meta"]
    assert meta["device"] == "cpu" and "kernel_tune.py" in meta["command"]


def test_operator_folder_is_read_before_the_shipped_files(tmp_path: Path, monkeypatch) -> None:
    """``VLLM_TUNED_CONFIG_FOLDER`` (vLLM's variable for tuned kernel configs, e.g. a mounted
    ConfigMap) is looked up first; without a file there, the shipped folder is."""
    user, shipped = tmp_path / "user", tmp_path / "shipped"
    name = plans.config_file_name(8, 16, torch.bfloat16, "GPU_Y")
    plans.write_tuned_plans(shipped / name, {1: tuned(99.0, 74.0)}, {})
    monkeypatch.setattr(plans, "CONFIG_DIR", shipped)
    monkeypatch.setenv(plans.TUNED_CONFIG_FOLDER_ENV, str(user))
    plans.tuned_plans.cache_clear()
    assert plans.tuned_plans(8, 16, torch.bfloat16, "GPU_Y")[1].us == 99.0  # none in user
    plans.write_tuned_plans(user / name, {1: tuned(70.0, 74.0)}, {})
    plans.tuned_plans.cache_clear()
    assert plans.tuned_plans(8, 16, torch.bfloat16, "GPU_Y")[1].us == 70.0
    assert plans.config_dirs() == [user, shipped]
    plans.tuned_plans.cache_clear()
