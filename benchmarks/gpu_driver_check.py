#!/usr/bin/env python
"""The skip driver (vllm_ffnskip/skip_state.py) under a CUDA graph, on a GPU without vLLM.

Builds a stack of skip-aware layers from the plugin's own ``SkipState`` and ``masked_mlp``
(``kernel`` form: the Triton op writing into an output allocated in the graph), captures one
CUDA graph over a whole pass (``begin_pass``, every layer's ``step``, ``end_pass``), then for
several steps re-routes the tokens (other requests, slots, positions, inputs), replays the
graph under ``torch.cuda.set_sync_debug_mode("error")`` and runs the same pass eagerly:
outputs, per-token skips and the slots' counter increments must be equal every time.

The GPU machines lent to this project have torch and Triton but no vLLM: the few vLLM
symbols the driver imports are replaced by stand-ins here when vLLM is missing (custom-op
registration through ``torch.library``; one rank, so no all-reduce). ``--device cpu`` runs
the same checks eagerly with the ``mask`` form (no graph), to test this script itself.

    python benchmarks/gpu_driver_check.py                 # on a GPU
    python benchmarks/gpu_driver_check.py --device cpu --stand-ins   # plumbing only
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def install_vllm_stand_ins() -> None:
    """Minimal ``vllm`` modules for skip_state.py / masked_mlp.py / stats.py."""
    import logging

    lib = torch.library.Library("vllm", "FRAGMENT")

    def direct_register_custom_op(op_name, op_func, mutates_args, fake_impl=None, **_):
        lib.define(op_name + torch.library.infer_schema(op_func, mutates_args=mutates_args))
        for key in ("CUDA", "CPU"):
            lib.impl(op_name, op_func, key)
        if fake_impl is not None:
            lib._register_fake(op_name, fake_impl)

    class UnquantizedLinearMethod:
        pass

    cuda = torch.cuda.is_available()
    modules = {
        "vllm": {},
        "vllm.distributed": {"tensor_model_parallel_all_reduce": lambda x: x},
        "vllm.model_executor": {},
        "vllm.model_executor.layers": {},
        "vllm.model_executor.layers.linear": {"UnquantizedLinearMethod": UnquantizedLinearMethod},
        "vllm.platforms": {"current_platform": types.SimpleNamespace(
            is_cuda_alike=lambda: cuda, is_cuda=lambda: cuda)},
        "vllm.utils": {},
        "vllm.utils.torch_utils": {"direct_register_custom_op": direct_register_custom_op},
        "vllm.logger": {"init_logger": logging.getLogger},
    }
    for name, attrs in modules.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module


if importlib.util.find_spec("vllm") is None or "--stand-ins" in sys.argv:
    install_vllm_stand_ins()

from vllm_ffnskip.skip_state import RequestSkipState, SkipState  # noqa: E402


class MLP(torch.nn.Module):
    """vLLM's LLaMa MLP layout: merged gate/up weight [2I, H], down [H, I]."""

    def __init__(self, h: int, i: int, dtype: torch.dtype, device: str, gen: torch.Generator):
        super().__init__()
        scale = 0.02  # small updates: residual streams saturate, so layers do skip
        self.gate_up_proj = types.SimpleNamespace(
            weight=(torch.randn(2 * i, h, generator=gen) * scale).to(device, dtype))
        self.down_proj = types.SimpleNamespace(
            weight=(torch.randn(h, i, generator=gen) * scale / 4).to(device, dtype),
            reduce_results=True, tp_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = torch.nn.functional.linear(x, self.gate_up_proj.weight).chunk(2, dim=-1)
        return torch.nn.functional.linear(torch.nn.functional.silu(g) * u, self.down_proj.weight)


def run_pass(state: SkipState, mlps: list[MLP], form: str, x: torch.Tensor,
             positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A pass as FFNSkipLlamaForCausalLM runs it: residual stream h, FFN input norm(h);
    returns h and the tokens' skips."""
    state.begin_pass(x.shape[0], None)
    carry = state.begin_carry(positions)
    h = x
    for layer, mlp in enumerate(mlps):
        normed = torch.nn.functional.rms_norm(h, (h.shape[-1],))
        h = h + state.step(layer, form, mlp, positions, normed, h, carry)
    state.end_pass(positions, skipped=True)
    return h, carry["skipped"]


def add_shape_args(p: argparse.ArgumentParser, layers: int) -> None:
    """The device, the layer stack (LLaMa-2-7B FFN shapes by default) and the stand-ins flag."""
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--stand-ins", action="store_true", help="vLLM stand-ins even if installed")


def counters(state: SkipState) -> torch.Tensor:
    return torch.stack((state.slot_skipped, state.slot_evaluated)).clone()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(p, layers=8)
    p.add_argument("--tokens", type=int, default=32, help="tokens per pass (the graph's size)")
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args()
    device, dtype = args.device, getattr(torch, args.dtype)
    cuda = device == "cuda"
    form = "kernel" if cuda else "mask"
    gen = torch.Generator().manual_seed(0)
    mlps = [MLP(args.hidden, args.intermediate, dtype, device, gen) for _ in range(args.layers)]
    max_slots, t = 64, args.tokens
    with torch.device(device):
        state = SkipState(max_slots, t, args.layers, range(args.layers))
    rng = np.random.default_rng(0)
    for slot in range(max_slots):  # one skipping request per slot, policies varied
        wire = {"thresholds": [float(rng.uniform(0.80, 0.99))] * args.layers,
                "warmup": int(rng.integers(0, 3)), "cold_start": 1, "cold_end": 1,
                "span": int(rng.integers(1, 4))}
        state.admit(slot, RequestSkipState.from_wire(f"r{slot}", 8, wire))
    x = torch.zeros(t, args.hidden, dtype=dtype, device=device)
    positions = torch.zeros(t, dtype=torch.int64, device=device)

    graph = None
    if cuda:
        run_pass(state, mlps, form, x, positions)  # Triton JIT outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = run_pass(state, mlps, form, x, positions)
    print(f"| step | requests | skipping tokens | skips | max abs diff | equal counts |")
    print("|---|---|---|---|---|---|")
    failures = 0
    for step in range(args.steps):
        num_reqs = int(rng.integers(1, t + 1))
        per_req = np.ones(num_reqs, dtype=np.int64)
        per_req[0] += t - num_reqs  # one prefill chunk, the rest decode tokens
        qsl = np.concatenate([[0], np.cumsum(per_req)])
        batch_slots = rng.choice(max_slots, num_reqs, replace=False)
        batch_slots[rng.random(num_reqs) < 0.3] = state.no_slot  # dense requests beside
        pos = np.concatenate([np.arange(n) + int(rng.integers(8, 40)) for n in per_req])
        state.route(qsl, batch_slots, t)
        positions.copy_(torch.from_numpy(pos))
        x.copy_(torch.randn(t, args.hidden, generator=gen).to(dtype))
        before = counters(state)
        if graph is not None:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                graph.replay()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            out_graph, skipped_graph = (v.clone() for v in captured)
        else:
            out_graph, skipped_graph = run_pass(state, mlps, form, x, positions)
        middle = counters(state)
        out_eager, skipped_eager = run_pass(state, mlps, form, x, positions)
        after = counters(state)
        diff = float((out_graph.float() - out_eager.float()).abs().max())
        same = bool(torch.equal(middle - before, after - middle)
                    and torch.equal(skipped_graph, skipped_eager))
        ok = same and diff == 0.0 and int(skipped_graph.sum()) > 0
        failures += not ok
        routed = int((state.token_slot != state.no_slot).sum())
        print(f"| {step} | {num_reqs} | {routed} | {int(skipped_graph.sum())} | {diff:.3g} "
              f"| {same} |")
    name = torch.cuda.get_device_name() if cuda else "cpu (eager, mask form)"
    print(f"\n{name}: {args.steps - failures}/{args.steps} steps equal to eager")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
