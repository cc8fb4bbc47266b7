"""Batch-1 decode speed of one engine, in process: the quick A/B behind docs/results.md §4.

    python benchmarks/decode_ab.py vllm                          # vanilla
    python benchmarks/decode_ab.py ffnskip '{"ffnskip": false}'  # plugin, dense
    python benchmarks/decode_ab.py ffnskip '{"ffnskip": true}'   # plugin, skipping
    ... --profile                                                # + torch.profiler table

Engine core and worker run in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), fp32,
compiled mode; three timed runs of 128 tokens after one warm-up run. Run one engine at a
time and alternate the order: engine-to-engine spread on a 2-core machine is ±10%.
"""

import json
import os
import sys
import time

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

if __name__ == "__main__":
    import torch
    from vllm import LLM, SamplingParams

    from vllm_ffnskip.embedded import model_dir

    args = [a for a in sys.argv[1:] if a != "--profile"]
    impl, xargs = args[0], json.loads(args[1]) if len(args) > 1 else None
    llm = LLM(str(model_dir()), model_impl=impl, dtype="float32", max_num_seqs=8, seed=0)
    prompt = "Write a short story about a lighthouse keeper."
    params = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True, extra_args=xargs)
    llm.generate([prompt], params, use_tqdm=False)
    for run in range(3):
        start = time.perf_counter()
        llm.generate([prompt], params, use_tqdm=False)
        print(f"{impl} {xargs} run{run}: {128 / (time.perf_counter() - start):.1f} tok/s")
    if "--profile" in sys.argv:
        params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True, extra_args=xargs)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            llm.generate([prompt], params, use_tqdm=False)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
