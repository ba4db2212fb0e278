"""Ahead-of-time compilation of the Triton kernels for sm90, with no GPU.

Runs `python -m contrastive_kernels.triton_kernels.aot --json` in a subprocess with
TRITON_INTERPRET removed from its environment (the test suite sets it on CPU, and
triton.jit then makes interpreter functions that cannot be compiled). Checks that every
launch variant compiles for GPUTarget("cuda", 90, 32), with the divisibility hints a
real launch gets (aligned pointers, D and strides divisible by 16), that fp16/bf16 use tensor cores
(wgmma/mma in the PTX; so must fp32 with input_precision="tf32"), that the atomic backward has atomics and the deterministic
and low-memory kernels have none, and that each default config fits sm90 shared memory.
CK_AOT_FULL=1 compiles every flag combination (several minutes).
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.cpu_only  # CI runs it; skipped under CK_TEST_DEVICE=cuda


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    # CK_AOT_MODULE: the module to run (.ci/triton_aot.sh runs triton_kernels.aot from the
    # source tree, in a venv with another triton and without the package installed).
    module = os.environ.get("CK_AOT_MODULE", "contrastive_kernels.triton_kernels.aot")
    cmd = [sys.executable, "-m", module, "--json",
           "--jobs", os.environ.get("CK_AOT_JOBS", "2")]
    if os.environ.get("CK_AOT_FULL") == "1":
        cmd.append("--full")
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def _name(r):
    return f"{r['kind']}-{r['dtype']}-" + "-".join(k for k, v in r["flags"].items() if v)


FUSED = ("fwd", "bwd", "grad")


def test_every_variant_compiled(compiled):
    kinds = {(r["kind"], r["dtype"]) for r in compiled}
    assert kinds == {(k, d) for k in FUSED + ("stats", "ds", "sig")
                     for d in ("fp16", "bf16", "fp32", "tf32", "fp64")}
    for dt in ("fp16", "bf16"):
        fwd = {(r["flags"]["SELF_MASK"], r["flags"]["COLS"]) for r in compiled
               if r["kind"] == "fwd" and r["dtype"] == dt}
        assert len(fwd) == 4, fwd
        bwd = {(r["flags"]["SELF_MASK"], r["flags"]["HAS_R"], r["flags"]["HAS_C"], r["flags"]["ATOMIC_DK"],
                r["flags"].get("SIGLIP", False), r["flags"].get("SUMS", False),
                r["flags"].get("GRAD", True), r["flags"].get("SHIFT", 0))
               for r in compiled if r["kind"] == "bwd" and r["dtype"] == dt}
        # + the sigmoid loss's four launches and the positive shift's three
        assert len(bwd) == 10 + 4 + 3, bwd
        assert sum(1 for b in bwd if b[4]) == 4, bwd
        # SHIFT 1 and 2 (the shift by row, by column) and 3 (the sigmoid loss's positives)
        assert {b[7] for b in bwd} == {0, 1, 2, 3}, bwd
        assert all(b[7] == 3 for b in bwd if b[4]), bwd
        assert any(r["flags"].get("SHIFT") for r in compiled
                   if r["kind"] == "fwd" and r["dtype"] == dt)
        grad = {tuple(r["flags"].values()) for r in compiled if r["kind"] == "grad" and r["dtype"] == dt}
        assert len(grad) == 8, grad
    for dt in ("fp16", "bf16", "fp32", "tf32", "fp64"):
        one_d = {(r["kind"], r["flags"]["ONE_D"]) for r in compiled
                 if r["dtype"] == dt and r["kind"] in FUSED}
        assert len(one_d) == 6, (dt, one_d)


def test_half_types_use_tensor_cores(compiled):
    for r in compiled:
        if r["dtype"] in ("fp16", "bf16", "tf32") and r["kind"] in FUSED:
            assert r["wgmma"] or r["mma"], _name(r)
    # On sm90 Triton should pick the Hopper warpgroup MMA for the half-type GEMMs, also
    # those of the blocked kernels that compute S (FROM_QK, algorithm="epilogue").
    assert any(r["wgmma"] for r in compiled if r["dtype"] in ("fp16", "bf16"))
    gemm = [r for r in compiled if r["flags"].get("FROM_QK")]
    assert len(gemm) == 5 * 10, len(gemm)     # 2 stats, 2 ds, 3 sig x (KEY_IDS or not)
    assert all(r["wgmma"] for r in gemm if r["dtype"] in ("fp16", "bf16")), \
        [_name(r) for r in gemm if not r["wgmma"]]
    assert all(r["wgmma"] or r["mma"] for r in gemm if r["dtype"] == "tf32")


def test_atomics_only_where_intended(compiled):
    for r in compiled:
        if r["kind"] == "bwd":
            assert r["atomic"] == r["flags"]["ATOMIC_DK"], _name(r)
        elif r["kind"] == "grad":
            assert not r["atomic"], _name(r)
        else:
            assert not r["atomic"], _name(r)


def test_default_configs_fit_shared_memory(compiled):
    for r in compiled:
        assert r["shared"] <= r["smem_limit"], (_name(r), r["shared"])


def test_default_configs_do_not_spill(compiled):
    # The default configs keep their tiles in registers: ptxas -v reports no spill stores
    # for any fp16/bf16 forward or backward launch, the low-memory kernel with D in chunks
    # (D = 768, the GPU target). The low-memory kernel with D in one chunk (256) holds q,
    # k and the accumulator: under 128 B (596 B with 64-wide key tiles); the fp32 "ieee"
    # backward under 32 B (164 B with 64-wide key tiles).
    if any(r["spills"] is None for r in compiled):
        pytest.skip("ptxas -v did not run")
    half = [r for r in compiled if r["dtype"] in ("fp16", "bf16")]
    # fwd (+ shift), bwd (+ sigmoid, + shift), grad, and the blocked kernels (InfoNCE's 4,
    # the sigmoid loss's 3, each reading S or computing it, each with and without key
    # ids; no spills either)
    assert len(half) == 2 * (5 + 17 + 8 + 8 + 12)
    # The sigmoid loss's 3-pass launch with D in one chunk (256) also keeps two row sums
    # and both softplus and sigmoid: 108 B of spills (sm_90, triton 3.9).
    one_d_grad = lambda r: r["flags"].get("ONE_D") and (
        r["kind"] == "grad" or (r["flags"].get("SUMS") and r["flags"].get("GRAD")))
    # The sigmoid loss's positive ids (each entry's term with its target) and the
    # compensated log1p of the softplus: 104 B (triton 3.9 and 3.6.0), under 160 B. With
    # S computed (128 x 128, at 255 registers before the ids) the kernels that keep the
    # row sums spill too with triton 3.9: with KEY_IDS (labels) 20 B (sums and dS, sums
    # alone), without 28 B and 0 B; none with triton 3.6.0; under 160 B. dS alone takes
    # 137-181 registers. Whether this costs time is for the GPU benchmark to say
    # (docs/DESIGN.md, section 5; the epilogue is opt-in).
    sums_qk = lambda r: r["kind"] == "sig" and r["flags"].get("FROM_QK") and \
        r["flags"].get("SUMS")
    limit = lambda r: 159 if (one_d_grad(r) or sums_qk(r)) else 0
    bad = [(_name(r), r["spills"]) for r in half if r["spills"] > limit(r)]
    fp32_bwd = [r for r in compiled if r["dtype"] == "fp32" and r["kind"] == "bwd"]
    assert fp32_bwd
    bad += [(_name(r), r["spills"]) for r in fp32_bwd if r["spills"] > 31]
    assert not bad, bad
