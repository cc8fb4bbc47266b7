"""Rules other than the shipped greedy cosine rule, on the plain-transformers reference.

    PYTHONPATH=. python benchmarks/rule_variants.py --split test --out docs/rule_variants.png   # repo root

Two variants of the rule of docs/algorithm.md, each as a curve of factoid accuracy against
the measured ρ (skipped FFN blocks over all layers of the decode tokens, warm-up included):

- ``gate``: a token may skip only when the previous step's top-1 probability is at least
  ``g`` (so the tokens after an uncertain choice run dense);
- ``authors``: the first author's research code (docs/algorithm.md §1): after a trigger a
  token skips a run of ``k`` FFNs and then runs dense to the last layer (one run per
  token), and every 6th decode token runs dense.

The reference (tests/reference.py) decodes one prompt at a time, greedily, stopping at EOS
or after ``--max-tokens``; with the gate off it gives the vLLM engine's figures of the same
policy (docs/results.md §3). Single-threaded, ~1 minute per point per 62 questions on 2 cores.
A variant would enter the product (SkipState's slot tables) only if it beat the greedy rule
at equal ρ on held-out questions; neither does (docs/results.md §3).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from tests.reference import SkipReference, _SkippableMLP
from vllm_ffnskip import embedded
from vllm_ffnskip.policy import SkipPolicy, load_policy_file
from vllm_ffnskip.tools import datasets

DENSE_EVERY = 6  # the research code's schedule [k, k, k, k, k, 0]
#: Budget value of a token whose one skip run is over (authors' variant).
RUN_DONE = -1


class OneRunMLP(_SkippableMLP):
    """The authors' rule: a trigger starts one run of ``span`` skips; after it, no test."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st = self.state
        if self.hot and st.budget == RUN_DONE:
            return self.mlp(x)
        skipping = self.hot and st.budget > 0
        out = super().forward(x)
        if skipping and st.budget == 0:
            st.budget = RUN_DONE
        return out


@dataclass
class Point:
    rule: str
    label: str
    policy: SkipPolicy
    gate: float = 0.0
    dense_every: int = 0


@torch.inference_mode()
def decode(ref: SkipReference, ids: list[int], point: Point | None, max_tokens: int, eos: int):
    """Greedy decode under ``point`` (None: dense); returns tokens, skipped, evaluated."""
    st = ref.state
    st.policy = point.policy if point else SkipPolicy(enabled=False)
    st.active, st.budget, st.skipped = False, 0, 0
    out = ref.model(torch.tensor([ids]), use_cache=True)
    probs = out.logits[0, -1].softmax(-1)
    tokens, confidence, evaluated = [int(probs.argmax())], float(probs.max()), 0
    for step in range(max_tokens - 1):
        if tokens[-1] == eos:
            break
        k = step - st.policy.warmup
        st.active = st.policy.enabled and k >= 0
        if point is not None:
            st.active &= confidence >= point.gate
            st.active &= not (point.dense_every and k % point.dense_every == point.dense_every - 1)
        st.budget = 0
        evaluated += ref.num_layers if st.policy.enabled else 0
        out = ref.model(
            torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True
        )
        probs = out.logits[0, -1].softmax(-1)
        tokens.append(int(probs.argmax()))
        confidence = float(probs.max())
    return tokens, st.skipped, evaluated


def points(shipped: SkipPolicy) -> list[Point]:
    grid = [Point("greedy", f"t={t}", SkipPolicy(threshold=t)) for t in (0.975, 0.98, 0.985)]
    grid += [Point("gate", f"t=0.975 g={g}", SkipPolicy(threshold=0.975), gate=g)
             for g in (0.5, 0.8, 0.9)]  # fmt: skip
    grid += [Point("greedy", "aggressive", shipped)]
    grid += [Point("gate", f"aggressive g={g}", shipped, gate=g) for g in (0.5, 0.8)]
    grid += [Point("authors", f"t={t} k={k}", SkipPolicy(threshold=t, span=k),
                   dense_every=DENSE_EVERY) for t, k in ((0.985, 3), (0.98, 3), (0.98, 5))]  # fmt: skip
    return grid


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--split", default="test", choices=["calib", "test"])
    parser.add_argument("--limit", type=int)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--out", help="plot (PNG)")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    folder = str(embedded.model_dir())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ref = SkipReference(folder)
    rows = datasets.factoid(args.split)[: args.limit]
    prompts = [tokenizer(p, add_special_tokens=False).input_ids
               for p in datasets.qa_prompts(tokenizer, rows)]  # fmt: skip
    shipped = load_policy_file("smollm2-135m-instruct-aggressive")
    results = []
    print("| rule | point | QA acc | ρ | reply tokens |")
    print("|---|---|---|---|---|")
    for point in [None, *points(shipped)]:
        if point is not None:
            for layer in ref.model.model.layers:
                layer.mlp.__class__ = OneRunMLP if point.rule == "authors" else _SkippableMLP
        correct = skipped = evaluated = lengths = 0
        for row, ids in zip(rows, prompts):
            tokens, s, e = decode(ref, ids, point, args.max_tokens, tokenizer.eos_token_id)
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            correct += datasets.answer_correct(text, row["answers"])
            skipped, evaluated, lengths = skipped + s, evaluated + e, lengths + len(tokens)
        rule, label = (point.rule, point.label) if point else ("dense", "-")
        acc, rho = 100 * correct / len(rows), skipped / evaluated if evaluated else 0.0
        results.append((rule, acc, rho))
        print(f"| {rule} | {label} | {acc:.1f} | {rho:.3f} | {lengths / len(rows):.1f} |", flush=True)
    if args.out:
        plot(results, args.out, args.split)


def plot(results: list[tuple[str, float, float]], path: str, split: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    dense = next(acc for rule, acc, _ in results if rule == "dense")
    for rule in ("greedy", "gate", "authors"):
        pts = sorted((rho, acc) for r, acc, rho in results if r == rule)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if rule != "gate" else "o",
                label=rule)  # fmt: skip
    ax.axhline(dense, color="gray", ls="--", label="dense")
    ax.axhline(dense - 2, color="gray", ls=":", label="dense - 2 points")
    ax.set_xlabel(f"measured ρ ({split} split)")
    ax.set_ylabel("factoid accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
