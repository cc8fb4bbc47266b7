"""Per-request policy: validated and resolved in the API server (vLLM 0.32)."""

from __future__ import annotations

from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import SamplingParams
from vllm.v1.engine.input_processor import InputProcessor

from vllm_ffnskip.patches._wrap import wrap_method
from vllm_ffnskip.patches.model_impl import is_ffnskip, server_policy
from vllm_ffnskip.policy import (
    REQUEST_ID_KEY,
    RESOLVED_KEY,
    PolicyError,
    SkipPolicy,
    parse_request,
)


def resolve_request_policy(processor: InputProcessor, params: SamplingParams) -> SkipPolicy:
    """The request's effective policy; a ``VLLMValidationError`` (HTTP 400) naming the
    field when a value is invalid."""
    num_layers = processor.model_config.hf_config.num_hidden_layers
    try:
        policy = parse_request(params.extra_args, server_policy(processor.vllm_config), num_layers)
    except PolicyError as e:
        raise VLLMValidationError(str(e), parameter=e.field, value=e.value) from e
    return policy


def _process_inputs(original, self, request_id, prompt, params, *args, **kwargs):
    if not (is_ffnskip(self.model_config) and isinstance(params, SamplingParams)):
        return original(self, request_id, prompt, params, *args, **kwargs)
    policy = resolve_request_policy(self, params)
    request = original(self, request_id, prompt, params, *args, **kwargs)
    # ``request.sampling_params`` is the request-local clone; the caller's params object is
    # never changed. Dense requests carry no policy: their KV blocks stay shared.
    sampling_params = request.sampling_params
    extra_args = {**(sampling_params.extra_args or {}), REQUEST_ID_KEY: request_id}
    if policy.enabled:
        extra_args[RESOLVED_KEY] = policy.to_wire(self.model_config.hf_config.num_hidden_layers)
    sampling_params.extra_args = extra_args
    return request


def apply() -> None:
    wrap_method(InputProcessor, "process_inputs", _process_inputs)
