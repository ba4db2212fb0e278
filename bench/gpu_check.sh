#!/usr/bin/env bash
# GPU check (one H200, no network, < 8 min): build the extension with CUDA, run the whole
# test suite on CUDA tensors, then the bf16 benchmark table (bench/bench_gpu.py).
#   bench/gpu_check.sh [--quick]      (--quick: benchmark N in {4096, 8192} only)
# Uses the python on PATH (or $PYTHON); torch, triton, nvcc, ninja and pytest must be
# installed there. Results go to $OUT (or bench/out): build.log, tests.log, bench.txt,
# bench_gpu.json. Exit status: non-zero if the build, the tests or the benchmark failed.
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
OUTDIR=${OUT:-bench/out}
mkdir -p "$OUTDIR"
QUICK=""
[ "${1:-}" = "--quick" ] && QUICK="--quick"
unset TRITON_INTERPRET
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
status=0
t0=$(date +%s)
stamp() { echo "== $1 ($(( $(date +%s) - t0 ))s)"; }

stamp "build ($PY)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
if ! CK_BUILD_CUDA=1 CK_CUDA_ARCHS=${CK_CUDA_ARCHS:-90} MAX_JOBS=${MAX_JOBS:-16} timeout 200 \
        "$PY" -m pip install -e . --no-build-isolation --no-deps -q >"$OUTDIR/build.log" 2>&1; then
    echo "BUILD FAILED (tail of $OUTDIR/build.log):"; tail -30 "$OUTDIR/build.log"; status=1
fi
"$PY" -c "import contrastive_kernels as ck; print('backends on cuda:', ck.available_backends('cuda'))"

stamp "tests on cuda"
if ! CK_TEST_DEVICE=cuda CK_AOT_JOBS=8 timeout 200 "$PY" -m pytest -q --maxfail=10 -p no:cacheprovider tests \
        --durations=10 2>&1 | tee "$OUTDIR/tests.log" | tail -40; then
    status=1
fi

stamp "benchmark"
if ! timeout 240 "$PY" bench/bench_gpu.py $QUICK --json "$OUTDIR/bench_gpu.json" 2>&1 \
        | tee "$OUTDIR/bench.txt"; then
    status=1
fi
stamp "done, status $status"
exit $status
