"""Offline vLLM engines and request parameters shared by the tools.

Every tool drives vLLM's own offline ``LLM`` with ``--model-impl ffnskip`` (or vanilla
``vllm`` for the overhead baseline) and selects a policy per request through
``SamplingParams.extra_args`` — the same channel an API client uses (``vllm_xargs``), so the
numbers describe what a user of the server gets.
"""

from __future__ import annotations

import gc
import os
from typing import Any

#: Per-request policy of dense requests on an ffnskip engine.
DENSE: dict[str, Any] = {"ffnskip": 0}
#: Per-request policy that computes the saturation score at every layer of every decode
#: token and never skips (threshold 1.0 cannot be reached in practice; see profile.py).
SCORE_ALL: dict[str, Any] = {
    "ffnskip": 1,
    "ffnskip_threshold": 1.0,
    "ffnskip_cold_start": 0,
    "ffnskip_cold_end": 0,
    "ffnskip_warmup": 0,
}


#: The quality tools' engine: skipping off unless a request asks, and the rule applied in
#: every pass, however wide (``max_skip_rows`` 0): they measure what the rule does to
#: answers, which a server's dense fallback in wide passes only moves back towards dense.
RULE_EXACT: dict[str, Any] = {"enabled": False, "max_skip_rows": 0}


def resolve_model(model: str | None) -> str:
    """The model path: the one given, or the embedded SmolLM2-135M-Instruct (built once)."""
    if model:
        return model
    from vllm_ffnskip import embedded

    return str(embedded.build())


def make_llm(
    model: str,
    *,
    impl: str = "ffnskip",
    server: dict[str, Any] | None = None,
    eager: bool = True,
    dtype: str = "float32",
    max_num_seqs: int = 64,
    max_model_len: int = 1024,
    record_scores: bool = False,
) -> Any:
    """An offline engine. ``server`` is the ffnskip server default (``additional_config``;
    default ``RULE_EXACT``);
    eager fp32 gives deterministic quality numbers, compiled mode (``eager=False``) the
    speed numbers. ``record_scores`` must be set before the workers start (they read the
    environment once), hence here."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ["VLLM_FFNSKIP_RECORD_SCORES"] = "1" if record_scores else "0"
    from vllm import LLM

    options: dict[str, Any] = {
        "model": model,
        "model_impl": impl,
        "dtype": dtype,
        "max_model_len": max_model_len,
        "max_num_seqs": max_num_seqs,
        "enforce_eager": eager,
        "seed": 0,
    }
    if impl == "ffnskip":
        options["additional_config"] = {"ffnskip": server or RULE_EXACT}
    return LLM(**options)


def close_llm(llm: Any) -> None:
    """Shut the engine core down now, so the next engine never runs beside it."""
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def greedy(
    xargs: dict[str, Any] | None, max_tokens: int, ignore_eos: bool = False
) -> Any:
    """Greedy decoding with a per-request policy (None: the server default)."""
    from vllm import SamplingParams

    return SamplingParams(
        temperature=0.0, max_tokens=max_tokens, ignore_eos=ignore_eos, extra_args=xargs
    )
