#!/usr/bin/env bash
# GPU checks and benchmarks (`make bench-gpu`), for a machine with an NVIDIA GPU, a CUDA
# build of torch and nvcc: builds the extension with its CUDA kernels, runs the tests
# that use the GPU, then every benchmark that takes --device, printing their tables.
# Each step has a time limit so the whole run stays under 8 minutes. Without CUDA it
# exits 2 having run nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)'; then
    echo "bench-gpu: needs an NVIDIA GPU and a CUDA build of torch ($PYTHON sees none); nothing was run." >&2
    exit 2
fi

step() {  # step SECONDS TITLE COMMAND...
    local limit=$1 title=$2
    shift 2
    echo
    echo "== $title"
    local started=$SECONDS
    timeout "$limit" "$@"
    echo "   ($((SECONDS - started)) s)"
}

export MAX_JOBS=${MAX_JOBS:-$(nproc)}
step 180 "build eigenfast._C with its CUDA kernels" "$PYTHON" setup.py --quiet build_ext --inplace
"$PYTHON" -c 'import eigenfast.ops as o, eigenfast._C as c, sys
sys.exit(0 if o.extension_available() and c.with_cuda else "bench-gpu: eigenfast._C was built without CUDA (is nvcc on PATH or CUDA_HOME set?)")'

step 120 "GPU tests" "$PYTHON" -m pytest -q -x -m "not slow" tests/ops/test_token_bias_op.py tests/eigenprune/test_attribution.py
step 45 "token-bias op vs nn.Linear, float32" "$PYTHON" benches/bench_token_bias.py --device cuda --min-run-time 0.5
step 45 "token-bias op vs nn.Linear, bfloat16" "$PYTHON" benches/bench_token_bias.py --device cuda --dtype bfloat16 --min-run-time 0.5
step 60 "attribution kernels" "$PYTHON" benches/bench_attribution.py --device cuda
step 30 "extracted-model latency" "$PYTHON" benches/bench_extract_latency.py --device cuda
