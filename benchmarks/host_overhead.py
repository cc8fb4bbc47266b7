"""Host-side cost per forward pass of the skip path, inside a running engine (docs/results.md §4).

    python benchmarks/host_overhead.py [XARGS]     # default XARGS: {"ffnskip": true}

Times, per call, the plugin's work around the compiled graph: routing the pass's tokens to
their slots (host), the device ops before the graph (``begin_pass``) and the count fold
after it (``end_pass``). One engine in this process, fp32, compiled, batch 1, 128 tokens (after one
warm-up request). Numbers from a loop outside the engine are 3-10x lower: right after the
graph has streamed the model's weights, every host call runs with cold caches.
"""

import collections
import json
import os
import sys
import time

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

TOKENS = 128

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    from vllm_ffnskip import model, skip_state
    from vllm_ffnskip.embedded import model_dir

    total: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter[str] = collections.Counter()

    def timed(cls: type, name: str) -> None:
        inner = getattr(cls, name)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                total[name] += time.perf_counter() - start
                calls[name] += 1

        setattr(cls, name, wrapper)

    for cls, name in [
        (model.FFNSkipLlamaForCausalLM, "forward"),
        (model.FFNSkipLlamaForCausalLM, "route_v1"),
        (skip_state.SkipState, "runs_skip_graph"),
        (skip_state.SkipState, "begin_pass"),
        (skip_state.SkipState, "end_pass"),
    ]:
        timed(cls, name)
    xargs = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {"ffnskip": True}
    llm = LLM(str(model_dir()), model_impl="ffnskip", dtype="float32", max_num_seqs=8, seed=0)
    params = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True, extra_args=xargs)
    prompt = "Write a short story about a lighthouse keeper."
    llm.generate([prompt], params, use_tqdm=False)
    total.clear()
    calls.clear()
    llm.generate([prompt], params, use_tqdm=False)
    print("| call | calls | us per call |\n|---|---|---|")
    for name in total:
        print(f"| {name} | {calls[name]} | {total[name] / calls[name] * 1e6:.1f} |")
