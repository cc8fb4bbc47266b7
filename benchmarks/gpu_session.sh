#!/usr/bin/env bash
# The GPU checks of a session with a lent GPU machine (torch + Triton, no vLLM), in priority
# order, each under its own time limit so one that hangs leaves time for the rest. The log
# and the data files go to $OUT (the device tool's return folder) or ./gpu_out.
# The tuner runs first and writes the tuned-plan files into vllm_ffnskip/kernels/configs/ (copied
# to $OUT: commit the ones that come back), so the benchmarks after it run the tuned kernels.
#   device run (timeout_s 590): bash benchmarks/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_out}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
log="$out/session.log"
step() {  # step SECONDS COMMAND...
    local limit=$1 t0=$SECONDS
    shift
    echo "=== $* (limit ${limit}s)" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    echo "=== rc ${PIPESTATUS[0]} in $((SECONDS - t0))s" | tee -a "$log"
}
{ nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; } 2>&1 | tee -a "$log"
step 45 python3 benchmarks/gpu_driver_check.py
step 270 python3 benchmarks/kernel_tune.py --shapes 4096x11008,4096x14336 --dtypes bf16 \
    --compile-budget 120 --write --dump "$out/tune_all.json"
cp vllm_ffnskip/kernels/configs/*.json "$out/" 2>/dev/null
step 50 python3 benchmarks/kernel_bench.py --models llama2-7b --dtypes bf16 --fracs 0,0.3 \
    --out "$out/kernel_bench_h200.md"
step 45 python3 benchmarks/gpu_pass_bench.py
step 60 python3 -m pytest -p no:cacheprovider -q tests/kernels -k "cuda or compile"
step 80 python3 benchmarks/gpu_pass_bench.py --compile --tokens 1,32
