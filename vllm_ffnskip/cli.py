"""``vllm-ffnskip``: build the embedded model, profile, calibrate, evaluate and benchmark.

Each subcommand lives in ``vllm_ffnskip/tools/``; this module only parses arguments and
imports the chosen tool lazily, so ``vllm-ffnskip model`` does not pay for vLLM's import.
"""

from __future__ import annotations

import argparse
import importlib
import json
from collections.abc import Sequence


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-ffnskip", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("model", help="build the embedded model; prints its path last")

    p = sub.add_parser("profile", help="per-layer saturation scores -> JSON + PNG")
    p.add_argument("--model", help="HF folder (default: the embedded model)")
    p.add_argument("--split", default="calib", choices=["calib", "test"])
    p.add_argument("--limit", type=int, help="first N questions only")
    p.add_argument(
        "--with-summaries", action="store_true", help="add the summarization set"
    )
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument(
        "--sensitivity", action="store_true", help="also probe each layer alone"
    )
    p.add_argument(
        "--warmup", type=int, default=2, help="warm-up of the sensitivity probes"
    )
    p.add_argument("--out", default="results/profile.json")
    p.add_argument("--plot", help="PNG path (default: next to --out)")

    p = sub.add_parser(
        "calibrate",
        help="policy file within a quality budget (--max-loss), or for a replayed skip "
        "ratio from a profile (--target)",
    )
    goal = p.add_mutually_exclusive_group(required=True)
    goal.add_argument(
        "--max-loss", type=float, help="points of --budget the policy may lose vs dense"
    )
    goal.add_argument(
        "--target", type=float, help="skip ratio past warm-up, replayed on --profile"
    )
    p.add_argument("--model", help="HF folder (default: the embedded model)")
    p.add_argument(
        "--profile", help="profile JSON (required with --target; --max-loss makes one)"
    )
    p.add_argument("--budget", default="answers", choices=["answers", "agreement"])
    p.add_argument(
        "--margin", type=float, default=1.0,
        help="--max-loss: standard errors of the measured loss kept below the budget",
    )  # fmt: skip
    p.add_argument(
        "--methods", type=lambda t: t.split(","), default=["global", "damage"],
        help="--max-loss: candidate methods",
    )  # fmt: skip
    p.add_argument(
        "--targets", type=_floats, default=[0.02, 0.04, 0.06, 0.08, 0.1, 0.125, 0.15, 0.2],
        help="--max-loss: replayed skip ratios of the candidates",
    )  # fmt: skip
    p.add_argument("--limit", type=int, help="--max-loss: first N questions / passages")
    p.add_argument("--qa-tokens", type=int, default=24)
    p.add_argument("--summary-tokens", type=int, default=64)
    p.add_argument("--report", help="--max-loss: JSON of every candidate's metrics")
    p.add_argument(
        "--method", default="quantile", choices=["global", "quantile", "damage"],
        help="--target: the method",
    )  # fmt: skip
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--span", type=int, default=1)
    p.add_argument(
        "--cold-cutoff", type=float, default=0.9, help="mean score of a cold layer"
    )
    p.add_argument(
        "--min-cold", type=int, default=2, help="cold layers at each end, at least"
    )
    p.add_argument("--out", required=True)

    p = sub.add_parser("eval", help="quality of policies vs dense")
    p.add_argument("--model", help="HF folder (default: the embedded model)")
    p.add_argument(
        "--policy", action="append", default=[], help="policy file (repeatable)"
    )
    p.add_argument(
        "--sweep", type=_floats, default=[], help="global thresholds, e.g. 0.97,0.98"
    )
    p.add_argument("--warmup", type=int, default=2, help="warm-up of --sweep policies")
    p.add_argument(
        "--cold-start", type=int, default=2, help="cold start of --sweep policies"
    )
    p.add_argument(
        "--cold-end", type=int, default=2, help="cold end of --sweep policies"
    )
    p.add_argument("--span", type=int, default=1, help="span of --sweep policies")
    p.add_argument("--split", default="test", choices=["calib", "test"])
    p.add_argument("--limit", type=int, help="first N questions / passages only")
    p.add_argument("--qa-tokens", type=int, default=24)
    p.add_argument("--summary-tokens", type=int, default=64)
    p.add_argument("--out", default="results/eval.json")
    p.add_argument("--plot", help="PNG path (default: next to --out)")
    p.add_argument(
        "--lm-eval", action="store_true", help="also run lm-eval against a server"
    )
    p.add_argument("--lm-eval-policy", help="server default policy file for --lm-eval")

    p = sub.add_parser("bench", help="decode speed, skip vs dense: served (vllm bench serve) "
                       "or in one offline engine")  # fmt: skip
    p.add_argument(
        "--mode", default="served", choices=["served", "engine"],
        help="served: one vllm serve, vLLM's own client (what users see); engine: an "
        "offline LLM (where the time goes)",
    )  # fmt: skip
    p.add_argument("--model", help="HF folder (default: the embedded model)")
    p.add_argument(
        "--policy", help="policy file (default: the model's shipped default)"
    )
    p.add_argument("--dtype", default="float32", help="served: the server's --dtype")
    p.add_argument(
        "--server", type=json.loads, default={},
        help='more ffnskip server keys, as JSON (e.g. \'{"wide_skip_rows": 16}\')',
    )  # fmt: skip
    p.add_argument(
        "--concurrency", type=_ints, default=[1, 2, 4, 8, 16, 32, 64],
        help="served: vllm bench serve --max-concurrency values",
    )  # fmt: skip
    p.add_argument("--rounds", type=int, default=2, help="served: skip/dense pairs per point")
    p.add_argument("--input-len", type=int, default=32, help="served: random prompt tokens")
    p.add_argument("--output-len", type=int, default=96, help="served: output tokens")
    p.add_argument(
        "--prompts-per-stream", type=int, default=3,
        help="served: requests per run = this x concurrency (at least --min-prompts)",
    )  # fmt: skip
    p.add_argument("--min-prompts", type=int, default=4)
    p.add_argument(
        "--overhead-pairs", type=int, default=0,
        help="served: ffnskip/vanilla server pairs for the dense-traffic overhead",
    )  # fmt: skip
    p.add_argument("--overhead-concurrency", type=_ints, default=[1, 32])
    p.add_argument("--batch-sizes", type=_ints, default=[1, 8, 32], help="engine mode")
    p.add_argument("--output-tokens", type=int, default=128, help="engine mode")
    p.add_argument("--repeats", type=int, default=3, help="engine mode")
    p.add_argument(
        "--overhead-repeats", type=int, default=3,
        help="engine mode: engine pairs for the overhead (0: none)",
    )  # fmt: skip
    p.add_argument(
        "--eager", action="store_true", help="enforce_eager (default: compiled)"
    )
    p.add_argument(
        "--in-process",
        action="store_true",
        help="engine mode: engine core and worker in this process "
        "(VLLM_ENABLE_V1_MULTIPROCESSING=0): no inter-process contention where cores are few",
    )
    p.add_argument("--out", default="results/bench.json")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "model":
        from vllm_ffnskip import embedded

        print(embedded.build())
        return
    module = {"eval": "evaluate"}.get(args.command, args.command)
    importlib.import_module(f"vllm_ffnskip.tools.{module}").main(args)


if __name__ == "__main__":
    main()
