"""The skip rule inside the compiled graph: per-token state in persistent buffers, the FFN
under ``torch.cond``.

On the CPU, an opaque op per layer (the FFN leaving inductor's graph, the rule in Python
between weight-streaming GEMMs, which evict the interpreter's caches) cost more than
skipping saved: 0.86x of dense at batch 1 with ρ≈0.2 (measured). Here the rule is a few
fixed-shape tensor ops that inductor fuses, and ``torch.cond`` runs the layer's FFN only if
some row of the pass runs it: a layer that every row skips reads no FFN weights. Rows that
run beside skipped ones are computed and masked, which costs nothing extra where decoding is
weight-bound. The pass's state is loaded before the graph runs and read back after it.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from vllm_ffnskip.batch import SkipBatch, rule_step
from vllm_ffnskip.stats import RECORDER


class SkipState(nn.Module):
    """Per-token skip state of the current forward pass, shared by all decoder layers.

    Buffers are sized for vLLM's largest pass (``max_num_batched_tokens``); a pass uses
    their first ``T`` rows. ``score[t, l]`` is the saturation score of token ``t`` at layer
    ``l`` where it was tested, NaN elsewhere (read only by the profiler's recorder).
    """

    def __init__(self, max_tokens: int, num_layers: int) -> None:
        super().__init__()
        shape = (max_tokens, num_layers)
        self.register_buffer("hot", torch.zeros(shape, dtype=torch.bool), persistent=False)
        self.register_buffer("thresholds", torch.ones(shape), persistent=False)
        self.register_buffer("score", torch.zeros(shape), persistent=False)
        for name in ("span", "budget", "skipped"):
            self.register_buffer(name, torch.zeros(max_tokens, dtype=torch.int32), persistent=False)

    def load(self, batch: SkipBatch) -> None:
        """Before the pass: the batch's host state into the buffers."""
        t = batch.hot.shape[0]
        for name in ("hot", "thresholds", "span", "budget", "skipped"):
            getattr(self, name)[:t].copy_(torch.from_numpy(getattr(batch, name)))

    def unload(self, batch: SkipBatch, layers: range) -> None:
        """After the pass: skip counts and budgets (and recorded scores) back to the batch.

        Counts are summed in the graph, where the add fuses into the rule's kernel: counting
        them here from the scores cost ~55 us per pass (measured, batch 1), as any host work
        right after the graph runs with cold caches.
        """
        t = batch.hot.shape[0]
        batch.skipped[:] = self.skipped[:t].cpu().numpy()
        batch.budget[:] = self.budget[:t].cpu().numpy()
        if RECORDER.enabled:
            scores = self.score[:t].cpu()
            for l in layers:
                column = scores[:, l]
                RECORDER.add(l, column[~column.isnan()].tolist())

    def step(
        self,
        layer_idx: int,
        mlp: Callable[[torch.Tensor], torch.Tensor],
        hidden_states: torch.Tensor,
        residual: torch.Tensor,
    ) -> torch.Tensor:
        """One layer's FFN under the rule of docs/algorithm.md; skipped rows return 0.

        Traced into the model's graph: every op has a fixed shape, no value goes to the host.
        """
        t = hidden_states.shape[0]
        hot = self.hot[:t, layer_idx]
        budget = self.budget[:t]
        skip = hot & (budget > 0)
        run = ~skip
        out = torch.cond(run.any(), mlp, torch.zeros_like, (hidden_states,))
        # Rows skipped beside running ones; outside the branch, inductor fuses this mask into
        # the next kernel (inside it, it was a kernel of its own per layer).
        out = torch.where(run.unsqueeze(-1), out, 0)
        budget, score = rule_step(
            hot, skip, budget, residual, out, self.thresholds[:t, layer_idx], self.span[:t]
        )
        self.budget[:t].copy_(budget)
        self.skipped[:t].add_(skip.int())
        # Written whether or not scores are recorded: a branch on that here would give two
        # graphs that vLLM's compile cache (keyed by config and source) cannot tell apart.
        self.score[:t, layer_idx].copy_(torch.where(hot & run, score, torch.nan))
        return out
