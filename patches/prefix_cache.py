"""Prefix-cache keys that keep policy-dependent KV blocks apart (vLLM 0.32)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from vllm.v1.core import block_pool, kv_cache_utils

from vllm_ffnskip.patches._wrap import wrap_method
from vllm_ffnskip.policy import RESOLVED_KEY

def policy_key(wire: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(wire, sort_keys=True).encode()).hexdigest()[:16]


def _extra_keys(original, request, start_token_idx, end_token_idx, start_mm_idx):
    extra_keys, next_mm_idx = original(request, start_token_idx, end_token_idx, start_mm_idx)
    params = request.sampling_params
    wire = (params.extra_args or {}).get(RESOLVED_KEY) if params is not None else None
    # Prompt tokens are computed densely whatever the policy, so their blocks stay shared;
    # a block that reaches past the prompt holds KV computed under this policy.
    if wire is None or end_token_idx <= request.num_prompt_tokens:
        return extra_keys, next_mm_idx
    return (*(extra_keys or ()), ("ffnskip", policy_key(wire))), next_mm_idx


def apply() -> None:
    original = kv_cache_utils.generate_block_hash_extra_keys
    wrap_method(kv_cache_utils, "generate_block_hash_extra_keys", _extra_keys)
    # block_pool imported the function by name (for KV events); keep both in step.
    if block_pool.generate_block_hash_extra_keys is original:
        block_pool.generate_block_hash_extra_keys = kv_cache_utils.generate_block_hash_extra_keys
