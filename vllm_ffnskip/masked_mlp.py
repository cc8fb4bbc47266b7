"""The one platform-specific primitive of skipping: a decoder layer's MLP under a row mask.

``masked_mlp(mlp, x, run)`` is the MLP on rows where ``run`` is set and exactly 0 elsewhere,
inside the model's compiled graph, with the mask read on the device. Four forms:

* ``cond`` (the CPU): ``torch.cond`` runs the MLP only when some row of the pass runs it, so a
  layer that every row skips reads no FFN weights; rows skipped beside running ones are
  masked. The fastest form measured on the CPU for the passes the default server runs in the
  skip graph (at most ``max_skip_rows`` rows, docs/results.md §4).
* ``gather`` (the CPU, when the server runs wide passes in the skip graph: ``max_skip_rows``
  0 or ``wide_skip_rows`` set): as ``cond``, and where only some rows run, a second
  ``torch.cond`` gathers them (``running_rows_mlp``), so k running rows of a compute-bound
  FFN cost about k rows. That second branch would cost the default's narrow passes a
  ``torch.cond`` per layer for nothing (at 2 rows the gather holds both), hence two forms.
* ``kernel`` (CUDA, unquantized MLPs whose shape has a tuned kernel plan close to cuBLAS on
  this GPU, kernels/plans.py): the custom op ``vllm::ffnskip_masked_mlp`` writes into an
  output allocated in the graph; it runs the Triton kernels, whose programs exit before
  loading weights when all their rows skip, at the batch sizes where their tuned plan is
  close to cuBLAS, and cuBLAS then the mask at the others. No host value is read, so CUDA
  graphs (FULL and PIECEWISE) capture it; a replay reads the mask of the replay.
* ``mask`` (CUDA: quantized MLPs, and shapes without such a plan, logged at start): the
  module's own MLP, then the mask: the same rule and skips at dense speed (on an H200 the
  untuned kernels were 1.3-7x slower than cuBLAS: docs/kernels.md).

``VLLM_FFNSKIP_MASKED_MLP`` forces a form. CI runs the ``mask`` form on the CPU: the GPU's
graph (the rule, no ``torch.cond``) with the module's MLP in place of the kernel op. The op
itself cannot run in a CPU engine, whose linear layers hand their weights to oneDNN and keep
none (``dispatch_cpu_unquantized_gemm``); it is tested eagerly, traced, and under Triton's
interpreter (tests/kernels/).
"""

from __future__ import annotations

import functools
import os
from functools import partial

import torch
from torch import nn
from vllm.distributed import tensor_model_parallel_all_reduce
from vllm.logger import init_logger
from vllm.model_executor.layers.linear import UnquantizedLinearMethod
from vllm.platforms import current_platform
from vllm.utils.torch_utils import direct_register_custom_op

from vllm_ffnskip.kernels import kernels_pay, skip_mlp
from vllm_ffnskip.kernels.plans import config_dirs, config_file_name, device_name_of

logger = init_logger(f"vllm.{__name__}")

#: Forces a form (``cond``, ``kernel`` or ``mask``) on any platform (tests).
FORM_ENV = "VLLM_FFNSKIP_MASKED_MLP"
FORMS = ("cond", "gather", "kernel", "mask")


def _ffnskip_masked_mlp(
    out: torch.Tensor,
    x: torch.Tensor,
    run: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
) -> None:
    skip_mlp(x, run, w_gate_up, w_down, out=out)


def _ffnskip_masked_mlp_fake(
    out: torch.Tensor,
    x: torch.Tensor,
    run: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
) -> None:
    return None


direct_register_custom_op(
    op_name="ffnskip_masked_mlp",
    op_func=_ffnskip_masked_mlp,
    mutates_args=["out"],
    fake_impl=_ffnskip_masked_mlp_fake,
)


def plain_weights(mlp: nn.Module) -> bool:
    """Unquantized, bias-free gate_up/down projections: what the kernel computes."""
    return all(
        isinstance(p.quant_method, UnquantizedLinearMethod) and p.bias is None
        for p in (mlp.gate_up_proj, mlp.down_proj)
    )


def form_for(mlp: nn.Module, wide_passes: bool) -> str:
    """The form this layer's MLP runs in on this platform (fixed at model construction);
    ``wide_passes``: whether the server runs passes wider than its narrow ones in the skip
    graph (``policy.runs_wide_passes``)."""
    forced = os.environ.get(FORM_ENV)
    if forced:
        if forced not in FORMS:
            raise ValueError(f"{FORM_ENV} must be one of {FORMS}, got {forced!r}")
        if forced == "kernel" and not current_platform.is_cuda_alike():
            raise ValueError(f"{FORM_ENV}=kernel needs CUDA: CPU linear layers keep no weights")
        return forced
    if not current_platform.is_cuda_alike():
        return "gather" if wide_passes else "cond"
    if not plain_weights(mlp):
        return "mask"
    weight = mlp.gate_up_proj.weight  # [2I, H], this rank's shard
    return "kernel" if _kernels_pay(weight.shape[1], weight.shape[0] // 2, weight.dtype) else "mask"


@functools.cache
def _kernels_pay(h: int, i: int, dtype: torch.dtype) -> bool:
    """Whether this GPU has a tuned kernel plan for the FFN shape close to cuBLAS; else the
    ``mask`` form (cuBLAS), said once per shape, as vLLM says it of untuned fused-MoE configs."""
    name = device_name_of(torch.device("cuda", torch.cuda.current_device()))
    if kernels_pay(h, i, dtype, name):
        return True
    logger.warning(
        "vllm-ffnskip: no tuned FFN-kernel plan within 10%% of cuBLAS for H=%d, I=%d (per "
        "rank), %s on %s (%s in %s). Requests skip FFN blocks by the same rule, but the "
        "blocks are computed with cuBLAS and masked: no speed-up. Tune with "
        "benchmarks/kernel_tune.py --write (docs/kernels.md).",
        h, i, dtype, name, config_file_name(h, i, dtype, name),
        " or ".join(str(d) for d in config_dirs()))
    return False


#: The fewest rows the gather computes (fewer running rows are padded with skipped ones, whose
#: outputs the mask drops). Below 2, oneDNN computes a row another way (a GEMV) whose rounding
#: differs from the same row among more, which would change dense rows' tokens; and 1-2 rows
#: cost more than 3-6 (26 MLPs of the embedded model, fp32, one thread, 2-core EPYC: 19.0 ms for
#: 1 row, 21.6 for 2, 14.3 for 4; bf16 10.7, 11.5, 8.7: benchmarks/attainable_share.py).
MIN_GATHER_ROWS = 4


def running_rows_mlp(mlp: nn.Module, x: torch.Tensor, run: torch.Tensor) -> torch.Tensor:
    """``mlp`` on the rows where ``run`` is set (some, not all), gathered first; other rows 0.

    The gather holds at least ``MIN_GATHER_ROWS`` rows (or the whole pass, if narrower): a row
    computed among any two or more rows is bit-identical to the same row among all
    (tests/test_masked_mlp.py checks it), so dense rows keep their tokens. The row count is
    read from the device (``.item()``: an unbacked size), which Dynamo accepts inside a
    ``torch.cond`` branch (tests/test_masked_mlp.py traces it).
    """
    t = x.shape[0]
    # Tensor ops, not min(): a Python comparison with the symbolic width would guard on it.
    n = run.sum().clamp_min(MIN_GATHER_ROWS).clamp_max(t).item()
    torch._check(n >= 0)
    torch._check(n <= t)
    rows = torch.argsort((~run).to(torch.int8), stable=True)[:n]  # running rows first
    return torch.zeros_like(x).index_copy(0, rows, mlp(x.index_select(0, rows)))


def _some_rows_mlp(mlp: nn.Module, x: torch.Tensor, run: torch.Tensor) -> torch.Tensor:
    """The ``gather`` form's MLP once some row runs: every row (no gather) when all run."""
    return torch.cond(run.all(), lambda x, run: mlp(x), partial(running_rows_mlp, mlp), (x, run))


def masked_mlp(form: str, mlp: nn.Module, x: torch.Tensor, run: torch.Tensor) -> torch.Tensor:
    """``mlp(x)`` on rows where ``run`` is set, exactly 0 elsewhere; traced into the graph."""
    if form == "kernel":
        out = torch.empty_like(x)
        torch.ops.vllm.ffnskip_masked_mlp(
            out, x, run, mlp.gate_up_proj.weight, mlp.down_proj.weight
        )
        down = mlp.down_proj  # a RowParallelLinear: sums its shards' outputs, as done here
        if down.reduce_results and down.tp_size > 1:
            out = tensor_model_parallel_all_reduce(out)
        return out
    if form == "cond":
        out = torch.cond(run.any(), mlp, torch.zeros_like, (x,))
    elif form == "gather":
        out = torch.cond(
            run.any(), partial(_some_rows_mlp, mlp), lambda x, run: torch.zeros_like(x), (x, run)
        )
    else:
        out = mlp(x)
    # Outside the branch, inductor fuses this mask into the next kernel (inside it, it was a
    # kernel of its own per layer).
    return torch.where(run.unsqueeze(-1), out, 0)
