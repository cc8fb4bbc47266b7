"""Correctness of the skip-aware FFN op (``vllm_ffnskip.kernels``).

* Reference tests: plain torch, always run.
* Interpreter tests: the Triton kernels run under ``TRITON_INTERPRET=1`` in a subprocess
  (``interp_worker.py``), so the interpreter never leaks into this process or other test folders.
  Skipped when Triton is not installed.
* Compile test: the kernels compile to cubin for sm_80/sm_90 without a GPU (the interpreter checks
  semantics, not whether the code compiles).
* CUDA tests: compiled kernels, CUDA-graph capture with a changing mask, no device-to-host sync.
  They need a GPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_ffnskip.kernels import dense_mlp, skip_mlp, skip_mlp_reference, triton_available

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
_spec = importlib.util.spec_from_file_location("_ffnskip_interp_worker", HERE / "interp_worker.py")
worker = sys.modules.setdefault(_spec.name, importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(worker)  # CASES only; the worker imports Triton inside its own process

NO_TRITON = "triton is not installed (pip install 'triton==3.9.0'): Triton kernels not tested"
needs_triton = pytest.mark.skipif(not triton_available(), reason=NO_TRITON)
needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and triton_available()),
                                reason="needs a CUDA GPU and triton")

# Max |kernel - fp32 reference| / max(1, |reference|) on active rows: a few ulps of the dtype.
REL_TOL = {"float32": 1e-5, "float16": 4e-3, "bfloat16": 3e-2}


def _weights(h: int, i: int, dtype=torch.float32, device="cpu", seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    w_gate_up = (torch.randn(2 * i, h, generator=g, device=device) / h**0.5).to(dtype)
    w_down = (torch.randn(h, i, generator=g, device=device) / i**0.5).to(dtype)
    return w_gate_up, w_down


# --------------------------------------------------------------------------------------------------
# Reference (plain torch)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [1, 5, 33])
def test_reference_equals_dense_mlp_on_active_rows(t: int) -> None:
    torch.manual_seed(t)
    w_gate_up, w_down = _weights(64, 128)
    x = torch.randn(t, 64)
    active = torch.rand(t) < 0.5
    active[0] = True
    out = skip_mlp_reference(x, active, w_gate_up, w_down)

    # Spelled out: the first I rows of the merged weight are gate, the next I rows up.
    gate, up = x @ w_gate_up[:128].T, x @ w_gate_up[128:].T
    dense = (torch.nn.functional.silu(gate) * up) @ w_down.T
    torch.testing.assert_close(out[active], dense[active])
    torch.testing.assert_close(dense_mlp(x, w_gate_up, w_down), dense)
    assert torch.equal(out[~active], torch.zeros_like(out[~active]))


def test_reference_inactive_rows_stay_zero_with_nonfinite_input() -> None:
    w_gate_up, w_down = _weights(16, 32)
    x = torch.randn(3, 16)
    x[1] = float("nan")
    x[2] = float("inf")
    out = skip_mlp_reference(x, torch.tensor([1, 0, 0], dtype=torch.int8), w_gate_up, w_down)
    assert torch.equal(out[1:], torch.zeros(2, 16))
    assert torch.isfinite(out[0]).all()


def test_dispatcher_uses_reference_off_cuda() -> None:
    w_gate_up, w_down = _weights(16, 32)
    x, active = torch.randn(4, 16), torch.tensor([True, False, True, False])
    expected = skip_mlp_reference(x, active, w_gate_up, w_down)
    assert torch.equal(skip_mlp(x, active, w_gate_up, w_down), expected)


@pytest.mark.parametrize("mask", ["none", "all", "mixed"])
def test_masked_mlp_op_writes_into_its_output(mask: str) -> None:
    """The graph's custom op (vllm::ffnskip_masked_mlp) writes into the output it is given,
    called eagerly and traced (functionalized, as torch.compile sees it)."""
    pytest.importorskip("vllm", reason="the op is registered through vLLM")
    from vllm_ffnskip import masked_mlp  # noqa: F401  (registers the op)

    w_gate_up, w_down = _weights(16, 32)
    x = torch.randn(5, 16)
    active = {"none": torch.ones(5, dtype=torch.bool), "all": torch.zeros(5, dtype=torch.bool),
              "mixed": torch.tensor([True, False, True, False, False])}[mask]
    expected = skip_mlp_reference(x, active, w_gate_up, w_down)
    out = torch.full_like(x, float("nan"))
    torch.ops.vllm.ffnskip_masked_mlp(out, x, active, w_gate_up, w_down)
    assert torch.equal(out, expected)

    def traced(x: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        torch.ops.vllm.ffnskip_masked_mlp(out, x, active, w_gate_up, w_down)
        return out

    compiled = torch.compile(traced, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x, active), expected)


@pytest.mark.parametrize("bad", ["active_shape", "active_dtype", "w_down_shape", "dtype_mismatch"])
def test_reference_rejects_bad_arguments(bad: str) -> None:
    w_gate_up, w_down = _weights(16, 32)
    x, active = torch.randn(4, 16), torch.ones(4, dtype=torch.bool)
    if bad == "active_shape":
        active = torch.ones(5, dtype=torch.bool)
    elif bad == "active_dtype":
        active = torch.ones(4)
    elif bad == "w_down_shape":
        w_down = w_down[:, :16]
    else:
        x = x.double()
    with pytest.raises((ValueError, TypeError)):
        skip_mlp_reference(x, active, w_gate_up, w_down)


# --------------------------------------------------------------------------------------------------
# Triton kernels under the interpreter (subprocess)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def interp_results() -> dict:
    """Run every interpreter case once, in a fresh process with TRITON_INTERPRET=1."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, str(HERE / "interp_worker.py")], env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not proc.stdout.strip():
        pytest.fail(f"interpreter worker failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_triton
@pytest.mark.parametrize("case", worker.CASES, ids=[c.id for c in worker.CASES])
def test_triton_interpreter_matches_reference(case, interp_results: dict) -> None:
    if case.dtype == "bfloat16" and worker.uses_dot(case):
        pytest.skip(worker.BF16_DOT_UNSUPPORTED)
    r = interp_results[case.id]
    assert "error" not in r, r.get("error")
    assert r["out_shape"] == [case.t, case.h] and r["out_dtype"] == case.dtype
    assert r["wrote_into_out"], "the kernels must write into the preallocated output"
    assert r["skipped_rows_exact_zero"], "skipped rows must be exactly 0 (residual unchanged)"
    assert r["finite"]
    assert r["max_rel_err"] <= REL_TOL[case.dtype], r
    # Weight traffic: each weight element is read once per row tile holding a live row, never for
    # tiles (or a whole batch) of skipped rows: for an all-skipped batch, zero FFN weight bytes.
    assert r["weight_loads"] == r["expected_weight_loads"], r
    if case.mask == "all":
        assert r["weight_loads"] == 0


# --------------------------------------------------------------------------------------------------
# Ahead-of-time compilation for NVIDIA targets (no GPU needed)
# --------------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                    reason="kernels are interpreted in this process")
@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_for_nvidia(arch: int) -> None:
    """Every kernel variant the heuristics pick compiles to a cubin (bundled ptxas, no driver)."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, compile as triton_compile
    except ImportError as e:  # pragma: no cover - depends on the Triton build
        pytest.skip(f"this Triton build cannot compile ahead of time: {e}")
    from vllm_ffnskip.kernels import skip_mlp_triton as k

    div16 = [["tt.divisibility", 16]]  # what the JIT infers for aligned pointers and strides
    variants = {k.choose_plan(t, 4096, 11008, num_sms=132) for t in (1, 4, 16, 32, 512, 4096)}
    for plan in variants:
        for kern, cfg in ((k._gate_up_silu_kernel, plan.gate_up), (k._down_kernel, plan.down)):
            idx_ty = "*i32" if plan.compact else "*i8"
            types = ["*fp16", "*i8", idx_ty, idx_ty, "*fp16", "*fp16"] + ["i32"] * 6
            sig = dict(zip(kern.arg_names[:len(types)], types, strict=True))
            consts = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                          COMPACT=plan.compact, USE_DOT=cfg.use_dot, DOT_PRECISION="tf32",
                          GROUP_M=8)
            sig.update({name: "constexpr" for name in consts})
            attrs = {(j,): div16 for j in (0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11)}
            options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                           enable_fp_fusion=True)
            compiled = triton_compile(ASTSource(kern, sig, consts, attrs),
                                      target=GPUTarget("cuda", arch, 32), options=options)
            assert compiled.asm.get("cubin"), (kern, plan)
    sig = {"active_ptr": "*i8", "perm_ptr": "*i32", "count_ptr": "*i32", "T": "i32",
           "BLOCK": "constexpr"}
    compiled = triton_compile(ASTSource(k._compact_rows_kernel, sig, {"BLOCK": 1024}),
                              target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=4, enable_fp_fusion=True))
    assert compiled.asm.get("cubin")


# --------------------------------------------------------------------------------------------------
# Real GPU
# --------------------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("t", [1, 2, 4, 5, 16, 17, 64, 300])
def test_cuda_triton_matches_reference(t: int, dtype: torch.dtype) -> None:
    from vllm_ffnskip.kernels.skip_mlp_triton import skip_mlp_triton

    h, i = 512, 1376
    w_gate_up, w_down = _weights(h, i, dtype, "cuda")
    x = torch.randn(t, h, device="cuda").to(dtype)
    masks = (torch.rand(t, device="cuda") < 0.5, torch.zeros(t, dtype=torch.bool, device="cuda"),
             torch.ones(t, dtype=torch.bool, device="cuda"))
    for mask in masks:
        out = skip_mlp_triton(x, mask, w_gate_up, w_down)
        ref = skip_mlp_reference(x.double(), mask, w_gate_up.double(), w_down.double())
        assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))
        if mask.any():
            err = ((out.double() - ref)[mask].abs() / ref[mask].abs().clamp_min(1.0)).max()
            assert err <= REL_TOL[str(dtype).removeprefix("torch.")], (t, dtype, float(err))


@needs_cuda
@pytest.mark.parametrize("t", [1, 8, 64])
def test_cuda_graph_capture_with_changing_mask(t: int) -> None:
    """One capture, replayed with different device-side masks: every replay is correct."""
    from vllm_ffnskip.kernels.skip_mlp_triton import skip_mlp_triton

    h, i = 256, 704
    w_gate_up, w_down = _weights(h, i, torch.float16, "cuda")
    x = torch.randn(t, h, device="cuda", dtype=torch.float16)
    mask = torch.ones(t, dtype=torch.bool, device="cuda")
    skip_mlp_triton(x, mask, w_gate_up, w_down)  # JIT-compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = skip_mlp_triton(x, mask, w_gate_up, w_down)
    gen = torch.Generator(device="cuda").manual_seed(0)
    masks = [torch.zeros(t, dtype=torch.bool, device="cuda"),
             torch.ones(t, dtype=torch.bool, device="cuda")]
    masks += [torch.rand(t, device="cuda", generator=gen) < p for p in (0.3, 0.5, 0.7)]
    for new_mask in masks:
        mask.copy_(new_mask)
        graph.replay()
        ref = skip_mlp_reference(x, new_mask, w_gate_up, w_down)
        torch.testing.assert_close(out, ref, atol=4e-3, rtol=4e-3)
        assert torch.equal(out[~new_mask], torch.zeros_like(out[~new_mask]))


@needs_cuda
@pytest.mark.parametrize("t", [1, 16, 100])
def test_cuda_no_device_to_host_sync(t: int) -> None:
    from vllm_ffnskip.kernels.skip_mlp_triton import skip_mlp_triton

    h, i = 256, 704
    w_gate_up, w_down = _weights(h, i, torch.float16, "cuda")
    x = torch.randn(t, h, device="cuda", dtype=torch.float16)
    mask = torch.rand(t, device="cuda") < 0.5
    skip_mlp_triton(x, mask, w_gate_up, w_down)  # JIT-compile first: not the steady state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            skip_mlp_triton(x, mask, w_gate_up, w_down)
            skip_mlp_reference(x, mask, w_gate_up, w_down)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
def test_cuda_dispatcher_runs_cublas_without_a_competitive_tuned_plan() -> None:
    """No tuned plan for this shape on this GPU: the op is the reference (cuBLAS, then the
    mask), bit for bit."""
    w_gate_up, w_down = _weights(256, 704, torch.bfloat16, "cuda")
    x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
    mask = torch.rand(8, device="cuda") < 0.5
    assert torch.equal(skip_mlp(x, mask, w_gate_up, w_down),
                       skip_mlp_reference(x, mask, w_gate_up, w_down))
