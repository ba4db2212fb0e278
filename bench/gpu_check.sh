#!/usr/bin/env bash
# GPU check (one H200, no network): build the extension with CUDA, run the whole test
# suite on CUDA tensors, then the bf16 benchmark table (bench/bench_gpu.py).
#   bench/gpu_check.sh [--quick]      (--quick: benchmark N in {4096, 8192} only)
# Optional wheels in .whl/ (inf-cl, siglip-kernel: the peers, not installed there;
# bench/peer_wheels.sh fetches them, and the device call carries .whl) are
# installed with --no-index into a temporary folder on PYTHONPATH first.
# A rerun can skip phases: CK_GPU_SKIP_BUILD=1 uses a contrastive_kernels/_C*.so already
# in place (say, from the first run), CK_GPU_TESTS overrides the pytest selection
# (default: tests; "none" skips them), CK_GPU_BENCH_ARGS is added to bench_gpu.py's
# arguments (e.g. "--sizes 32768,65536", or "--loss siglip" for the sigmoid loss's table;
# "none" skips the benchmark), and CK_GPU_BENCH_ARGS2, if set, runs a second table after it
# (the two share the benchmark's time; results in bench2.txt and bench_gpu2.json).
# Uses the python on PATH (or $PYTHON); torch, triton, nvcc, ninja and pytest must be
# installed there. Everything runs within CK_GPU_CHECK_SECONDS (default 560): each phase
# gets its cap or what is left, less what the later phases need. Results go to $OUT (or
# bench/out): build.log, tests.log (and the per-process tests.<i>.log), bench.txt,
# bench_gpu.json (rewritten after every row). Exit status: non-zero if the build, the
# tests or the benchmark (including its correctness check) failed.
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
OUTDIR=${OUT:-bench/out}
mkdir -p "$OUTDIR"
QUICK=""
[ "${1:-}" = "--quick" ] && QUICK="--quick"
unset TRITON_INTERPRET
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
# No network: pip must not look for indexes; a failed build must not start a
# just-in-time one in every test process; torch.compile tests compile in-process.
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 CK_CUDA_JIT=0
export TORCHINDUCTOR_COMPILE_THREADS=1
TOTAL=${CK_GPU_CHECK_SECONDS:-560}
status=0
t0=$(date +%s)
stamp() { echo "== $1 ($(( $(date +%s) - t0 ))s)"; }
# budget CAP RESERVE: CAP seconds, or what is left of TOTAL less RESERVE (at least 30).
# The later phases' reserves scale with TOTAL (at 560: 330 s after the build, 150 after
# the tests).
budget() {
    local left=$(( TOTAL - ($(date +%s) - t0) - $2 ))
    [ "$left" -lt "$1" ] && echo $(( left > 30 ? left : 30 )) || echo "$1"
}

if ls .whl/*.whl >/dev/null 2>&1; then
    SITE_DIR=$(mktemp -d -t ck_site.XXXXXX)
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --target "$SITE_DIR" .whl/*.whl; then
        export PYTHONPATH="$SITE_DIR${PYTHONPATH:+:$PYTHONPATH}"
        echo "peer wheels: $(cd .whl && ls *.whl | tr '\n' ' ')"
    else
        echo "peer wheels in .whl/ did not install"
    fi
fi

stamp "build ($PY)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
nvcc --version 2>/dev/null | tail -n 2 || echo "nvcc not on PATH"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
# The extension is built in place (setup.py build_ext --inplace) and the package imported
# from here: `pip install -e .` runs setup.py develop, which on new setuptools asks pip for
# build dependencies from an index (none there). setup.py maps the package
# contrastive_kernels.triton_kernels to triton_kernels/; a link stands in for that.
[ -e contrastive_kernels/triton_kernels ] || ln -s ../triton_kernels contrastive_kernels/triton_kernels
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "${CK_GPU_SKIP_BUILD:-0}" = 1 ]; then
    echo "build skipped (CK_GPU_SKIP_BUILD=1): $(ls contrastive_kernels/_C*.so 2>/dev/null || echo 'no _C*.so')"
else
    b0=$(date +%s)
    # setup.py runs in a folder of links to the sources, without pyproject.toml: a
    # setuptools older than 77 rejects its PEP 639 license field, and build_ext needs
    # nothing from it. --inplace writes _C*.so through the link, into contrastive_kernels/.
    STAGE=$(mktemp -d -t ck_stage.XXXXXX)
    for f in setup.py csrc contrastive_kernels triton_kernels README.md LICENSE; do
        ln -s "$PWD/$f" "$STAGE/$f"
    done
    if (cd "$STAGE" && CK_BUILD_CUDA=1 CK_CUDA_ARCHS=${CK_CUDA_ARCHS:-90} MAX_JOBS=${MAX_JOBS:-16} \
            timeout "$(budget 200 $(( TOTAL * 330 / 560 )))" \
            "$PY" setup.py build_ext --inplace) >"$OUTDIR/build.log" 2>&1; then
        echo "CUDA build: $(( $(date +%s) - b0 ))s, $(ls contrastive_kernels/_C*.so)"
    else
        # The Triton and torch backends are still tested (the package imports without _C).
        echo "CUDA BUILD FAILED (tail of $OUTDIR/build.log):"; tail -30 "$OUTDIR/build.log"; status=1
    fi
    rm -rf "$STAGE"
fi
"$PY" -c "import contrastive_kernels as ck; print('backends on cuda:', ck.available_backends('cuda'))"

# The suite runs as SHARDS pytest processes side by side (CK_TEST_SHARD=i/n deals the
# tests in turn, see tests/conftest.py): most of its time is Triton compiling kernel
# variants, one at a time per process. SIGINT at the time limit makes pytest print its
# summary and failures so far. Logs: tests.<i>.log; the summary lines and failures are
# printed.
SHARDS=${CK_TEST_SHARDS:-12}
TESTS=${CK_GPU_TESTS:-tests}
TEST_S=$(budget 240 $(( TOTAL * 150 / 560 )))
if [ "$TESTS" = none ]; then
    echo "tests skipped (CK_GPU_TESTS=none)"
else
    stamp "tests on cuda ($SHARDS processes, ${TEST_S}s)"
    pids=()
    for i in $(seq 0 $((SHARDS - 1))); do
        CK_TEST_SHARD=$i/$SHARDS CK_TEST_DEVICE=cuda OMP_NUM_THREADS=1 \
            timeout -s INT -k 20 "$TEST_S" \
            "$PY" -m pytest -q -p no:cacheprovider $TESTS --durations=3 >"$OUTDIR/tests.$i.log" 2>&1 &
        pids+=($!)
    done
    for i in "${!pids[@]}"; do
        if ! wait "${pids[$i]}"; then status=1; echo "shard $i/$SHARDS FAILED (rc != 0)"; fi
        echo "shard $i/$SHARDS: $(tail -n 1 "$OUTDIR/tests.$i.log")"
    done
    cat "$OUTDIR"/tests.*.log > "$OUTDIR/tests.log"
    grep -E "^(FAILED|ERROR) " "$OUTDIR/tests.log" | head -40 || true
fi

BENCH_ARGS=${CK_GPU_BENCH_ARGS:-}
BENCH_ARGS2=${CK_GPU_BENCH_ARGS2:-}
BENCH_S=$(budget 300 5)
[ -n "$BENCH_ARGS2" ] && BENCH_S=$(( BENCH_S / 2 ))
if [ "$BENCH_ARGS" = none ]; then
    echo "benchmark skipped (CK_GPU_BENCH_ARGS=none)"
else
    stamp "benchmark (${BENCH_S}s)"
    if ! timeout -s INT -k 10 "$BENCH_S" "$PY" -u bench/bench_gpu.py $QUICK $BENCH_ARGS \
            --json "$OUTDIR/bench_gpu.json" 2>&1 | tee "$OUTDIR/bench.txt"; then
        status=1
    fi
fi
if [ -n "$BENCH_ARGS2" ]; then
    BENCH_S=$(budget 300 5)
    stamp "second benchmark (${BENCH_S}s)"
    if ! timeout -s INT -k 10 "$BENCH_S" "$PY" -u bench/bench_gpu.py $QUICK $BENCH_ARGS2 \
            --json "$OUTDIR/bench_gpu2.json" 2>&1 | tee "$OUTDIR/bench2.txt"; then
        status=1
    fi
fi
stamp "done, status $status"
exit $status
