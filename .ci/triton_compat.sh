#!/usr/bin/env bash
# The GPU machine's torch and triton (default torch 2.11.0 and triton 3.6.0; make test
# uses the versions pinned in the Makefile and requirements.txt), no GPU needed:
#   1. every kernel variant compiled ahead of time for sm_90 (tests/test_triton_aot.py:
#      triton.compile(..., target=GPUTarget("cuda", 90, 32)), PTX and ptxas checks);
#   2. the interpreter tests (tests/test_triton.py, TRITON_INTERPRET=1);
#   3. the torch.compile tests (fullgraph; the part of the package most sensitive to the
#      torch version), with the C++ extension compiled against that torch.
#
#   bash .ci/triton_compat.sh
#
# The venv (that torch, the triton under test, numpy, pytest, ninja) is created once, outside
# the repo, and reused: ${CK_TRITON_COMPAT_VENV:-$HOME/.cache/contrastive_kernels/venv-triton-$VERSION}
# (torch 2.11.0 is a CUDA build, about 5 GB; it runs on the CPU here).
# numpy < 2.3 there: triton 3.6.0's interpreter calls int() on one-element arrays for
# every loop bound (`for i in range(0, N, 1)` in any kernel), which NumPy 2.3 and newer
# reject ("only 0-dimensional arrays can be converted to Python scalars"); host-side
# Python of the interpreter only, compiled kernels are unaffected (they ran on an H200
# with triton 3.6.0). The kernels run from a copy of the source tree, not an install.
# Knobs: CK_TRITON_COMPAT_VERSION (3.6.0), CK_TRITON_COMPAT_TORCH (torch==2.11.0),
# CK_TRITON_COMPAT_PARTS (default "aot interp compile": which of the three to run; .ci/run
# also runs "compile" alone with the newest torch here, 2.14.1 and its triton 3.8.0).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VERSION=${CK_TRITON_COMPAT_VERSION:-3.6.0}
TORCH=${CK_TRITON_COMPAT_TORCH:-torch==2.11.0}
VENV=${CK_TRITON_COMPAT_VENV:-$HOME/.cache/contrastive_kernels/venv-triton-$VERSION}
PY="$VENV/bin/python"
LOG=$(mktemp -t ck_triton_compat.XXXXXX.log)
TMP=$(mktemp -d -t ck_triton_compat.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
fail() {
    echo "triton_compat: FAILED: $1 (log below, also in $LOG)" >&2
    cat "$LOG" >&2
    exit 1
}
ready() {
    "$PY" -c "import torch, pytest, triton, numpy, ninja, setuptools, sys
sys.exit(triton.__version__ != '$VERSION' or tuple(map(int, numpy.__version__.split('.')[:2])) >= (2, 3)
         or '$TORCH' != 'torch==' + torch.__version__.split('+')[0]
         or int(setuptools.__version__.split('.')[0]) < 77)" 2>/dev/null
}
if ! { [ -x "$PY" ] && ready; }; then
    mkdir -p "$(dirname "$VENV")"
    { ${PYTHON:-python3} -m venv "$VENV" \
        && "$PY" -m pip install -q --upgrade pip \
        && "$PY" -m pip install -q "$TORCH" \
        && "$PY" -m pip install -q "triton==$VERSION" "numpy<2.3" pytest ninja "setuptools>=77" wheel; } >"$LOG" 2>&1 \
        || fail "could not create $VENV with triton==$VERSION"
fi
PARTS=${CK_TRITON_COMPAT_PARTS:-aot interp compile}
has() { case " $PARTS " in *" $1 "*) return 0;; *) return 1;; esac; }
AOT=skipped INTERP=skipped COMPILE=skipped
START=$(date +%s)
if has aot; then
CK_AOT_MODULE=triton_kernels.aot "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_aot.py \
    >"$LOG" 2>&1 || fail "AOT compile with triton $VERSION"
AOT="$(tail -n 1 "$LOG" | sed 's/=//g; s/^ *//; s/ *$//')"
fi
# The package with its triton_kernels subpackage (setup.py maps it) and the tests.
cp -r "$ROOT/contrastive_kernels" "$ROOT/tests" "$TMP/"
rm -rf "$TMP/contrastive_kernels/triton_kernels"
cp -r "$ROOT/triton_kernels" "$TMP/contrastive_kernels/triton_kernels"
if has interp; then
(cd "$TMP" && PYTHONPATH="$TMP" "$PY" -m pytest -q -p no:cacheprovider tests/test_triton.py) \
    >"$LOG" 2>&1 || fail "interpreter tests with triton $VERSION"
INTERP="$(tail -n 1 "$LOG" | sed 's/=//g; s/^ *//; s/ *$//')"
fi
if has compile; then
# torch.compile: the extension compiled against this torch in the copy (CPU kernels only).
cp "$ROOT/setup.py" "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/LICENSE" "$TMP/"
cp -r "$ROOT/csrc" "$TMP/"
rm -f "$TMP"/contrastive_kernels/_C*.so "$TMP"/contrastive_kernels/_build_info.py
(cd "$TMP" && CK_BUILD_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py -q build_ext --inplace) \
    >"$LOG" 2>&1 || fail "C++ extension against $TORCH"
(cd "$TMP" && PYTHONPATH="$TMP" "$PY" -m pytest -q -p no:cacheprovider -k compile \
    tests/test_compile.py tests/test_normalize.py tests/test_dense.py) \
    >"$LOG" 2>&1 || fail "torch.compile tests with $TORCH"
COMPILE="$(tail -n 1 "$LOG" | sed 's/=//g; s/^ *//; s/ *$//')"
fi
echo "triton_compat: OK ($TORCH, triton $VERSION; sm_90 AOT: $AOT; interpreter: $INTERP;" \
    "torch.compile: $COMPILE; $(( $(date +%s) - START ))s)"
rm -f "$LOG"
