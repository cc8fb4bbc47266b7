"""``--model-impl ffnskip``: model class resolution and start-time checks (vLLM 0.32)."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from vllm.engine.arg_utils import EngineArgs
from vllm.logger import init_logger
from vllm.model_executor.models.registry import _ModelRegistry
from vllm.platforms import current_platform
from vllm.usage.usage_lib import UsageContext

from vllm_ffnskip.patches._wrap import wrap_method
from vllm_ffnskip.policy import PolicyError, SkipPolicy, parse_server_config

logger = init_logger(__name__)

MODEL_IMPL = "ffnskip"
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
TRACKER = "vllm_ffnskip.tracker:SkipPolicyTracker"
#: ``additional_config`` key of compile_key(), set on every ffnskip engine.
COMPILE_KEY = "ffnskip_compile_key"
WORKER_EXTENSION = "vllm_ffnskip.worker.FFNSkipWorkerExtension"


def is_ffnskip(model_config: Any) -> bool:
    return getattr(model_config, "model_impl", None) == MODEL_IMPL


def _check_architecture(architectures: list[str]) -> str:
    for arch in architectures:
        if arch in SUPPORTED_ARCHITECTURES:
            return arch
    raise ValueError(
        f"--model-impl {MODEL_IMPL} supports {list(SUPPORTED_ARCHITECTURES)} checkpoints; "
        f"this model's architectures are {architectures}. Serve it without "
        f"--model-impl {MODEL_IMPL}."
    )


@functools.lru_cache(maxsize=16)
def _server_policy(config_json: str, model: str, num_layers: int) -> SkipPolicy:
    from vllm_ffnskip.embedded import default_policy_for

    config = json.loads(config_json)
    policy = parse_server_config(config, base=default_policy_for(model))
    policy.validate_for(num_layers)
    return policy


def server_policy(vllm_config: Any) -> SkipPolicy:
    """The server default policy of an ffnskip engine (cached: called per request)."""
    model_config = vllm_config.model_config
    config = (vllm_config.additional_config or {}).get("ffnskip")
    return _server_policy(
        json.dumps(config, sort_keys=True),
        model_config.model,
        model_config.hf_config.num_hidden_layers,
    )


@functools.lru_cache(maxsize=1)
def compile_key() -> str:
    """What our compiled graphs depend on beyond vLLM's config: the plugin's source, a
    forced masked-MLP form (masked_mlp.FORM_ENV) and whether the process records scores
    (stats.RECORDER: only then does the graph write them).

    vLLM keys its compile caches by its own version and config; on load it re-checks only
    the sources dynamo traced, and its piecewise cache inside is keyed by graph index. A
    changed plugin could then run graphs compiled from the old one (seen after a change of
    the skip graph's inputs: ``not enough values to unpack (expected 41, got 40)``). vLLM
    hashes ``additional_config`` into every compile-cache key, so this goes there.
    """
    import os

    import vllm_ffnskip
    from vllm_ffnskip.masked_mlp import FORM_ENV
    from vllm_ffnskip.stats import RECORDER

    digest = hashlib.sha256(f"{os.environ.get(FORM_ENV, '')}:{RECORDER.enabled}".encode())
    # This package and the patches (a sibling folder in a source checkout, inside it when
    # installed), less the command-line tools, which no graph is built from.
    tools = Path(vllm_ffnskip.__file__).parent / "tools"
    for root in sorted({Path(vllm_ffnskip.__file__).parent, Path(__file__).parent}):
        for path in sorted(p for p in root.rglob("*.py") if tools not in p.parents):
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def key_compile_cache_by_stage(vllm_config: Any, layers: range) -> None:
    """In a worker: give this pipeline stage's graphs compile caches of their own.

    vLLM keys its compile caches by config, and the stages of one engine share a config: in
    vLLM 0.32 they share one inductor cache directory. Our graphs do not load from vLLM's
    AOT cache here (``'function' object has no attribute 'finalize_loading'``) and are
    recompiled at each start, and on a warm cache a stage that recompiled was handed the
    other stage's graph (PP=2 restart: ``too many values to unpack (expected 40)``). The
    stage's layer range in ``additional_config`` separates them.
    """
    config = vllm_config.additional_config
    if isinstance(config, dict) and COMPILE_KEY in config:
        config[COMPILE_KEY] = f"{compile_key()}:layers{layers.start}-{layers.stop}"


def _log_uncalibrated(vllm_config: Any) -> None:
    """At start: a model without a calibrated policy serves the conservative default; say so,
    and what to run to calibrate it."""
    from vllm_ffnskip.embedded import has_shipped_policy

    model = vllm_config.model_config.model
    config = (vllm_config.additional_config or {}).get("ffnskip") or {}
    if has_shipped_policy(model) or "policy_file" in config or "threshold" in config:
        return
    logger.warning(
        "ffnskip: no calibrated policy for %s; serving the conservative default (global "
        "threshold %g). To skip more within a quality budget, run `vllm-ffnskip calibrate "
        "--model %s --max-loss 2 --out policy.json` and serve with --additional-config "
        "'{\"ffnskip\": {\"policy_file\": \"policy.json\"}}'.",
        model, SkipPolicy().threshold, model,
    )


def _resolve_model_cls(original, self, architectures, model_config):
    if not is_ffnskip(model_config):
        return original(self, architectures, model_config)
    if isinstance(architectures, str):
        architectures = [architectures]
    from vllm_ffnskip.model import FFNSkipLlamaForCausalLM

    return FFNSkipLlamaForCausalLM, _check_architecture(list(architectures))


def _create_engine_config(original, self, usage_context=None, *args, **kwargs):
    vllm_config = original(self, usage_context, *args, **kwargs)
    model_config = vllm_config.model_config
    if not is_ffnskip(model_config):
        return vllm_config
    _check_architecture(list(getattr(model_config.hf_config, "architectures", None) or []))
    _check_features(vllm_config)
    try:
        server_policy(vllm_config)
    except PolicyError as e:
        raise ValueError(f"invalid --additional-config for ffnskip: {e}") from e
    _log_uncalibrated(vllm_config)
    if isinstance(vllm_config.additional_config, dict):
        vllm_config.additional_config = {**vllm_config.additional_config, COMPILE_KEY: compile_key()}
    if not vllm_config.use_v2_model_runner:
        # V1 follows requests through a logits processor; V2 through the model's state
        # (FFNSkipLlamaForCausalLM.get_model_state_cls) and refuses V1 logits processors.
        processors = list(model_config.logits_processors or [])
        if TRACKER not in processors:
            model_config.logits_processors = processors + [TRACKER]
    parallel_config = vllm_config.parallel_config
    if parallel_config.worker_extension_cls not in ("", WORKER_EXTENSION):
        raise ValueError(
            f"--model-impl {MODEL_IMPL} needs --worker-extension-cls {WORKER_EXTENSION}; "
            f"got {parallel_config.worker_extension_cls!r}"
        )
    parallel_config.worker_extension_cls = WORKER_EXTENSION
    from vllm_ffnskip.patches import request_stats

    if usage_context == UsageContext.OPENAI_API_SERVER:
        request_stats.apply()
    elif usage_context == UsageContext.LLM_CLASS:
        request_stats.apply_offline()
    return vllm_config


def _check_features(vllm_config: Any) -> None:
    """Refuse, at start, what skipping would silently get wrong."""
    if vllm_config.speculative_config is not None:
        raise ValueError(
            f"--model-impl {MODEL_IMPL} does not support speculative decoding: the skip "
            "rule is defined and tested for one decode token per request per step, not for "
            "verifying draft tokens. Serve without --speculative-config."
        )
    if current_platform.is_cuda_alike() and not vllm_config.use_v2_model_runner:
        raise ValueError(
            f"--model-impl {MODEL_IMPL} runs on GPUs under vLLM's V2 model runner, vLLM's "
            "default there: a V1 full CUDA graph would replay the host routing it captured. "
            "Unset VLLM_USE_V2_MODEL_RUNNER=0."
        )
    if vllm_config.lora_config is not None and current_platform.is_cuda_alike():
        raise ValueError(
            f"--model-impl {MODEL_IMPL} does not support LoRA on GPUs: the skip-aware Triton "
            "FFN reads the base weights only and would drop the adapters. Serve without "
            "--enable-lora."
        )


def apply() -> None:
    wrap_method(_ModelRegistry, "resolve_model_cls", _resolve_model_cls)
    wrap_method(EngineArgs, "create_engine_config", _create_engine_config)
