"""CMakeLists.txt builds the same csrc/ against the installed torch, and ctest passes."""
import os
import shutil
import subprocess
import sys

import pytest

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
