"""``--model-impl ffnskip``: model class resolution and start-time checks (vLLM 0.32)."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from vllm.config import CompilationConfig, CUDAGraphMode
from vllm.engine.arg_utils import EngineArgs
from vllm.logger import init_logger
from vllm.model_executor.models.registry import _ModelRegistry
from vllm.platforms import current_platform
from vllm.usage.usage_lib import UsageContext

from vllm_ffnskip.patches._wrap import wrap_method
from vllm_ffnskip.policy import PolicyError, SkipPolicy, parse_server_config

logger = init_logger(f"vllm.{__name__}")

MODEL_IMPL = "ffnskip"
#: The skip-aware FFN op (vllm_ffnskip/skip_ffn.py), by its torch.ops name.
SKIP_OP = "vllm::ffnskip_mlp"
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
    """What our compiled graphs depend on beyond vLLM's config: the plugin's source and the
    skip path (graph rule or device-state op).

    vLLM keys its compile caches by its own version and config; on load it re-checks only
    the sources dynamo traced, and its piecewise cache inside is keyed by graph index. A
    changed plugin could then run graphs compiled from the old one (seen after a change of
    the skip graph's inputs: ``not enough values to unpack (expected 41, got 40)``). vLLM
    hashes ``additional_config`` into every compile-cache key, so this goes there.
    """
    import vllm_ffnskip
    from vllm_ffnskip import device_skip

    digest = hashlib.sha256(str(device_skip.use_device_state()).encode())
    # This package and the patches (a sibling folder in a source checkout, inside it when
    # installed).
    for root in sorted({Path(vllm_ffnskip.__file__).parent, Path(__file__).parent}):
        for path in sorted(root.rglob("*.py")):
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
    if vllm_config.use_v2_model_runner:
        raise ValueError(
            f"--model-impl {MODEL_IMPL} follows requests through the V1 model runner's "
            "logits-processor interface; set VLLM_USE_V2_MODEL_RUNNER=0."
        )
    try:
        server_policy(vllm_config)
    except PolicyError as e:
        raise ValueError(f"invalid --additional-config for ffnskip: {e}") from e
    if isinstance(vllm_config.additional_config, dict):
        vllm_config.additional_config = {**vllm_config.additional_config, COMPILE_KEY: compile_key()}
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
    if current_platform.is_cuda_alike():
        graph_safe_cuda(vllm_config.compilation_config)
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
            f"--model-impl {MODEL_IMPL} does not support speculative decoding: vLLM's "
            "speculative decoding drops the logits processor that tells the model which "
            "request sits in which batch row. Serve without --speculative-config."
        )
    if vllm_config.lora_config is not None and current_platform.is_cuda_alike():
        raise ValueError(
            f"--model-impl {MODEL_IMPL} does not support LoRA on GPUs: the skip-aware Triton "
            "FFN reads the base weights only and would drop the adapters. Serve without "
            "--enable-lora."
        )


def graph_safe_cuda(config: CompilationConfig) -> None:
    """CUDA graphs: piecewise only, with the skip-aware FFN op as a splitting op.

    The op decides per pass on the host which tokens skip, and the model chooses per pass
    between its dense and skip graphs: a replay runs no Python, so a captured FULL graph or
    a captured op would repeat the capture's (dense) decisions forever. As a splitting op it
    runs eagerly between captured pieces, as attention does; dense passes keep vLLM's
    piecewise graphs.
    """
    if config.cudagraph_mode.has_full_cudagraphs():
        logger.warning(
            "--model-impl %s: cudagraph_mode %s -> PIECEWISE (skip decisions are made per "
            "pass on the host; a full CUDA graph would replay the captured ones)",
            MODEL_IMPL, config.cudagraph_mode.name,
        )
        config.cudagraph_mode = CUDAGraphMode.PIECEWISE
    if config.splitting_ops is not None and SKIP_OP not in config.splitting_ops:
        config.splitting_ops.append(SKIP_OP)


def apply() -> None:
    wrap_method(_ModelRegistry, "resolve_model_cls", _resolve_model_cls)
    wrap_method(EngineArgs, "create_engine_config", _create_engine_config)
