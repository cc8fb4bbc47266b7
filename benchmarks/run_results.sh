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

# The shipped default: damage method, target 0.25 (see docs/results.md).
vllm-ffnskip calibrate --profile "$OUT/profile.json" --method damage --target 0.25 \
  --out vllm_ffnskip/policies/smollm2-135m-instruct.json

# Held-out test split: shipped default vs dense, the global sweep and neighbours, plus lm-eval.
vllm-ffnskip eval --split test --sweep 0.97,0.975,0.98,0.985 \
  --policy "$OUT/policy_global_0.25.json" --policy vllm_ffnskip/policies/smollm2-135m-instruct.json \
  --policy "$OUT/policy_damage_0.15.json" --policy "$OUT/policy_damage_0.3.json" \
  --lm-eval --lm-eval-policy vllm_ffnskip/policies/smollm2-135m-instruct.json \
  --out "$OUT/eval_test.json" --plot docs/eval_test.png

# Speed: compiled mode, nothing else running on the machine.
vllm-ffnskip bench --batch-sizes 1,8,32 --output-tokens 128 --repeats 3 --overhead-repeats 3 \
  --out "$OUT/bench.json"
