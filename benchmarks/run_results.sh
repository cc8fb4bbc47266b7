#!/usr/bin/env bash
# Reproduces docs/results.md for the embedded model (SmolLM2-135M-Instruct) on CPU.
# One engine at a time; JSON lands in $OUT (default results/), plots in docs/.
set -euo pipefail
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}"
OUT="${OUT:-results}"
mkdir -p "$OUT" docs

vllm-ffnskip model
# Saturation profile + per-layer sensitivity probe on the calibration split.
vllm-ffnskip profile --split calib --sensitivity --out "$OUT/profile.json" --plot docs/profile.png

for method in global quantile damage; do
  for target in 0.15 0.2 0.25 0.3; do
    vllm-ffnskip calibrate --profile "$OUT/profile.json" --method "$method" --target "$target" \
      --out "$OUT/policy_${method}_${target}.json"
  done
done

# Calibration split: the shipped policy is chosen here, never on the test split.
vllm-ffnskip eval --split calib --sweep 0.95,0.96,0.97,0.975,0.98,0.985 \
  $(for m in global quantile damage; do for t in 0.15 0.2 0.25 0.3; do echo --policy "$OUT/policy_${m}_${t}.json"; done; done) \
  --out "$OUT/eval_calib.json" --plot docs/eval_calib.png

# The shipped default: the most skipping candidate within 2 points of dense on calib, confirmed
# on the held-out test split (docs/results.md §3). The earlier aggressive default
# (damage, target 0.25) stays shipped as smollm2-135m-instruct-aggressive.
vllm-ffnskip calibrate --max-loss 2 --methods global --targets 0.02,0.03,0.04,0.05,0.06,0.08,0.1,0.125 \
  --out vllm_ffnskip/policies/smollm2-135m-instruct.json --report "$OUT/budget_report.json"

# Held-out test split: both shipped policies vs dense, the global sweep and neighbours, plus lm-eval.
vllm-ffnskip eval --split test --sweep 0.97,0.975,0.98,0.985 \
  --policy "$OUT/policy_global_0.25.json" --policy smollm2-135m-instruct \
  --policy smollm2-135m-instruct-aggressive \
  --policy "$OUT/policy_damage_0.15.json" --policy "$OUT/policy_damage_0.3.json" \
  --lm-eval --lm-eval-policy vllm_ffnskip/policies/smollm2-135m-instruct-aggressive.json \
  --out "$OUT/eval_test.json" --plot docs/eval_test.png

# Rules other than the greedy cosine rule (confidence gate, the authors' variant).
PYTHONPATH=. python benchmarks/rule_variants.py --split test --out docs/rule_variants.png

# Speed, served (the users' measure): compiled mode, one server, nothing else running on the machine.
for dtype in float32 bfloat16; do
  vllm-ffnskip bench --dtype "$dtype" --policy smollm2-135m-instruct-aggressive --output-len 64 \
    --prompts-per-stream 2 --out "docs/served_$([ "$dtype" = float32 ] && echo fp32 || echo bf16).json"
done
python benchmarks/plot_served_share.py docs/served_fp32.json docs/served_bf16.json \
  docs/served_fp32_before_fallback.json --out docs/served_share.png
# Where the time goes: one offline engine (in-process and with vLLM's processes), and the
# dense-path overhead against vanilla.
vllm-ffnskip bench --mode engine --batch-sizes 1,8,32 --output-tokens 128 --repeats 3 --overhead-repeats 3 \
  --out "$OUT/bench.json"
