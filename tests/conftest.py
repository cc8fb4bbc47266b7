"""Shared fixtures: the embedded model, and vLLM engines shared per test module."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator

import pytest

# vLLM on the CPU otherwise asks for 92% of NUMA node 0 for its KV cache.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "The largest planet in the solar system is",
    "The author of Romeo and Juliet is",
    "Photosynthesis is the process by which",
    "The chemical symbol for gold is",
    "A haiku is a poem that",
    "The speed of light is approximately",
    "In 1969, the first humans to walk on the moon were",
    "The three primary colors are",
]


@pytest.fixture(scope="session")
def embedded_model() -> str:
    from vllm_ffnskip import embedded

    return str(embedded.build())


def make_llm(model: str, **kwargs):
    """An offline engine for the embedded model (fp32, eager unless asked otherwise)."""
    from vllm import LLM

    options = dict(
        model=model,
        dtype="float32",
        max_model_len=1024,
        enforce_eager=True,
        seed=0,
        max_num_seqs=16,
    )
    options.update(kwargs)
    return LLM(**options)


def close_llm(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


@pytest.fixture(scope="module")
def vanilla_llm(embedded_model: str) -> Iterator[object]:
    llm = make_llm(embedded_model, model_impl="vllm")
    yield llm
    close_llm(llm)
