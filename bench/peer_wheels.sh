#!/usr/bin/env bash
# Fetch the peers that bench/bench_gpu.py compares against (Inf-CL, siglip-kernel) as
# wheels into .whl/, for the GPU machine, which has no network. Run it here, then name
# `.whl` in the device call's carry; bench/gpu_check.sh installs what it finds there.
#   bash bench/peer_wheels.sh
# Both are pure-Python wheels (Triton kernels); their needs (torch, triton, numpy) are on
# the GPU machine already. Knob: CK_PEERS (default "inf-cl==1.2.1 siglip-kernel==0.1.2").
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS=${CK_PEERS:-"inf-cl==1.2.1 siglip-kernel==0.1.2"}
PY=${PYTHON:-python3}
mkdir -p .whl
for spec in $PEERS; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$spec" 2>&1 | { grep -v "^WARNING: Location" || true; }
done
ls -l .whl/*.whl
