"""``vllm-ffnskip calibrate``: per-layer thresholds for a target skip ratio, from a profile.

The profile's token x layer score matrix lets us replay the skip rule offline
(``simulate``) and search the one free parameter of each method until the replayed skip
ratio meets the target:

- ``global``: one threshold for every hot layer (the paper's rule; the baseline).
- ``quantile``: layer l's threshold is the q-quantile of layer l's own scores, so every hot
  layer triggers on about the same share of tokens.
- ``damage``: a trigger at layer l skips layer l+1, so layer l's threshold is chosen from
  what skipping l+1 costs: the angle by which FFN l+1 turns the stream, weighted by how much
  the output depends on layer l+1 when the profile carries a sensitivity probe
  (``profile --sensitivity``). A global threshold tests s_l but pays with layer l+1.

Cold regions come from the profile: a leading/trailing layer whose mean score falls below
``cold_cutoff`` is not saturated and always runs (at least ``min_cold`` at each end). The
replay uses dense scores, so it predicts ρ before the skips themselves move later scores;
``eval`` measures the real ρ.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

METHODS = ("global", "quantile", "damage")


def replay(
    scores: np.ndarray,
    thresholds: np.ndarray,
    cold_start: int,
    cold_end: int,
    span: int,
) -> np.ndarray:
    """``[tokens, layers]`` bool: the FFN blocks the greedy rule of docs/algorithm.md skips
    when it runs on these dense scores (warm-up excluded)."""
    tokens, layers = scores.shape
    skipped = np.zeros((tokens, layers), dtype=bool)
    budget = np.zeros(tokens, dtype=np.int64)
    for l in range(cold_start, layers - cold_end):
        skipped[:, l] = skip = budget > 0
        budget = np.where(
            skip, budget - 1, np.where(scores[:, l] >= thresholds[l], span, 0)
        )
    return skipped


def simulate(
    scores: np.ndarray,
    thresholds: np.ndarray,
    cold_start: int,
    cold_end: int,
    span: int,
) -> float:
    """ρ over all layers of the profiled decode tokens (warm-up excluded): the share of
    ``replay``'s blocks skipped."""
    return float(replay(scores, thresholds, cold_start, cold_end, span).mean())


def cold_regions(mean: list[float], cutoff: float, min_cold: int) -> tuple[int, int]:
    """Leading/trailing layers whose mean saturation is below ``cutoff``."""
    start = min_cold
    while start < len(mean) and mean[start] < cutoff:
        start += 1
    end = min_cold
    while end < len(mean) - start and mean[len(mean) - 1 - end] < cutoff:
        end += 1
    return start, end


def damage_thresholds(
    scores: np.ndarray, price: float, weights: np.ndarray
) -> np.ndarray:
    """Per-layer thresholds that trade skips against the damage they do.

    A trigger at layer l skips layer l+1, whose FFN would have turned the stream by
    ``arccos(s_{l+1})``; ``weights[l+1]`` scales that by how much the output depends on
    layer l+1 (the profile's sensitivity probe, relative to the hot-layer mean; all ones
    without it). For each l, among thresholds on s_l, take the one maximising
    (skips - price * summed weighted angle of the skipped FFNs) over the profiled tokens.
    """
    thresholds = np.ones(scores.shape[1])
    for l in range(scores.shape[1] - 1):
        order = np.argsort(-scores[:, l], kind="stable")
        angle = weights[l + 1] * np.arccos(np.clip(scores[order, l + 1], -1.0, 1.0))
        gain = np.cumsum(1.0 - price * angle)
        best = int(np.argmax(gain))
        if gain[best] > 0:
            thresholds[l] = scores[order[best], l]
    return thresholds


def thresholds_for(
    method: str, scores: np.ndarray, knob: float, weights: np.ndarray | None = None
) -> np.ndarray:
    """Per-layer thresholds of ``method`` at knob value ``knob`` in [0, 1]: higher skips
    less. ``global``: the threshold itself; ``quantile``: the per-layer quantile;
    ``damage``: the price ``knob / (1 - knob)`` of ``damage_thresholds``."""
    if method == "global":
        return np.full(scores.shape[1], knob, dtype=np.float64)
    if method == "quantile":
        return np.quantile(scores, knob, axis=0)
    if method == "damage":
        if weights is None:
            weights = np.ones(scores.shape[1])
        return damage_thresholds(scores, knob / max(1.0 - knob, 1e-9), weights)
    raise ValueError(f"unknown method {method!r} (known: {METHODS})")


def search(
    rho_of: Callable[[float], float], target: float, lo: float, hi: float
) -> float:
    """Bisection on a knob whose ρ falls as it rises: the lowest-ρ knob with ρ >= target
    (``lo`` itself when even it cannot reach the target)."""
    if rho_of(lo) < target:
        return lo
    for _ in range(40):
        mid = (lo + hi) / 2
        if rho_of(mid) >= target:
            lo = mid
        else:
            hi = mid
    return lo


def layer_weights(
    profile: dict[str, Any], cold_start: int, cold_end: int
) -> np.ndarray | None:
    """Sensitivity per layer relative to the hot layers' mean (None without a probe); a
    small floor keeps a layer that never changed an output from becoming free to skip."""
    if "sensitivity" not in profile:
        return None
    sens = np.asarray(profile["sensitivity"], dtype=np.float64) + 0.01
    return sens / sens[cold_start : len(sens) - cold_end].mean()


def calibrate(
    profile: dict[str, Any],
    target: float,
    method: str = "quantile",
    warmup: int = 2,
    span: int = 1,
    cold_cutoff: float = 0.9,
    min_cold: int = 2,
) -> dict[str, Any]:
    """A policy-file dict whose replayed ρ (tokens past warm-up, all layers) meets ``target``."""
    scores = np.asarray(profile["scores"], dtype=np.float64)
    cold_start, cold_end = cold_regions(
        profile["layers"]["mean"], cold_cutoff, min_cold
    )
    weights = layer_weights(profile, cold_start, cold_end)

    def rho_of(knob: float) -> float:
        thresholds = thresholds_for(method, scores, knob, weights)
        return simulate(scores, thresholds, cold_start, cold_end, span)

    lo = float(scores.min()) if method == "global" else 0.0
    knob = search(rho_of, target, lo, 1.0)
    # Rounded down to the file's 6 decimals, so the file replays to at least the target.
    thresholds = thresholds_for(method, scores, knob, weights)
    thresholds = np.clip(np.floor(thresholds * 1e6) / 1e6, 1e-6, 1.0)
    hot = np.zeros(len(thresholds), dtype=bool)
    hot[cold_start : len(thresholds) - cold_end] = True
    thresholds[~hot] = 1.0  # cold layers never trigger; 1.0 says so in the file
    rho = simulate(scores, thresholds, cold_start, cold_end, span)
    decode = profile.get("mean_decode_tokens") or 0.0
    policy: dict[str, Any] = {
        "model": profile.get("model"),
        "warmup": warmup,
        "cold_start": cold_start,
        "cold_end": cold_end,
        "span": span,
        "calibration": {
            "method": method,
            "target_rho": target,
            "knob": round(knob, 6),
            "predicted_rho": round(rho, 4),
            # share of a mean-length request's decode tokens that are past warm-up
            "predicted_rho_with_warmup": round(
                rho * max(decode - warmup, 0) / decode, 4
            )
            if decode
            else None,
            "profile_tokens": int(scores.shape[0]),
            "sensitivity_weighted": weights is not None and method == "damage",
        },
    }
    if method == "global":
        policy["threshold"] = float(thresholds[cold_start])
    else:
        policy["layer_thresholds"] = [float(t) for t in thresholds]
    return policy


def policy_thresholds(policy: dict[str, Any], num_layers: int) -> np.ndarray:
    """The per-layer thresholds a policy file stands for."""
    if "layer_thresholds" in policy:
        return np.asarray(policy["layer_thresholds"], dtype=np.float64)
    return np.full(num_layers, policy["threshold"], dtype=np.float64)


def main(args: Any) -> None:
    if args.max_loss is not None:
        from vllm_ffnskip.tools import budget

        budget.main(args)
        return
    if not args.profile:
        raise SystemExit("calibrate --target needs --profile (or use --max-loss)")
    profile = json.loads(Path(args.profile).read_text())
    policy = calibrate(
        profile,
        args.target,
        method=args.method,
        warmup=args.warmup,
        span=args.span,
        cold_cutoff=args.cold_cutoff,
        min_cold=args.min_cold,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(policy, indent=1) + "\n")
    cal = policy["calibration"]
    print(
        f"{args.method}: cold {policy['cold_start']}/{policy['cold_end']}, "
        f"predicted rho {cal['predicted_rho']:.3f} (target {args.target:.3f}), "
        f"with warm-up {cal['predicted_rho_with_warmup']}"
    )
    print(f"wrote {out}")
