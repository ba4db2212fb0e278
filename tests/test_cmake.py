"""CMakeLists.txt builds the same csrc/ against the installed torch, and ctest passes."""
import os
import shutil
import subprocess
import sys

import pytest
from test_cuda_build import NVCC

pytestmark = pytest.mark.cpu_only  # CI runs it; skipped under CK_TEST_DEVICE=cuda


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_build_and_ctest(tmp_path):
    build = tmp_path / "build"
    env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL="2")
    run = lambda *cmd: subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                                      timeout=600)
    out = run("cmake", "-S", ROOT, "-B", str(build), f"-DPython3_EXECUTABLE={sys.executable}")
    assert out.returncode == 0, out.stdout + out.stderr
    out = run("cmake", "--build", str(build))
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    out = run("ctest", "--test-dir", str(build), "--output-on-failure")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "100% tests passed, 0 tests failed out of 2" in out.stdout, out.stdout


@pytest.mark.skipif(shutil.which("cmake") is None or NVCC is None,
                    reason="cmake or nvcc is not installed")
def test_cmake_builds_cuda_kernels_for_sm80_and_sm90(tmp_path):
    # CK_BUILD_CUDA=ON with CK_BUILD_TORCH=OFF: the torch-free kernels of csrc/cuda/
    # (the full build with a CUDA torch is in .ci/cuda_build.sh).
    build = tmp_path / "build"
    run = lambda *cmd: subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    out = run("cmake", "-S", ROOT, "-B", str(build), "-DCK_BUILD_TORCH=OFF", "-DCK_BUILD_CUDA=ON",
              f"-DCMAKE_CUDA_COMPILER={NVCC}")
    assert out.returncode == 0, out.stdout + out.stderr
    out = run("cmake", "--build", str(build), "--target", "ck_cuda_kernels", "--verbose")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    for arch in ("80", "90"):
        assert f"arch=compute_{arch}" in out.stdout, out.stdout[-2000:]
    objs = list(build.rglob("lse_kernels.cu.o"))
    assert objs and objs[0].stat().st_size > 10000, objs
