"""A tiny random-weight LLaMa checkpoint for engine tests that need a second shape.

The embedded model (SmolLM2-135M, 9 query / 3 KV heads) cannot be split over two
tensor-parallel ranks; this one can: 4 query heads, 2 KV heads, head_dim 64 (the CPU
attention backend wants head_dim >= 64), 8 layers. No tokenizer is written, so engines
serving it need ``skip_tokenizer_init=True`` and prompts as token ids.

Random init (fixed seed, ``initializer_range`` 0.02) gives small FFN outputs: measured with
transformers on greedy decodes, cos(h, h + f) is about 0.78-0.94 in layer 0, 0.95-0.975 in
layer 1, 0.97-0.99 in layers 2-3 and 0.989-0.997 in layers 4-7. With ``SKIP_THRESHOLD`` and
cold regions 1/1, requests skip about 20-33 % of their hot FFN blocks (tests assert a skip
ratio > 0 all the same). Greedy outputs are repetitive, as expected of random weights, but
skipping does change them, so token equality is a real check.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

CONFIG = {
    "vocab_size": 512,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
SEED = 1234
NUM_LAYERS = CONFIG["num_hidden_layers"]
#: A per-request threshold at which the tiny model skips a good share of its hot FFNs.
SKIP_THRESHOLD = 0.985


def prompts(n: int, length: int = 12, seed: int = 0) -> list[dict[str, list[int]]]:
    """``n`` deterministic token-id prompts of varying lengths (ids in [3, vocab))."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        size = length + (i % 5)
        out.append({"prompt_token_ids": [rng.randrange(3, CONFIG["vocab_size"]) for _ in range(size)]})
    return out


def build(directory: str | os.PathLike | None = None) -> str:
    """Writes the checkpoint (once per content hash) and returns its directory.

    Without ``directory`` the checkpoint goes to a cache folder under the system temp dir
    named by a hash of the config and seed, so repeated test runs reuse it.
    """
    key = hashlib.sha256(json.dumps([CONFIG, SEED], sort_keys=True).encode()).hexdigest()[:12]
    path = Path(directory) if directory is not None else Path(tempfile.gettempdir()) / f"ffnskip-tiny-llama-{key}"
    if (path / "config.json").exists() and (path / "model.safetensors").exists():
        return str(path)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(**CONFIG)
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="tiny-llama-", dir=path.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    tmp.chmod(0o755)  # mkdtemp makes it private; other users' engines may read it
    try:
        os.replace(tmp, path)  # atomic publish: concurrent builders never see half a folder
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        if not (path / "config.json").exists():
            raise
    return str(path)


if __name__ == "__main__":
    print(build())
