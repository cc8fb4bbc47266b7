"""Share of the ideal gain and speed-up against concurrency, from ``vllm-ffnskip bench``
(served) reports, one line per report (e.g. fp32 and bf16).

    python benchmarks/plot_served_share.py docs/served_fp32.json docs/served_bf16.json \
        docs/served_fp32_before_fallback.json docs/served_fp32_wide8.json \
        docs/served_bf16_wide8.json --out docs/served_share.png

A report may carry a ``label`` (default: its dtype).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+")
    parser.add_argument("--out", default="docs/served_share.png")
    args = parser.parse_args()
    fig, (share, speed) = plt.subplots(1, 2, figsize=(10, 4))
    for path in args.reports:
        report = json.loads(Path(path).read_text())
        rows = report["rows"]
        c = [r["concurrency"] for r in rows]
        name = report.get("label", report["dtype"])
        # a point with nothing skipped (ρ 0: the dense fallback) has no ideal gain to share
        share.plot(c, [r["share"] for r in rows], "o-", label=name)
        speed.plot(c, [r["speedup"] for r in rows], "o-", label=f"{name}: measured")
        speed.plot(c, [r["ideal"] for r in rows], ":", color=speed.lines[-1].get_color(),
                   label=f"{name}: ideal 1/(1−ρφ)")  # fmt: skip
    for ax in (share, speed):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests (vllm bench serve --max-concurrency)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    share.axhline(0, color="k", lw=0.8)
    share.set_ylabel("share of the ideal gain (s − 1)/(ideal − 1)")
    speed.axhline(1, color="k", lw=0.8)
    speed.set_ylabel("output tok/s, skip / dense")
    fig.suptitle("Served decode speed, skip vs dense, one server (SmolLM2-135M, 2-core CPU)")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
