"""The most a pass of B decode rows can save: the ceiling on the share of the ideal gain by batch.

The ideal ``1/(1 − ρφ)`` counts every skipped FFN block as saved. In a pass of B rows a layer's
FFN costs ``t(k)`` for its k running rows, so what the rule's skips can save at batch B depends on
how ``t`` grows with k. Three cost models, each giving the ceiling on the share of the ideal gain
``(s − 1)/(ideal − 1)`` at every batch:

* ``all rows skip``: ``t(k) = t(B)`` for every k > 0, a weight-bound GEMM (decode on a GPU; bf16
  with AMX on a CPU): a layer saves only where every row of the pass skips it, which is also all
  that the ``cond`` form saves (narrow passes);
* ``measured t(k)``: this machine's MLP on k rows alone (vLLM's CPU GEMM, ``onednn_mm``, compiled),
  the floor that a perfect gather of the running rows (the ``gather`` form) reaches;
* ``padded``: the same, with the running rows padded to the cheapest width j ≥ k of at most B
  (``t`` need not grow with k: oneDNN runs 1–2 rows as a GEMV that can cost more than 4 rows);
* ``per-row FLOPs``: ``t(k) ∝ k``, the compute-bound case that DESIGN.md §3 assumes from batch
  ~8 on a CPU; it reaches the ideal by construction and is printed as the check of the sampling.

The skips: the greedy rule replayed (``calibrate.replay``) under a policy on the token × layer
scores of a dense profile (``vllm-ffnskip profile``). A pass is B token rows drawn at random (in a
continuous batch, different requests at different positions), a share
``warmup / mean_decode_tokens`` of them in warm-up, running every layer. The rule's own cost is
not counted: these are ceilings, for comparison with what ``benchmarks/graph_ab.py --batch B``
and ``vllm-ffnskip bench`` measure.

    vllm-ffnskip profile --split test --out /tmp/profile_test.json
    OMP_NUM_THREADS=1 python benchmarks/attainable_share.py /tmp/profile_test.json \\
        [--policy smollm2-135m-instruct-aggressive] [--batches 1,2,4,8,16,32,64] \\
        [--dtypes float32,bfloat16] [--plot docs/attainable_share.png] [--out F.json] [--times F.json]

(One thread: a served vLLM worker on this 2-core machine type has one core, docs/results.md §4.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from vllm_ffnskip.policy import policy_path
from vllm_ffnskip.tools import calibrate
from vllm_ffnskip.tools.bench import ffn_share, share_cell, share_of_ideal_gain

sys.path.insert(0, str(Path(__file__).resolve().parent))  # masked_mlp_forms, beside this file

#: A cost model: for a pass of B rows, a layer's FFN cost with k = 0 … B running rows.
CostModel = Callable[[int], np.ndarray]


def padded(cost: np.ndarray, batch: int) -> np.ndarray:
    """``cost`` of a pass of ``batch`` rows when k running rows may be padded to any width
    j ≥ k up to ``batch``: the suffix minimum (k = 0 stays free)."""
    return np.minimum.accumulate(cost[: batch + 1][::-1])[::-1]


def skip_blocks(
    profile: dict, policy: dict, decode_tokens: float | None = None
) -> tuple[np.ndarray, float]:
    """The policy's skips on the profile's tokens (``[tokens, layers]`` bool) and the share of
    a request's decode tokens that are in warm-up, for requests of ``decode_tokens`` decode
    tokens (default: the profile's mean)."""
    scores = np.asarray(profile["scores"], dtype=np.float64)
    thresholds = calibrate.policy_thresholds(policy, scores.shape[1])
    skipped = calibrate.replay(
        scores, thresholds, policy["cold_start"], policy["cold_end"], policy["span"]
    )
    decode = decode_tokens or profile["mean_decode_tokens"]
    return skipped, min(policy["warmup"] / decode, 1.0) if decode else 0.0


def saved_share(
    skipped: np.ndarray,
    warmup_share: float,
    batch: int,
    cost: np.ndarray,
    samples: int,
    rng: np.random.Generator,
) -> float:
    """The share of a pass's FFN blocks saved at ``batch`` rows, averaged over ``samples``
    random passes and all layers, when a layer with k running rows costs ``cost[k] /
    cost[batch]`` of its dense FFN (``cost[0]`` = 0: a layer that every row skips is free)."""
    rows = np.stack([rng.choice(len(skipped), batch, replace=False) for _ in range(samples)])
    skips = skipped[rows]  # [samples, batch, layers]
    skips &= (rng.random((samples, batch)) >= warmup_share)[..., None]
    running = batch - skips.sum(1)  # [samples, layers]
    return float(np.mean(1.0 - cost[running] / cost[batch]))


def ceiling(saved: float, rho: float, phi: float) -> float:
    """The share of the ideal gain when a pass saves ``saved`` of its FFN time."""
    return share_of_ideal_gain(1 / (1 - saved * phi), 1 / (1 - rho * phi))


def mlp_times(hf_config, dtype: torch.dtype, max_rows: int, layers: int, repeats: int) -> np.ndarray:
    """ms of ``layers`` MLPs of the model's shape on k = 0 … ``max_rows`` rows: vLLM's CPU GEMM
    (``masked_mlp_forms.OneDNNMLP``), one compiled graph of dynamic width. The widths take turns
    in every repeat, so a drift of the machine's speed moves all of them alike; median per width."""
    from masked_mlp_forms import OneDNNMLP

    h = hf_config.hidden_size
    torch.manual_seed(0)
    mlps = [OneDNNMLP(dtype, h, hf_config.intermediate_size) for _ in range(layers)]

    @torch.compile(fullgraph=True, dynamic=True)
    def stack(x: torch.Tensor) -> torch.Tensor:
        for mlp in mlps:
            x = x + mlp(x)
        return x

    inputs = {k: torch.randn(k, h, dtype=dtype) * 0.1 for k in range(1, max_rows + 1)}
    times = {k: [] for k in inputs}
    with torch.no_grad():
        for x in inputs.values():  # compile and warm every width
            stack(x), stack(x)
        for _ in range(repeats):
            for k, x in inputs.items():
                start = time.perf_counter()
                stack(x)
                times[k].append(time.perf_counter() - start)
    return np.array([0.0] + [1e3 * float(np.median(times[k])) for k in inputs])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", help="a dense profile (vllm-ffnskip profile --out)")
    parser.add_argument("--policy", default="smollm2-135m-instruct-aggressive",
                        help="a shipped policy name or a policy file")
    parser.add_argument("--model", help="HF folder (default: the embedded model)")
    parser.add_argument("--decode-tokens", type=float,
                        help="decode tokens per request of the traffic modelled, for its warm-up "
                        "share (default: the profile's mean; vllm-ffnskip bench's 64 outputs: 63)")
    parser.add_argument("--batches", default="1,2,4,8,16,32,64")
    parser.add_argument("--dtypes", default="float32", help="dtypes of the measured t(k), comma-separated (\"\": none)")
    parser.add_argument("--layers", type=int, default=26, help="MLPs per timed graph")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--samples", type=int, default=2000, help="random passes per batch")
    parser.add_argument("--plot", help="PNG of the ceilings against batch")
    parser.add_argument("--out", help="JSON of the shares and the measured t(k)")
    parser.add_argument("--times", help="the t(k) of an earlier --out, instead of timing again")
    args = parser.parse_args()
    from transformers import AutoConfig

    from vllm_ffnskip.tools.engine import resolve_model

    hf_config = AutoConfig.from_pretrained(resolve_model(args.model))
    phi = ffn_share(hf_config)
    profile = json.loads(Path(args.profile).read_text())
    policy = json.loads(policy_path(args.policy).read_text())
    skipped, warmup_share = skip_blocks(profile, policy, args.decode_tokens)
    batches = [int(b) for b in args.batches.split(",")]
    rows = np.arange(max(batches) + 1, dtype=np.float64)
    costs: dict[str, CostModel] = {
        "all rows skip": lambda b: np.minimum(rows[: b + 1], 1.0),
        "per-row FLOPs": lambda b: rows[: b + 1],
    }
    times = json.loads(Path(args.times).read_text())["times"] if args.times else {}
    for name in filter(None, args.dtypes.split(",")):
        if name not in times:
            times[name] = mlp_times(
                hf_config, getattr(torch, name), max(batches), args.layers, args.repeats
            ).tolist()
        t = np.asarray(times[name])
        costs[f"measured t(k), {name}"] = lambda b, t=t: t[: b + 1]
        costs[f"padded, {name}"] = lambda b, t=t: padded(t, b)
    rho = float(skipped.mean()) * (1 - warmup_share)
    print(f"{profile['num_tokens']} profiled tokens, policy {Path(args.policy).stem}, "
          f"{torch.get_num_threads()} threads; ρ {rho:.3f} (warm-up share {warmup_share:.3f}), "
          f"φ {phi:.3f}, ideal {1 / (1 - rho * phi):.3f}")
    rng = np.random.default_rng(0)
    shares = {name: [] for name in costs}
    print("ceiling on the share of the ideal gain, by cost model:")
    print("| B | " + " | ".join(costs) + " |")
    print("|---|" + "---|" * len(costs))
    for batch in batches:
        for name, cost in costs.items():
            saved = saved_share(skipped, warmup_share, batch, cost(batch), args.samples, rng)
            shares[name].append(ceiling(saved, rho, phi))
        print(f"| {batch} | " + " | ".join(share_cell(v[-1]) for v in shares.values()) + " |",
              flush=True)
    widths = [k for k in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64) if k <= max(batches)]
    print(f"t(k), ms of {args.layers} MLPs on k rows alone:")
    print("| dtype | " + " | ".join(map(str, widths)) + " |")
    print("|---|" + "---|" * len(widths))
    for name, values in times.items():
        print(f"| {name} | " + " | ".join(f"{values[k]:.1f}" for k in widths) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "profile": args.profile, "policy": args.policy, "rho": rho, "phi": phi,
            "warmup_share": warmup_share, "threads": torch.get_num_threads(),
            "batches": batches, "shares": shares, "times": times,
        }, indent=1))
    if args.plot:
        plot(batches, shares, rho, phi, args.plot)


def plot(batches: list[int], shares: dict[str, list[float]], rho: float, phi: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, values in shares.items():
        ax.plot(batches, values, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_ylim(-0.05, 1.1)
    ax.set_xlabel("rows per decode pass (concurrent requests)")
    ax.set_ylabel("ceiling on the share of the ideal gain")
    ax.set_title(f"What skipping can save per pass (ρ {rho:.2f}, φ {phi:.2f}, rule cost not counted)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
