"""The skip graph against vLLM's dense graph on the same pass, in one engine: the rule's
in-graph cost without the host's drift (docs/results.md §4 "Batch 1 after the score write left
the graph").

    python benchmarks/graph_ab.py '{"ffnskip": true, "ffnskip_threshold": 1.0}' '{"ffnskip": true}'
    ... --policy smollm2-135m-instruct-aggressive     # a shipped policy as server default
    ... --dtype bfloat16                              # default float32
    ... --batch 32 --server '{"wide_skip_rows": 1}'   # 32 requests at once; wide passes
                                                      # in the skip graph (gather form)

For every decode pass of ``--batch`` skipping requests (default 1), after the engine's own
forward, the
same inputs run through both compiled graphs ``REPEATS`` times, alternating, each timed
alone (the budgets reset before each, as ``begin_pass`` does). The host's slow and fast
phases last seconds, a pair of graph calls milliseconds, so the per-pass ratio cancels them.
Prints, per XARGS, the median over passes of skip-graph / dense-graph time. The re-runs
rewrite the pass's KV entries with the same values and add to the requests' skip counts and
evaluated blocks alike, so ρ (their ratio) is still the requests'; with φ it gives the ideal
and the pass-level share of the ideal gain, (dense/skip − 1)/(ideal − 1). Engine in this
process, compiled, 128 tokens.
"""

import argparse
import json
import os
import statistics
import time

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

REPEATS = 3
TOKENS = 128

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    from vllm_ffnskip.model import FFNSkipLlamaForCausalLM
    from vllm_ffnskip.policy import policy_path
    from vllm_ffnskip.stats import collect_request_stats
    from vllm_ffnskip.tools.engine import resolve_model
    from vllm_ffnskip.tools.bench import ffn_share, share_cell, share_of_ideal_gain

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("xargs", nargs="+", help="per-request vllm_xargs, as JSON")
    parser.add_argument("--policy", help="a shipped policy as the server default")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=1, help="requests decoding at once")
    parser.add_argument("--server", default="{}", help="more ffnskip server keys, as JSON")
    args = parser.parse_args()
    server = json.loads(args.server)
    if args.policy:
        server.update(enabled=True, policy_file=str(policy_path(args.policy)))

    ratios: list[float] = []
    graph_ms: dict[str, list[float]] = {"skip": [], "dense": []}
    forward = FFNSkipLlamaForCausalLM.forward

    def timed_forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        out = forward(self, input_ids, positions, intermediate_tensors, inputs_embeds)
        if positions.shape[0] != args.batch or not (self.skip_graph_ready and self.skip_state.routed):
            return out
        inputs = (input_ids, positions, intermediate_tensors, inputs_embeds)
        times = {"skip": 0.0, "dense": 0.0}
        for r in range(REPEATS):
            for name in ("skip", "dense") if r % 2 else ("dense", "skip"):
                self.skip_state.begin_pass(args.batch, None)
                start = time.perf_counter()
                (self.model if name == "skip" else self.dense_model)(*inputs)
                times[name] += time.perf_counter() - start
        ratios.append(times["skip"] / times["dense"])
        for name, total in times.items():
            graph_ms[name].append(total / REPEATS * 1e3)
        return out

    FFNSkipLlamaForCausalLM.forward = timed_forward
    llm = LLM(resolve_model(None), model_impl="ffnskip", dtype=args.dtype, seed=0,
              max_num_seqs=max(8, args.batch), additional_config={"ffnskip": server} if server else {})
    phi = ffn_share(llm.llm_engine.model_config.hf_config)
    prompts = [f"Write a short story about a lighthouse keeper, part {i + 1}." for i in range(args.batch)]
    print(f"batch {args.batch}, {args.dtype}, server {json.dumps(server)}")
    print("| request | passes | ρ | ideal | skip graph ms | dense graph ms | skip / dense "
          "(median of passes) | share of the ideal gain |")
    print("|---|---|---|---|---|---|---|---|")
    for xargs in [json.loads(a) for a in args.xargs]:
        params = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True, extra_args=xargs)
        llm.generate(prompts, params, use_tqdm=False)  # warm-up
        ratios.clear()
        for samples in graph_ms.values():
            samples.clear()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        stats = collect_request_stats(llm)["requests"]
        counts = [stats[o.request_id] for o in outputs]
        rho = sum(c["skipped"] for c in counts) / max(sum(c["evaluated"] for c in counts), 1)
        ideal = 1 / (1 - rho * phi)
        skip, dense = (statistics.median(graph_ms[k]) for k in ("skip", "dense"))
        ratio = statistics.median(ratios)
        q = statistics.quantiles(ratios, n=4)
        print(f"| `{json.dumps(xargs)}` | {len(ratios)} | {rho:.3f} | {ideal:.3f} | {skip:.2f} | "
              f"{dense:.2f} | {ratio:.3f} (quartiles {q[0]:.3f}–{q[2]:.3f}) | "
              f"{share_cell(share_of_ideal_gain(1 / ratio, ideal))} |", flush=True)
