#!/usr/bin/env bash
# Runs the whole test suite on the CPU (real vLLM engines on the embedded model, the Helm
# chart through the real helm binary, Triton kernels through Triton's interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}"
vllm-ffnskip model >/dev/null   # build the embedded model once, outside any test's time
exec python -m pytest -q -p no:cacheprovider --timeout=1500 --durations=15 "$@" tests
