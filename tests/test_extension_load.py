"""The compiled extension is loaded only under the torch it was compiled against.

setup.py records that torch in contrastive_kernels/_build_info.py beside _C. Each case
runs a fresh interpreter that puts a stand-in record in sys.modules (or changes
torch.__version__) before importing contrastive_kernels: under another torch the import
still works, _C is not imported, the `cpu` backend says why (both versions), and
backend="auto" falls back to the torch backend with one warning at the caller's line.
"""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

import contrastive_kernels as ck
from contrastive_kernels import extension
from conftest import TOL

pytestmark = pytest.mark.cpu_only  # CI runs it; skipped under CK_TEST_DEVICE=cuda

PKG_DIR = os.path.dirname(os.path.abspath(ck.__file__))
BUILT = any(glob.glob(os.path.join(PKG_DIR, "_C" + ext)) for ext in ("*.so", "*.pyd"))
FAKE = "2.0.1+cu117"        # a torch the running one is not

# The stand-in record: `recorded` is TORCH_VERSION, None: no record at all; `running`
# (if set) replaces torch.__version__ before the package is imported; `undefined`: the
# import of _C fails as a module compiled against another torch does.
PRELUDE = """\
import json, sys, types, warnings
recorded, running, undefined = {recorded!r}, {running!r}, {undefined!r}
import torch
class FailC:
    def find_spec(self, name, path=None, target=None):
        if name == "contrastive_kernels._C":
            raise ImportError("_C.so: undefined symbol: _ZN3c104impl3cow11cow_deleterEPv")
if undefined:
    sys.meta_path.insert(0, FailC())
if running is not None:
    torch.__version__ = torch.torch_version.TorchVersion(running)
if recorded is None:
    sys.modules["contrastive_kernels._build_info"] = None      # import fails: unrecorded
else:
    info = types.ModuleType("contrastive_kernels._build_info")
    info.TORCH_VERSION = recorded
    sys.modules[info.__name__] = info
import contrastive_kernels as ck
out = dict(loaded=ck.extension.loaded(), imported="contrastive_kernels._C" in sys.modules,
           available=ck.available_backends("cpu"), load_error=ck.extension.LOAD_ERROR,
           reason=ck.backends.get("cpu").unavailable_reason("cpu"))
"""

# Sizes above the small-problem path of backend="auto" on the CPU (contrastive_kernels.dense,
# where it exists), which materializes the logits and needs no backend.
CALLS = """\
dense_max = getattr(getattr(ck, "dense", None), "DENSE_MAX", 0)
n = max(9, int(dense_max ** 0.5) + 9)
gen = torch.Generator().manual_seed(0)
q = torch.randn(n, 5, generator=gen, dtype=torch.float64, requires_grad=True)
k = torch.randn(n + 2, 5, generator=gen, dtype=torch.float64, requires_grad=True)
with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter("always")
    got = ck.info_nce(q, k, temperature=0.3)                 # CALL
    got2 = ck.info_nce(q.float(), k.float(), temperature=0.3)
gq, gk = torch.autograd.grad(got, (q, k))
want = ck.reference.info_nce(q, k, temperature=0.3)
wq, wk = torch.autograd.grad(want, (q, k))
got, got2, want = got.detach(), got2.detach(), want.detach()
# errors relative to the largest reference value, as conftest.rel_err
gscale = max(float(wq.abs().max()), float(wk.abs().max()))
out.update(err=float((got - want).abs() / want.abs()),
           err32=float((got2.double() - want).abs() / want.abs()),
           gerr=max(float((gq - wq).abs().max()), float((gk - wk).abs().max())) / gscale,
           warnings=[dict(category=w.category.__name__, message=str(w.message),
                          file=w.filename, line=w.lineno) for w in rec])
"""


def run_case(tmp_path, recorded, running=None, undefined=False, calls=False):
    """Runs the case; (its results, the script's path, the line of its first call)."""
    script = tmp_path / "case.py"
    script.write_text(PRELUDE.format(recorded=recorded, running=running, undefined=undefined)
                      + (CALLS if calls else "") + "print(json.dumps(out))\n")
    # a user's environment: not the tests' TRITON_INTERPRET=1 (conftest), under which
    # the triton backend would run on CPU tensors before the torch fallback
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = script.read_text().splitlines()
    call_line = next((i + 1 for i, l in enumerate(lines) if l.endswith("# CALL")), None)
    return json.loads(proc.stdout.strip().splitlines()[-1]), str(script), call_line


@pytest.mark.parametrize("which", ["recorded", "running"])
def test_other_torch_falls_back_with_one_warning(tmp_path, which):
    """recorded: the record names another torch; running: torch.__version__ differs."""
    real = str(torch.__version__)
    if which == "recorded":
        recorded, running, compiled, now = FAKE, None, FAKE, real
    else:
        recorded, running, compiled, now = real, FAKE, real, FAKE
    out, script, call_line = run_case(tmp_path, recorded, running, calls=True)
    assert not out["loaded"] and not out["imported"], out      # _C never imported
    assert out["available"] == ["torch"], out
    for text in (out["load_error"], out["reason"]):
        assert f"compiled against torch {compiled}, running torch {now}" in text, text
        assert "pip install --no-build-isolation" in text
    assert out["err"] < TOL[torch.float64]["loss"] and out["gerr"] < TOL[torch.float64]["grad"], out
    assert out["err32"] < TOL[torch.float32]["loss"], out
    ours = [w for w in out["warnings"] if "contrastive_kernels" in w["message"]]
    assert len(ours) == 1, out["warnings"]     # two calls, one warning
    w = ours[0]
    assert w["category"] == "RuntimeWarning" and "falling back" in w["message"]
    assert f"torch {compiled}" in w["message"] and f"torch {now}" in w["message"]
    assert (w["file"], w["line"]) == (script, call_line), w   # the caller's line


@pytest.mark.skipif(not BUILT, reason="extension not built")
@pytest.mark.parametrize("recorded", ["same", None])
def test_same_or_unrecorded_torch_loads(tmp_path, recorded):
    """The record names the running torch, or there is none (a build by other means,
    CMake): _C is imported as before."""
    out, _, _ = run_case(tmp_path, str(torch.__version__) if recorded else None)
    assert out["loaded"] and out["imported"] and out["load_error"] is None, out
    assert "cpu" in out["available"] and out["reason"] is None


def test_this_build_is_recorded():
    """A build by setup.py (make build, the wheel) records the torch it used; this one's
    is the running torch and _C is loaded."""
    info = os.path.join(PKG_DIR, "_build_info.py")
    if not os.path.exists(info):
        pytest.skip("no _build_info.py: the extension predates the record, or was not "
                    "built by setup.py")
    assert extension.COMPILED_TORCH == str(torch.__version__)
    assert not extension.TORCH_MISMATCH
    assert extension.loaded() == BUILT, extension.LOAD_ERROR


def test_unrecorded_build_of_another_torch(tmp_path):
    """No record, and the import of _C fails with an undefined symbol (a build by other
    means under another torch): the fallback as before, the reason points at the rebuild."""
    out, _, _ = run_case(tmp_path, None, undefined=True, calls=True)
    assert not out["loaded"] and out["available"] == ["torch"], out
    assert "undefined symbol" in out["reason"], out["reason"]
    assert "pip install --no-build-isolation" in out["reason"], out["reason"]
    assert out["err"] < TOL[torch.float64]["loss"] and out["gerr"] < TOL[torch.float64]["grad"], out
    ours = [w for w in out["warnings"] if "contrastive_kernels" in w["message"]]
    assert len(ours) == 1 and "undefined symbol" in ours[0]["message"], out["warnings"]


SETUP = os.path.join(os.path.dirname(PKG_DIR), "setup.py")


@pytest.mark.parametrize("version,in_root,stops", [
    ("65.5.0", True, True),      # a fresh venv's setuptools, pyproject.toml beside it
    ("76.1.0", True, True),
    ("65.5.0", False, False),    # bench/gpu_check.sh: setup.py run from a folder without it
    (None, True, False),         # the installed setuptools (>= 77 here)
])
def test_setup_py_names_an_old_setuptools(tmp_path, version, in_root, stops):
    """setup.py stops with the upgrade command where setuptools is too old to read
    pyproject.toml (PEP 639 license), instead of setuptools' schema error."""
    fake = f"setuptools.__version__ = {version!r}; " if version else ""
    code = (f"import runpy, sys, setuptools; {fake}sys.argv = ['setup.py', '--name']; "
            f"runpy.run_path({SETUP!r}, run_name='__main__')")
    cwd = os.path.dirname(SETUP) if in_root else str(tmp_path)
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                       timeout=120)
    if stops:
        assert r.returncode != 0, r.stdout
        assert "needs setuptools>=77" in r.stderr and version in r.stderr, r.stderr
        assert "pip install -U 'setuptools>=77'" in r.stderr, r.stderr
    else:
        assert r.returncode == 0 and "setuptools>=77" not in r.stderr, r.stderr
        # the name comes from pyproject.toml; without it setuptools says UNKNOWN
        assert r.stdout.splitlines()[-1] == ("contrastive_kernels" if in_root else "UNKNOWN"), r.stdout
