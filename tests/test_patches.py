"""The patches: version guard, idempotence, model-impl resolution, start-time checks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from vllm_ffnskip import patches


def test_unknown_vllm_version_fails_loudly():
    for version in ("0.99.0", "0.34.0", "0.31.2"):
        with pytest.raises(patches.UnsupportedVLLMVersion, match=version):
            patches.check_vllm_version(version)
    for version in ("0.32.0", "0.33.0", "0.33.1+cu130"):  # the CUDA release read for 0.33
        patches.check_vllm_version(version)


#: Run in a fresh interpreter: vLLM reports a release we have not seen, then the plugin loads.
FAKED_VERSION = """
import sys, vllm
vllm.__version__ = "0.99.0"
from vllm.engine.arg_utils import EngineArgs
from vllm.model_executor.models.registry import _ModelRegistry
from vllm.v1.engine.input_processor import InputProcessor
from vllm_ffnskip import register
from vllm_ffnskip.patches import UnsupportedVLLMVersion
register()
register()
assert not getattr(_ModelRegistry.resolve_model_cls, "__ffnskip_patch__", False)
assert not getattr(InputProcessor.process_inputs, "__ffnskip_patch__", False)
config = EngineArgs(model=sys.argv[1], skip_tokenizer_init=True).create_engine_config()
assert config.model_config.model_impl == "auto" and not config.model_config.logits_processors
assert not config.parallel_config.worker_extension_cls
try:
    EngineArgs(model=sys.argv[1], skip_tokenizer_init=True, model_impl="ffnskip").create_engine_config()
except UnsupportedVLLMVersion as e:
    print("REFUSED:", e)
"""


def test_unknown_vllm_version_leaves_other_engines_untouched(embedded_model):
    """On a vLLM release the patches were not written for, the plugin patches nothing: an
    engine without --model-impl ffnskip is vLLM's own; one with it fails at start, naming
    the release."""
    done = subprocess.run([sys.executable, "-c", FAKED_VERSION, embedded_model],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    refused = [line for line in done.stdout.splitlines() if line.startswith("REFUSED:")]
    assert len(refused) == 1 and "0.99.0" in refused[0] and "--model-impl ffnskip" in refused[0]


def test_register_is_idempotent():
    from vllm.engine.arg_utils import EngineArgs

    from vllm_ffnskip import register

    register()
    first = EngineArgs.create_engine_config
    register()
    assert EngineArgs.create_engine_config is first
    assert getattr(first, "__ffnskip_patch__", False)


def test_vllm_command_reports_its_version():
    done = subprocess.run(["vllm", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith("0.32")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> str:
    from transformers import GPT2Config

    path = tmp_path_factory.mktemp("gpt2")
    GPT2Config(n_layer=2, n_embd=128, n_head=2, vocab_size=256).save_pretrained(path)
    return str(path)


def engine_config(model: str, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=model, skip_tokenizer_init=True, **kwargs).create_engine_config()


def test_unsupported_architecture_fails_at_start(gpt2_dir):
    with pytest.raises(ValueError, match="LlamaForCausalLM.*checkpoints"):
        engine_config(gpt2_dir, model_impl="ffnskip")
    engine_config(gpt2_dir)  # without the flag, nothing changes


def test_ffnskip_resolves_llama_to_our_class(embedded_model):
    from vllm.model_executor.model_loader.utils import get_model_cls

    config = engine_config(embedded_model, model_impl="ffnskip")
    assert get_model_cls(config.model_config).__name__ == "FFNSkipLlamaForCausalLM"
    assert "vllm_ffnskip.tracker:SkipPolicyTracker" in config.model_config.logits_processors
    vanilla = engine_config(embedded_model)
    assert get_model_cls(vanilla.model_config).__name__ == "LlamaForCausalLM"
    assert not vanilla.model_config.logits_processors
    assert not vanilla.parallel_config.worker_extension_cls


def test_compile_cache_key_covers_the_plugin(embedded_model, monkeypatch):
    """vLLM hashes additional_config into its compile-cache keys: ffnskip engines carry a key
    of our source and skip path there, so a changed plugin never loads stale graphs."""
    from vllm_ffnskip.masked_mlp import FORM_ENV
    from vllm_ffnskip.patches import model_impl
    from vllm_ffnskip.stats import RECORDER

    config = engine_config(embedded_model, model_impl="ffnskip")
    key = config.additional_config[model_impl.COMPILE_KEY]
    assert key == model_impl.compile_key()
    vanilla = engine_config(embedded_model)
    assert model_impl.COMPILE_KEY not in (vanilla.additional_config or {})
    digest = config.compute_hash()
    config.additional_config[model_impl.COMPILE_KEY] = "another plugin"
    assert config.compute_hash() != digest  # vLLM's compile caches see the key
    model_impl.compile_key.cache_clear()
    monkeypatch.setenv(FORM_ENV, "mask")  # another masked-MLP form traces other graphs
    try:
        assert model_impl.compile_key() != key
    finally:
        model_impl.compile_key.cache_clear()
    # A process that records scores traces the score writes into its graphs; others do not.
    monkeypatch.setattr(RECORDER, "enabled", not RECORDER.enabled)
    try:
        assert model_impl.compile_key() != key
    finally:
        model_impl.compile_key.cache_clear()


@pytest.mark.parametrize(
    "config, message",
    [
        ({"threshold": 1.5}, "ffnskip.threshold"),
        ({"cold_start": 20, "cold_end": 10}, "cold regions"),
        ({"policy_file": "/nonexistent/p.json"}, "/nonexistent/p.json"),
        ({"colour": 1}, "ffnskip.colour"),
    ],
)
def test_bad_server_config_fails_at_start(embedded_model, config, message):
    with pytest.raises(ValueError, match="invalid --additional-config") as err:
        engine_config(embedded_model, model_impl="ffnskip", additional_config={"ffnskip": config})
    assert message in str(err.value)


def test_malformed_policy_file_fails_at_start_with_path_and_reason(embedded_model, tmp_path):
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"layer_thresholds": [0.9] * 7}))
    with pytest.raises(ValueError) as err:
        engine_config(
            embedded_model, model_impl="ffnskip",
            additional_config={"ffnskip": {"policy_file": str(path)}},
        )
    assert "7 entries" in str(err.value) and "30 layers" in str(err.value)


def test_prefix_cache_key_only_past_the_prompt():
    from types import SimpleNamespace

    from vllm.v1.core import block_pool, kv_cache_utils
    from vllm.sampling_params import SamplingParams

    from vllm_ffnskip.policy import RESOLVED_KEY, SkipPolicy

    wire = SkipPolicy().to_wire(30)
    request = SimpleNamespace(
        sampling_params=SamplingParams(extra_args={RESOLVED_KEY: wire}),
        num_prompt_tokens=32, mm_features=[], lora_request=None, cache_salt=None,
        prompt_embeds=None,
    )
    generate = kv_cache_utils.generate_block_hash_extra_keys
    assert block_pool.generate_block_hash_extra_keys is generate
    assert generate(request, 16, 32, 0)[0] is None  # prompt block: shared with everyone
    keys = generate(request, 32, 48, 0)[0]
    assert keys and keys[-1][0] == "ffnskip"
    other = SimpleNamespace(**{**vars(request), "sampling_params": SamplingParams(
        extra_args={RESOLVED_KEY: SkipPolicy(threshold=0.9).to_wire(30)})})
    assert generate(other, 32, 48, 0)[0] != keys


def test_response_stats_match_only_their_own_requests():
    """Counts stashed per engine request are summed per response id: ``id``, ``id-i``
    (completion prompts), ``id_i`` (chat prompts), and never a longer id sharing a prefix."""
    from vllm_ffnskip.patches import request_stats
    from vllm_ffnskip.stats import SkipStats

    stash = request_stats._FINISHED
    stash.clear()
    for key, n in [("cmpl-ab-0", 1), ("cmpl-ab-1", 2), ("cmpl-abc-0", 4), ("chat-x_1", 8)]:
        stash[key] = SkipStats(n, 10 * n)
    assert request_stats.take_response_stats("cmpl-ab") == SkipStats(3, 30)
    assert request_stats.take_response_stats("cmpl-ab") is None  # handed over once
    assert request_stats.take_response_stats("chat-x") == SkipStats(8, 80)
    assert list(stash) == ["cmpl-abc-0"]
    stash.clear()


@pytest.mark.parametrize("mode", ["FULL_AND_PIECEWISE", "FULL", "FULL_DECODE_ONLY", "PIECEWISE"])
def test_cuda_engine_keeps_vllm_graph_settings(embedded_model, monkeypatch, mode):
    """On a CUDA-like platform under the V2 runner (vLLM's default there), an ffnskip engine
    config keeps vLLM's CUDA-graph mode and splitting ops, loads no V1 logits processor and
    asks for no V1 runner; forcing V1 there is refused at start, naming the variable."""
    from vllm.config import CUDAGraphMode, VllmConfig
    from vllm.platforms import current_platform

    from vllm_ffnskip.patches import model_impl

    splitting_ops = ["vllm::unified_attention_with_output"]
    base = engine_config(embedded_model)  # vLLM's own config, as the platform made it
    base.model_config.model_impl = "ffnskip"
    base.compilation_config.cudagraph_mode = CUDAGraphMode[mode]
    base.compilation_config.splitting_ops = list(splitting_ops)
    monkeypatch.setattr(current_platform, "is_cuda_alike", lambda: True)
    monkeypatch.setattr(current_platform, "is_cuda", lambda: True)
    monkeypatch.setattr(VllmConfig, "use_v2_model_runner", property(lambda self: True))
    config = model_impl._create_engine_config(lambda self, usage_context: base, None)
    assert config.compilation_config.cudagraph_mode == CUDAGraphMode[mode]
    assert config.compilation_config.splitting_ops == splitting_ops
    assert not config.model_config.logits_processors
    assert config.parallel_config.worker_extension_cls == model_impl.WORKER_EXTENSION
    from vllm_ffnskip.model import FFNSkipLlamaForCausalLM
    from vllm_ffnskip.model_state import FFNSkipModelState

    assert FFNSkipLlamaForCausalLM.get_model_state_cls() is FFNSkipModelState
    monkeypatch.setattr(VllmConfig, "use_v2_model_runner", property(lambda self: False))
    with pytest.raises(ValueError, match="VLLM_USE_V2_MODEL_RUNNER"):
        model_impl._create_engine_config(lambda self, usage_context: base, None)


def test_counts_of_requests_finishing_together_come_in_one_call():
    """Requests that finish together share one call for their counts, and requests that
    finish while a call is out share the next one: 20 at once cost one call; 5 more, then 5
    while that call is out, cost two."""
    import asyncio
    from types import SimpleNamespace

    from vllm_ffnskip.patches.request_stats import CountsFetcher

    calls: list[list[str]] = []

    class Engine:
        vllm_config = SimpleNamespace(parallel_config=SimpleNamespace(tensor_parallel_size=1))

        async def collective_rpc(self, method, args=()):
            assert method == "ffnskip_request_stats"
            (ids,) = args
            calls.append(ids)
            await asyncio.sleep(0.05)  # the engine core answers between two steps
            return [{rid: {"skipped": int(rid), "evaluated": 30} for rid in ids if rid != "7"}]

    async def finish(first: range, later: range) -> list:
        fetcher = CountsFetcher(Engine())
        waiting = [asyncio.ensure_future(fetcher.counts(str(i))) for i in first]
        await asyncio.sleep(0.01)  # a call is out now
        waiting += [asyncio.ensure_future(fetcher.counts(str(i))) for i in later]
        return await asyncio.gather(*waiting)

    results = asyncio.run(finish(range(20), range(0)))
    assert [len(c) for c in calls] == [20]
    assert results[7] is None  # not a request the workers know as skipping
    assert [(r.skipped, r.evaluated) for i, r in enumerate(results) if i != 7] == [
        (i, 30) for i in range(20) if i != 7]
    calls.clear()
    results = asyncio.run(finish(range(20, 25), range(25, 30)))
    assert calls == [[str(i) for i in range(20, 25)], [str(i) for i in range(25, 30)]]
    assert [r.skipped for r in results] == list(range(20, 30))


def test_speculative_decoding_is_refused_at_start(embedded_model):
    with pytest.raises(ValueError, match="speculative decoding"):
        engine_config(embedded_model, model_impl="ffnskip", speculative_config={
            "method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3})
    engine_config(embedded_model, speculative_config={  # without the flag, vLLM's own
        "method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3})


def test_lora_is_refused_on_gpus(embedded_model, monkeypatch):
    """The Triton FFN would drop LoRA adapters: refused at start on a CUDA-like platform."""
    from types import SimpleNamespace

    from vllm_ffnskip.patches import model_impl

    config = SimpleNamespace(speculative_config=None, lora_config=object(), use_v2_model_runner=True)
    monkeypatch.setattr(model_impl, "current_platform", SimpleNamespace(is_cuda_alike=lambda: True))
    with pytest.raises(ValueError, match="LoRA"):
        model_impl._check_features(config)
    monkeypatch.setattr(model_impl, "current_platform", SimpleNamespace(is_cuda_alike=lambda: False))
    model_impl._check_features(config)  # the CPU graph calls the module's MLP, LoRA wrappers and all


@pytest.mark.parametrize(
    "config, logs",
    [({"enabled": True}, True), ({"threshold": 0.97}, False), ({"policy_file": "p.json"}, False)],
)
def test_uncalibrated_model_logs_how_to_calibrate(embedded_model, monkeypatch, config, logs):
    """A model without a shipped policy serves the conservative default and says at start
    what to run; the embedded model (shipped policy) and explicit policies stay quiet."""
    from types import SimpleNamespace

    from vllm_ffnskip.patches import model_impl

    lines: list[str] = []
    monkeypatch.setattr(model_impl.logger, "warning", lambda fmt, *a: lines.append(fmt % a))
    for model, quiet in (("/models/llama-7b", False), (embedded_model, True)):
        lines.clear()
        model_impl._log_uncalibrated(SimpleNamespace(
            model_config=SimpleNamespace(model=model), additional_config={"ffnskip": config}))
        assert bool(lines) == (logs and not quiet), (model, config)
        if lines:
            assert "vllm-ffnskip calibrate --model /models/llama-7b --max-loss" in lines[0]
