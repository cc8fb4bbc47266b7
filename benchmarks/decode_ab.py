"""Batch-1 decode speed of one engine, in process: the quick A/B behind docs/results.md §4.

    python benchmarks/decode_ab.py vllm                            # vanilla
    python benchmarks/decode_ab.py ffnskip '{"ffnskip": false}' '{"ffnskip": true}'
    ... --profile                                                  # + torch.profiler tables
    ... --inductor '{"cpp_wrapper": true}'                         # + inductor options

Several XARGS run on the same engine, interleaved (the order rotates every round), so the
host's drift hits all of them alike; the last line gives each one's median speed relative
to the first. Engine core and worker run in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0),
fp32, compiled mode; five timed rounds of 128 tokens after one warm-up run each.
"""

import json
import os
import statistics
import sys
import time

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

ROUNDS = 5
TOKENS = 128

if __name__ == "__main__":
    import torch
    from vllm import LLM, SamplingParams

    from vllm_ffnskip.embedded import model_dir

    args = [a for a in sys.argv[1:] if a != "--profile"]
    inductor: dict = {}
    if "--inductor" in args:
        at = args.index("--inductor")
        inductor = json.loads(args[at + 1])
        del args[at : at + 2]
    impl = args[0]
    variants = [json.loads(a) for a in args[1:]] or [None]
    llm = LLM(str(model_dir()), model_impl=impl, dtype="float32", max_num_seqs=8, seed=0,
              compilation_config={"inductor_compile_config": inductor})
    prompt = "Write a short story about a lighthouse keeper."

    def params(xargs, tokens=TOKENS):
        return SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True, extra_args=xargs)

    for xargs in variants:
        llm.generate([prompt], params(xargs), use_tqdm=False)
    rates: list[list[float]] = [[] for _ in variants]
    for r in range(ROUNDS):
        for k in [(r + i) % len(variants) for i in range(len(variants))]:
            start = time.perf_counter()
            llm.generate([prompt], params(variants[k]), use_tqdm=False)
            rates[k].append(TOKENS / (time.perf_counter() - start))
            print(f"{impl} {variants[k]} round {r}: {rates[k][-1]:.1f} tok/s")
    for xargs, rate in zip(variants, rates):
        ratios = [a / b for a, b in zip(rate, rates[0])]
        print(f"{impl} {xargs}: median {statistics.median(rate):.1f} tok/s, "
              f"{statistics.median(ratios):.3f}x of {variants[0]} (median of round ratios)")
    if "--profile" in sys.argv:
        for xargs in variants:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                llm.generate([prompt], params(xargs, 32), use_tqdm=False)
            print(xargs)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
