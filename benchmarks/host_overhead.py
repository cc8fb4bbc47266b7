"""Host-side cost per forward pass of the skip path, inside a running engine (docs/results.md §4).

    python benchmarks/host_overhead.py [XARGS ...] [--batch N] [--rounds R]

    default XARGS: {"ffnskip": true}; e.g. '{"ffnskip": true}' '{"ffnskip": false}' --batch 32

Times, per call, the plugin's work around the compiled graph: the tracker's batch update
(``update_state``, before every pass), routing the pass's tokens to their slots (host), the
device ops before the graph (``begin_pass``), the count fold after it (``end_pass``) and the
whole ``forward``; and each batch's ``generate`` (wall time). One engine in this process,
fp32, compiled, ``N`` identical requests of 128 tokens (after one warm-up batch). With several
XARGS each round runs one batch of each, alternating which goes first, so their times are an
A/B in one engine: at ``N`` above the server's ``max_skip_rows`` both kinds run the same
dense graph, and what differs is host work. Numbers from a loop outside the engine are
3-10x lower: right after the graph has streamed the model's weights, every host call runs
with cold caches.
"""

import argparse
import collections
import json
import os
import statistics
import time

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

TOKENS = 128

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    from vllm_ffnskip import model, skip_state, tracker
    from vllm_ffnskip.embedded import model_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("xargs", nargs="*", default=['{"ffnskip": true}'])
    parser.add_argument("--batch", type=int, default=1, help="concurrent requests")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()

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

    names = [
        (tracker.SkipPolicyTracker, "update_state"),
        (model.FFNSkipLlamaForCausalLM, "forward"),
        (model.FFNSkipLlamaForCausalLM, "route_v1"),
        (skip_state.SkipState, "runs_skip_graph"),
        (skip_state.SkipState, "begin_pass"),
        (skip_state.SkipState, "end_pass"),
    ]
    for cls, name in names:
        timed(cls, name)
    llm = LLM(str(model_dir()), model_impl="ffnskip", dtype="float32",
              max_num_seqs=max(8, args.batch), seed=0)
    prompts = ["Write a short story about a lighthouse keeper."] * args.batch
    params = {
        x: SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True,
                          extra_args=json.loads(x))
        for x in args.xargs
    }
    llm.generate(prompts, params[args.xargs[0]], use_tqdm=False)
    per_call: dict[str, dict[str, list[float]]] = {x: collections.defaultdict(list) for x in params}
    for r in range(args.rounds):
        order = list(params) if r % 2 == 0 else list(reversed(params))
        for x in order:
            total.clear()
            calls.clear()
            start = time.perf_counter()
            llm.generate(prompts, params[x], use_tqdm=False)
            per_call[x]["generate"].append((time.perf_counter() - start) * 1e6)
            for name in total:
                per_call[x][name].append(total[name] / calls[name] * 1e6)
    print(f"batch {args.batch}, {args.rounds} round(s) of {TOKENS} tokens; median over rounds")
    print("| call | " + " | ".join(f"us per call, {x}" for x in params) + " |")
    print("|---|" + "---|" * len(params))
    for _, name in names:
        cells = [f"{statistics.median(per_call[x][name]):.1f}" if per_call[x][name] else "–"
                 for x in params]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if len(params) > 1:
        first, *others = params
        for x in others:
            for name in ("forward", "generate"):
                ratios = [a / b for a, b in zip(per_call[x][name], per_call[first][name])]
                print(f"{name} {x} / {first}: median {statistics.median(ratios):.4f}, "
                      f"rounds {', '.join(f'{v:.3f}' for v in ratios)}")
