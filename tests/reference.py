"""An independent single-sequence reference of the FFN-SkipLLM rule, on plain transformers.

One prompt at a time, no batching, no vLLM: the prompt is prefilled densely, then tokens are
decoded greedily one by one. Each HF decoder layer's MLP is wrapped: the wrapper sees the
residual stream h entering the FFN (captured from ``post_attention_layernorm``'s input) and
applies the rule of docs/algorithm.md to the single decode token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vllm_ffnskip.policy import SkipPolicy


@dataclass
class _RuleState:
    policy: SkipPolicy
    num_layers: int
    active: bool = False  # the current forward is a decode token past warm-up
    budget: int = 0
    skipped: int = 0


class _SkippableMLP(nn.Module):
    def __init__(self, mlp: nn.Module, layer: int, state: _RuleState) -> None:
        super().__init__()
        self.mlp = mlp
        self.layer = layer
        self.state = state
        self.h: torch.Tensor | None = None

    @property
    def hot(self) -> bool:
        """The current token may skip this layer: a decode token past warm-up, and the layer
        outside the policy's cold regions."""
        st, p = self.state, self.state.policy
        return st.active and p.cold_start <= self.layer < st.num_layers - p.cold_end

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st, p, l = self.state, self.state.policy, self.layer
        if not self.hot:
            st.budget = 0
            return self.mlp(x)
        if st.budget > 0:
            st.budget -= 1
            st.skipped += 1
            return torch.zeros_like(x)
        f = self.mlp(x)
        h = self.h.float()
        score = F.cosine_similarity(h, h + f.float(), dim=-1).item()
        st.budget = p.span if score >= p.thresholds(st.num_layers)[l] else 0
        return f


@dataclass
class ReferenceOutput:
    token_ids: list[int]
    skipped: int
    evaluated: int


class SkipReference:
    """HF LLaMa with every MLP wrapped by the reference rule."""

    def __init__(self, model_dir: str) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        layers = self.model.model.layers
        self.num_layers = len(layers)
        self.state = _RuleState(SkipPolicy(), self.num_layers)
        for i, layer in enumerate(layers):
            wrapper = _SkippableMLP(layer.mlp, i, self.state)
            layer.post_attention_layernorm.register_forward_pre_hook(
                lambda _m, args, w=wrapper: setattr(w, "h", args[0])
            )
            layer.mlp = wrapper

    @torch.inference_mode()
    def generate(
        self, prompt_ids: list[int], max_tokens: int, policy: SkipPolicy | None
    ) -> ReferenceOutput:
        """Greedy decode of ``max_tokens`` tokens (no stop on EOS); ``policy`` None: dense."""
        st = self.state
        st.policy = policy or SkipPolicy(enabled=False)
        st.active, st.budget, st.skipped = False, 0, 0
        out = self.model(torch.tensor([prompt_ids]), use_cache=True)
        cache = out.past_key_values
        tokens = [int(out.logits[0, -1].argmax())]
        evaluated = 0
        for step in range(max_tokens - 1):
            st.active = st.policy.enabled and step >= st.policy.warmup
            st.budget = 0
            if st.policy.enabled:
                evaluated += self.num_layers
            out = self.model(torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            tokens.append(int(out.logits[0, -1].argmax()))
        return ReferenceOutput(tokens, st.skipped, evaluated)
