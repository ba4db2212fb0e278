#!/usr/bin/env bash
# Compile-only check of the WHOLE extension with its CUDA kernels (csrc/cuda/), against a
# CUDA build of torch, on a machine that may have no GPU. Nothing is run on a device.
#
#   bash .ci/cuda_build.sh
#
# - Needs nvcc (CUDA 13.x): found on PATH, in $CUDA_HOME/bin or /usr/local/cuda/bin.
#   Without it the check is skipped (exit 0) with a message.
# - A separate venv with the CUDA build of torch ($CK_CUDA_TORCH_SPEC, ~5 GB) is created
#   once, outside the repo, and reused: ${CK_CUDA_VENV:-$HOME/.cache/contrastive_kernels/venv-cuda}.
# - Builds out of tree (a temporary build dir), so the CPU build in the work tree is untouched:
#   first setup.py (CK_BUILD_CUDA=1), then CMakeLists.txt (-DCK_BUILD_CUDA=ON).
# - Quiet on success (one line), the full log on failure (exit non-zero).
# Knobs: CK_CUDA_ARCHS (default "80;90"), CK_CUDA_TORCH_SPEC (default torch==2.14.1),
#        CK_CUDA_KEEP=1 keeps the build dir and prints where it is.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

# --- nvcc / CUDA_HOME -------------------------------------------------------------
NVCC=""
for cand in "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" "$(command -v nvcc 2>/dev/null || true)" /usr/local/cuda/bin/nvcc; do
    if [ -n "$cand" ] && [ -x "$cand" ]; then NVCC=$cand; break; fi
done
if [ -z "$NVCC" ]; then
    echo "cuda_build: SKIPPED: nvcc not found (set CUDA_HOME or put nvcc on PATH to check the CUDA build)"
    exit 0
fi
NVCC_REAL=$(readlink -f "$NVCC")
if [ -z "${CUDA_HOME:-}" ]; then
    # the toolkit root: the folder above bin/ that also has include/cuda_runtime.h
    for root in "$(dirname "$(dirname "$NVCC")")" "$(dirname "$(dirname "$NVCC_REAL")")" /usr/local/cuda; do
        if [ -f "$root/include/cuda_runtime.h" ]; then CUDA_HOME=$root; break; fi
    done
fi
if [ -z "${CUDA_HOME:-}" ]; then
    echo "cuda_build: FAILED: nvcc at $NVCC but no toolkit root with include/cuda_runtime.h; set CUDA_HOME" >&2
    exit 1
fi
export CUDA_HOME
export PATH="$CUDA_HOME/bin:$PATH"

# --- the cached venv with a CUDA build of torch -----------------------------------
VENV=${CK_CUDA_VENV:-$HOME/.cache/contrastive_kernels/venv-cuda}
SPEC=${CK_CUDA_TORCH_SPEC:-torch==2.14.1}
PY="$VENV/bin/python"
LOG=$(mktemp -t ck_cuda_build.XXXXXX.log)
fail() {
    echo "cuda_build: FAILED: $1 (log below, also in $LOG)" >&2
    cat "$LOG" >&2
    exit 1
}
if ! { [ -x "$PY" ] && "$PY" -c "import torch, sys; sys.exit(torch.version.cuda is None)" 2>/dev/null; }; then
    BASE_PY=${PYTHON:-python3}
    mkdir -p "$(dirname "$VENV")"
    { "$BASE_PY" -m venv "$VENV" \
        && "$PY" -m pip install -q --upgrade pip setuptools wheel ninja \
        && "$PY" -m pip install -q "$SPEC" numpy; } >"$LOG" 2>&1 \
        || fail "could not create $VENV with $SPEC"
    "$PY" -c "import torch, sys; sys.exit(torch.version.cuda is None)" >>"$LOG" 2>&1 \
        || fail "$SPEC in $VENV is not a CUDA build of torch"
fi
"$PY" -c "import ninja" 2>/dev/null || "$PY" -m pip install -q ninja >"$LOG" 2>&1 || fail "pip install ninja"

# --- headers that torch's CUDA headers include (cublas_v2.h, cusparse.h, ...) --------
# The CUDA wheels ship them in site-packages/nvidia/*/include (cu13: nvidia/cu13/include).
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
INC=""
for d in "$SITE"/nvidia/*/include; do
    [ -d "$d" ] && INC="${INC:+$INC:}$d"
done
export CPATH="${INC}${CPATH:+:$CPATH}"

# --- the build, out of tree ---------------------------------------------------------
TMP=$(mktemp -d -t ck_cuda_build.XXXXXX)
cleanup() { if [ "${CK_CUDA_KEEP:-0}" = 1 ]; then echo "cuda_build: kept $TMP"; else rm -rf "$TMP"; fi; }
trap cleanup EXIT
export CK_BUILD_CUDA=1
export CK_CUDA_ARCHS=${CK_CUDA_ARCHS:-80;90}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(echo "$CK_CUDA_ARCHS" | sed 's/\([0-9]\)\([0-9]\)\([a-z]\?\)\(;\|$\)/\1.\2\3\4/g')}
export MAX_JOBS=${MAX_JOBS:-2}
START=$(date +%s)
"$PY" setup.py -q build_ext --build-temp "$TMP/temp" --build-lib "$TMP/lib" >"$LOG" 2>&1 \
    || fail "build_ext of the CUDA extension"
SO=$(find "$TMP/lib" -name '_C*.so' | head -n 1)
[ -n "$SO" ] || fail "no _C*.so produced"
# The kernels must really be in there: the CUDA launcher and device code.
grep -q -a "lse_forward_rows" "$SO" || { echo "no lse_forward_rows symbol in $SO" >>"$LOG"; fail "CUDA launcher missing from _C"; }
CUOBJ=$(command -v cuobjdump || true)
[ -z "$CUOBJ" ] && [ -x "$CUDA_HOME/bin/cuobjdump" ] && CUOBJ=$CUDA_HOME/bin/cuobjdump
if [ -n "$CUOBJ" ]; then
    "$CUOBJ" -lelf "$SO" >>"$LOG" 2>&1 || fail "cuobjdump found no device code in _C"
fi
SETUP_S=$(( $(date +%s) - START ))

# --- the same sources through CMakeLists.txt (CK_BUILD_CUDA=ON) ---------------------
START=$(date +%s)
NVRTC=$(ls "$SITE"/nvidia/*/lib/libnvrtc.so.* 2>/dev/null | head -n 1 || true)
CMAKE_ARGS=(-S "$ROOT" -B "$TMP/cmake" -DPython3_EXECUTABLE="$PY" -DCK_BUILD_CUDA=ON
            -DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc" -DCMAKE_CUDA_ARCHITECTURES="$CK_CUDA_ARCHS"
            -DCUDA_TOOLKIT_ROOT_DIR="$CUDA_HOME" -DCUDAToolkit_ROOT="$CUDA_HOME")
[ -n "$NVRTC" ] && CMAKE_ARGS+=(-DCUDA_nvrtc_LIBRARY="$NVRTC")
if command -v cmake >/dev/null; then
    { cmake "${CMAKE_ARGS[@]}" && cmake --build "$TMP/cmake" -j "$MAX_JOBS"; } >"$LOG" 2>&1 \
        || fail "cmake build with CK_BUILD_CUDA=ON"
    LIB=$(find "$TMP/cmake" -name 'libcontrastive_kernels_ops*.so' | head -n 1)
    [ -n "$LIB" ] && grep -q -a "lse_forward_rows" "$LIB" || fail "CUDA launcher missing from the CMake library"
    CMAKE_NOTE="cmake $(( $(date +%s) - START ))s"
else
    CMAKE_NOTE="cmake not found, CMake build skipped"
fi
rm -f "$LOG"
echo "cuda_build: OK ($(basename "$SO"), archs $CK_CUDA_ARCHS, torch $("$PY" -c 'import torch; print(torch.__version__)'), setup.py ${SETUP_S}s, $CMAKE_NOTE)"
