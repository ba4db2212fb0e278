#!/usr/bin/env bash
# Packaging (issue 17), after `make test` has set up .venv:
#  1. `python -m build` makes the sdist, then the wheel from the sdist (a file missing from
#     the sdist fails the compile here); the wheel ships contrastive_kernels/_build_info.py
#     (the torch it was compiled against), the sdist does not;
#  2. in a fresh venv with only torch: an isolated `pip install .` (pyproject path) must
#     stop with the command to run in under 2 s, and an isolated `python -m build --sdist`
#     must work (the sdist needs no torch); the wheel installs and passes
#     tests/package_smoke.py;
#  3. the sdist installs (compiled in that venv) and passes it too.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$ROOT/.venv/bin/python
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
quiet() { "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }   # keeps "$@"'s status

$PY -m pip install -q build
echo "== sdist and wheel (python -m build --no-isolation)"
$PY -m build --no-isolation -o "$work/dist" . > "$work/build.log" 2>&1 || {
    tail -40 "$work/build.log"; exit 1; }
ls -l "$work/dist"
sdist=$(ls "$work"/dist/*.tar.gz)
wheel=$(ls "$work"/dist/*.whl)
tar tzf "$sdist" > "$work/sdist.txt"
for f in csrc/common/tile_math.h csrc/cuda/lse_kernels.cu csrc/build_flags.json LICENSE \
         contrastive_kernels/py.typed pyproject.toml; do
    grep -q "/$f\$" "$work/sdist.txt" || { echo "sdist lacks $f"; exit 1; }
done
# the build writes the record of its torch: never a stale one from this tree in the sdist
if grep -q "/contrastive_kernels/_build_info.py\$" "$work/sdist.txt"; then
    echo "sdist ships contrastive_kernels/_build_info.py"; exit 1; fi
$PY - "$wheel" <<'PYEOF'
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
names = z.namelist()
assert any(n.startswith("contrastive_kernels/_C") for n in names), "wheel lacks _C"
meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
pins = [l for l in meta.splitlines() if l.startswith("Requires-Dist: torch")]
assert pins and "==" in pins[0], f"wheel does not pin torch: {pins}"
print("wheel:", pins[0])
import torch
info = z.read("contrastive_kernels/_build_info.py").decode()     # KeyError: not shipped
assert f"TORCH_VERSION = {str(torch.__version__)!r}" in info, info
print("wheel: compiled against torch", torch.__version__)
PYEOF

echo "== fresh venv with $TORCH_SPEC"
python3 -m venv "$work/venv"
V=$work/venv/bin
quiet $V/pip install -q "$TORCH_SPEC" numpy

echo "== isolated pip install . (expected to stop with the command to run)"
start=$(date +%s%N)
if $V/pip install --no-deps "$ROOT" > "$work/isolated.log" 2>&1; then
    echo "isolated build unexpectedly succeeded"; exit 1
fi
end=$(date +%s%N)
grep -q "pip install --no-build-isolation" "$work/isolated.log" || {
    tail -30 "$work/isolated.log"; echo "no build command in the message"; exit 1; }
ms=$(( (end - start) / 1000000 ))
echo "stopped with the message after $ms ms (pip's isolated environment included)"
[ "$ms" -lt 2000 ] || { echo "the isolated failure took $ms ms, over 2 s"; exit 1; }

echo "== isolated python -m build --sdist (needs no torch)"
quiet $V/pip install -q build
$V/python -m build --sdist -o "$work/isolated" "$ROOT" > "$work/isolated_sdist.log" 2>&1 || {
    tail -30 "$work/isolated_sdist.log"; echo "isolated sdist build failed"; exit 1; }
ls "$work"/isolated/*.tar.gz

echo "== the wheel"
quiet $V/pip install -q "$wheel"
(cd "$work" && $V/python "$ROOT/tests/package_smoke.py")
$V/pip uninstall -q -y contrastive_kernels

echo "== the sdist, compiled in the fresh venv"
quiet $V/pip install -q "setuptools>=77" wheel ninja
quiet $V/pip install -q --no-build-isolation "$sdist"
(cd "$work" && $V/python "$ROOT/tests/package_smoke.py")
echo "packaging checks passed"
