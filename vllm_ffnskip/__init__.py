"""vllm-ffnskip: FFN-SkipLLM (input-adaptive FFN skipping) for vLLM's LLaMa models.

``register`` is the ``vllm.general_plugins`` entry point: vLLM calls it in every process
(API server, engine core, each worker), so it must stay idempotent and cheap.
"""

from __future__ import annotations

from vllm_ffnskip.policy import PolicyError, SkipPolicy

__all__ = ["PolicyError", "SkipPolicy", "register"]


def register() -> None:
    """Apply the version-guarded patches and register the model class with vLLM (on an
    unsupported vLLM: only the guard that refuses ``--model-impl ffnskip``)."""
    from vllm import ModelRegistry

    from vllm_ffnskip.patches import apply_all

    if not apply_all():
        return
    if "FFNSkipLlamaForCausalLM" not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(
            "FFNSkipLlamaForCausalLM", "vllm_ffnskip.model:FFNSkipLlamaForCausalLM"
        )
