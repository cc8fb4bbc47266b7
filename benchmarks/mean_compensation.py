"""Does replacing a skipped FFN by its mean output (instead of 0) recover accuracy?

    PYTHONPATH=. python benchmarks/mean_compensation.py [--split calib] [--max-tokens 24]   # repo root

A negative result kept for the record (docs/results.md §3). On the plain-transformers
reference of the rule (tests/reference.py), with the embedded model's shipped policy:
1. dense decoding of 40 calib questions collects each layer's mean FFN output over decode
   tokens, and the share of the FFN output's energy that this mean carries;
2. factoid accuracy of the split, dense, skipping with 0 (the rule as shipped), and skipping
   with the layer's mean output added instead.
Single-sequence greedy decoding, CPU, a few minutes.
"""

import argparse

import torch

from tests.reference import SkipReference, _SkippableMLP
from vllm_ffnskip import embedded
from vllm_ffnskip.tools import datasets

HIDDEN_CALIB_QUESTIONS = 40


class CompensatedMLP(_SkippableMLP):
    """The reference rule; a skipped block adds ``mean[layer]`` instead of nothing, and a
    dense decode step (``collect``) accumulates the block's output."""

    mean: torch.Tensor | None = None
    collect = False
    sums: torch.Tensor
    energy: torch.Tensor
    tokens = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = CompensatedMLP
        if cls.collect and x.shape[1] == 1:
            f = self.mlp(x)
            cls.sums[self.layer] += f[0, 0].double()
            cls.energy[self.layer] += f.double().pow(2).sum()
            cls.tokens += self.layer == 0
            return f
        st = self.state
        if self.hot and st.budget > 0 and cls.mean is not None:
            st.budget -= 1
            st.skipped += 1
            return cls.mean[self.layer].to(x.dtype).expand_as(x).clone()
        return super().forward(x)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--split", default="calib")
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    folder = str(embedded.model_dir())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ref = SkipReference(folder)
    for layer in ref.model.model.layers:
        layer.mlp.__class__ = CompensatedMLP  # same wrapper, hooks and rule state
    num_layers, hidden = ref.num_layers, ref.model.config.hidden_size
    CompensatedMLP.sums = torch.zeros(num_layers, hidden, dtype=torch.float64)
    CompensatedMLP.energy = torch.zeros(num_layers, dtype=torch.float64)

    calib = datasets.factoid("calib")[:HIDDEN_CALIB_QUESTIONS]
    CompensatedMLP.collect = True
    for prompt in datasets.qa_prompts(tokenizer, calib):
        ref.generate(tokenizer.encode(prompt), 16, None)
    CompensatedMLP.collect = False
    n = CompensatedMLP.tokens
    mean = CompensatedMLP.sums / n
    share = mean.pow(2).sum(-1) / (CompensatedMLP.energy / n)
    print(f"decode tokens: {n}")
    print("| layer | mean's share of FFN output energy |\n|---|---|")
    for layer in range(num_layers):
        print(f"| {layer} | {share[layer]:.2f} |")

    rows = datasets.factoid(args.split)
    prompts = [tokenizer.encode(p) for p in datasets.qa_prompts(tokenizer, rows)]
    policy = embedded.default_policy_for(folder)

    def accuracy(skip_policy, compensation):
        CompensatedMLP.mean = compensation
        correct = skipped = evaluated = 0
        for row, ids in zip(rows, prompts):
            out = ref.generate(ids, args.max_tokens, skip_policy)
            tokens = out.token_ids
            if tokenizer.eos_token_id in tokens:
                tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            correct += datasets.answer_correct(text, row["answers"])
            skipped, evaluated = skipped + out.skipped, evaluated + out.evaluated
        return 100 * correct / len(rows), skipped / max(evaluated, 1)

    print(f"\n| {args.split} ({len(rows)} questions) | QA acc | ρ |\n|---|---|---|")
    for name, skip_policy, compensation in [
        ("dense", None, None),
        ("skip, 0 (shipped rule)", policy, None),
        ("skip, layer mean", policy, mean.float()),
    ]:
        acc, rho = accuracy(skip_policy, compensation)
        print(f"| {name} | {acc:.1f} | {rho:.3f} |")


if __name__ == "__main__":
    main()
