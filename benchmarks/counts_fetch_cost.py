"""What the per-request skip counts cost a server: vLLM's own client, many short requests.

Serves the embedded model with ``--model-impl ffnskip``, runs ``vllm bench serve`` with
short skipping requests (random dataset, 16 prompt / 8 output tokens by default, 256
requests at concurrency 32), then reads from the server's ``/metrics`` how long finished
requests waited for their counts (``vllm_ffnskip_counts_fetch_seconds``, see
patches/request_stats.py). In a closed loop of fixed concurrency, requests/s is
concurrency / mean latency, so that wait's share of the mean end-to-end latency is the
share of requests/s it costs.

    python benchmarks/counts_fetch_cost.py [--num-prompts 256 --concurrency 32]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

from vllm_ffnskip import embedded
from vllm_ffnskip.tools.serving import metric_samples, vllm_server


def fetch_wait(url: str) -> tuple[float, float]:
    """(sum of seconds, count) of the counts-fetch histogram on /metrics."""
    name = "vllm_ffnskip_counts_fetch_seconds"
    values = metric_samples(url, name)
    return values.get(f"{name}_sum", 0.0), values.get(f"{name}_count", 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=8)
    parser.add_argument("--eager", action="store_true", help="serve with --enforce-eager")
    args = parser.parse_args()
    model = str(embedded.build())
    serve = ["--model-impl", "ffnskip", "--dtype", "float32", "--served-model-name", "smollm2"]
    if args.eager:
        serve.append("--enforce-eager")
    with vllm_server(model, *serve) as url, tempfile.TemporaryDirectory() as out:
        subprocess.run(
            ["vllm", "bench", "serve", "--backend", "vllm", "--base-url", url,
             "--model", "smollm2", "--tokenizer", model, "--dataset-name", "random",
             "--random-input-len", str(args.input_len),
             "--random-output-len", str(args.output_len),
             "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.concurrency),
             "--ignore-eos", "--percentile-metrics", "ttft,tpot,itl,e2el", "--extra-body", json.dumps({"vllm_xargs": {"ffnskip": 1}}),
             "--save-result", "--result-dir", out, "--result-filename", "bench.json"],
            check=True,
        )  # fmt: skip
        result = json.loads((Path(out) / "bench.json").read_text())
        wait_s, fetched = fetch_wait(url)
    e2e_s = result["mean_e2el_ms"] / 1000
    mean_wait = wait_s / fetched if fetched else float("nan")
    print("| requests | concurrency | req/s | mean E2E (s) | counts fetched | mean wait (ms) "
          "| share of E2E = share of req/s |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {result['completed']} | {args.concurrency} | {result['request_throughput']:.2f} "
          f"| {e2e_s:.3f} | {fetched:.0f} | {1000 * mean_wait:.2f} "
          f"| {100 * mean_wait / e2e_s:.2f}% |")


if __name__ == "__main__":
    main()
