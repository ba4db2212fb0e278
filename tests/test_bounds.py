"""No out-of-bounds reads: the kernels run on inputs followed by an inaccessible page
(tests/bounds_probe.py, in a child process), so reading past the last row, or past the
end of the last row (a SIMD tail, a tile or chunk edge), kills the child (SIGSEGV)."""
import os
import signal
import subprocess
import sys

import pytest

import contrastive_kernels as ck
import cuda_emu

pytestmark = [pytest.mark.cpu_only,
              pytest.mark.skipif(not sys.platform.startswith("linux"),
                                 reason="guard pages by mmap/mprotect (Linux)")]

PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bounds_probe.py")


def _run(*args, timeout=600):
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, PROBE, *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_the_guard_page_catches_a_read_past_the_end():
    """The harness can fail: one element past a guarded tensor crashes the child."""
    r = _run("cpu", "selftest", timeout=120)
    assert r.returncode == -signal.SIGSEGV, (r.returncode, r.stdout, r.stderr)
    assert "reading past the end" in r.stdout


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton", "cuda"])
def test_no_read_past_the_inputs(backend):
    if backend == "cuda":
        why = cuda_emu.unavailable()
        if why:
            pytest.skip(f"CUDA emulator: {why}")
    elif backend not in ck.available_backends("cpu"):
        pytest.skip(f"{backend} is not available here")
    r = _run(backend)
    assert r.returncode == 0 and r.stdout.rstrip().endswith("ok"), (
        f"{backend}: exit {r.returncode} "
        f"({'SIGSEGV: a read past the inputs' if r.returncode == -signal.SIGSEGV else ''})"
        f"\nlast cases:\n{r.stdout[-1500:]}\n{r.stderr[-3000:]}")
