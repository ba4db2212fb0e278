#!/usr/bin/env bash
# GPU check (one H200, no network, < 8 min): build the extension with CUDA, run the whole
# test suite on CUDA tensors, then the bf16 benchmark table (bench/bench_gpu.py).
#   bench/gpu_check.sh [--quick]      (--quick: benchmark N in {4096, 8192} only)
# Uses the python on PATH (or $PYTHON); torch, triton, nvcc, ninja and pytest must be
# installed there. Results go to $OUT (or bench/out): build.log, tests.log (and the
# per-process tests.<i>.log), bench.txt, bench_gpu.json. Exit status: non-zero if the build, the tests or the benchmark failed.
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

# The suite runs as SHARDS pytest processes side by side (CK_TEST_SHARD=i/n, see
# tests/conftest.py): most of its time is Triton compiling kernel variants, one at a
# time per process. Logs: tests.<i>.log; the summary lines and failures are printed.
SHARDS=${CK_TEST_SHARDS:-8}
stamp "tests on cuda ($SHARDS processes)"
pids=()
for i in $(seq 0 $((SHARDS - 1))); do
    CK_TEST_SHARD=$i/$SHARDS CK_TEST_DEVICE=cuda CK_AOT_JOBS=4 OMP_NUM_THREADS=2 timeout 240 \
        "$PY" -m pytest -q -p no:cacheprovider tests --durations=3 >"$OUTDIR/tests.$i.log" 2>&1 &
    pids+=($!)
done
for i in "${!pids[@]}"; do
    if ! wait "${pids[$i]}"; then status=1; echo "shard $i/$SHARDS FAILED (rc != 0)"; fi
    echo "shard $i/$SHARDS: $(tail -n 1 "$OUTDIR/tests.$i.log")"
done
cat "$OUTDIR"/tests.*.log > "$OUTDIR/tests.log"
grep -E "^(FAILED|ERROR) " "$OUTDIR/tests.log" | head -40 || true

stamp "benchmark"
if ! timeout 240 "$PY" bench/bench_gpu.py $QUICK --json "$OUTDIR/bench_gpu.json" 2>&1 \
        | tee "$OUTDIR/bench.txt"; then
    status=1
fi
stamp "done, status $status"
exit $status
