"""``--model-impl ffnskip``: model class resolution and start-time checks (vLLM 0.32)."""

from __future__ import annotations

import functools
import json
from typing import Any

from vllm.engine.arg_utils import EngineArgs
from vllm.model_executor.models.registry import _ModelRegistry

from vllm_ffnskip.metrics import setup_api_server_metrics
from vllm_ffnskip.patches._wrap import wrap_method
from vllm_ffnskip.policy import PolicyError, SkipPolicy, parse_server_config

MODEL_IMPL = "ffnskip"
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
TRACKER = "vllm_ffnskip.tracker:SkipPolicyTracker"
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


def _resolve_model_cls(original, self, architectures, model_config):
    if not is_ffnskip(model_config):
        return original(self, architectures, model_config)
    if isinstance(architectures, str):
        architectures = [architectures]
    from vllm_ffnskip.model import FFNSkipLlamaForCausalLM

    return FFNSkipLlamaForCausalLM, _check_architecture(list(architectures))


def _create_engine_config(original, self, *args, **kwargs):
    vllm_config = original(self, *args, **kwargs)
    model_config = vllm_config.model_config
    if not is_ffnskip(model_config):
        return vllm_config
    _check_architecture(list(getattr(model_config.hf_config, "architectures", None) or []))
    if vllm_config.use_v2_model_runner:
        raise ValueError(
            f"--model-impl {MODEL_IMPL} follows requests through the V1 model runner's "
            "logits-processor interface; set VLLM_USE_V2_MODEL_RUNNER=0."
        )
    try:
        server_policy(vllm_config)
    except PolicyError as e:
        raise ValueError(f"invalid --additional-config for ffnskip: {e}") from e
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
    setup_api_server_metrics()
    return vllm_config


def apply() -> None:
    wrap_method(_ModelRegistry, "resolve_model_cls", _resolve_model_cls)
    wrap_method(EngineArgs, "create_engine_config", _create_engine_config)
