"""The installed libraries the compatibility tests compare against (requirements-compat.txt).

They are installed without their dependencies (torchvision and timm would pull a CUDA
torch), so a package whose __init__ imports those is loaded module by module: the loss
module itself, from the installed package's files. Returns None where not installed.

lightly (`lightly_ntxent`): lightly/__init__.py imports most of the package, torchvision
included, and a PyPI torchvision does not work beside this CPU torch. The loader puts
bare package modules for lightly, lightly.loss, lightly.models, lightly.models.modules
and lightly.utils in sys.modules (their __path__ the installed directories, their
__init__ files not run) and imports lightly.loss.ntx_ent_loss, which pulls in
lightly.models.modules.memory_bank, lightly.models.utils and lightly.utils.dist from the
installed files. lightly.models.utils imports `torchvision.ops.StochasticDepth` at
module level (unused by NTXentLoss and the memory bank): only if torchvision is not
installed, a stand-in `torchvision` / `torchvision.ops` with a StochasticDepth that
raises when built is registered for the import. Afterwards every sys.modules entry the
loader added (the bare packages, the loaded lightly modules, the stand-ins) is removed
again, so no other test (transformers probes for torchvision) can see them; the loaded
modules keep their references to one another.

`check_against` compares an adapter's (value, gradients...) with the library's own loss
on the same inputs (the lightly and pytorch-metric-learning tests).
"""
import functools
import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types

import torch


def _module(package, name):
    try:
        return importlib.import_module(f"{package}.{name}")
    except Exception:      # the package's __init__ needs a dependency left out
        pass
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], f"{name}.py")
    mod_spec = importlib.util.spec_from_file_location(f"_compat_{package}_{name}", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


@functools.lru_cache(None)
def open_clip_loss():
    """open_clip's loss module (SigLipLoss, ClipLoss), or None."""
    try:
        return _module("open_clip", "loss")
    except Exception:
        return None


def _bare_package(name, path):
    mod = types.ModuleType(name)
    mod.__path__ = [path]
    mod.__package__ = name
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    mod.__spec__.submodule_search_locations = [path]
    return mod


class _StochasticDepth:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("torchvision stand-in of tests/compat.py: not usable")


def _torchvision_stand_in():
    tv = types.ModuleType("torchvision")
    tv.__path__ = []
    ops = types.ModuleType("torchvision.ops")
    ops.StochasticDepth = _StochasticDepth
    tv.ops = ops
    return {"torchvision": tv, "torchvision.ops": ops}


@functools.lru_cache(None)
def lightly_ntxent():
    """lightly's NTXentLoss class (lightly.loss.ntx_ent_loss), or None."""
    try:
        real = sys.modules.get("lightly")
        if real is not None and getattr(real, "__file__", None):  # imported for real
            return importlib.import_module("lightly.loss.ntx_ent_loss").NTXentLoss
        spec = importlib.util.find_spec("lightly")
        if spec is None or not spec.submodule_search_locations:
            return None
        root = list(spec.submodule_search_locations)[0]
        before = set(sys.modules)
        added = {}
        for name in ("lightly", "lightly.loss", "lightly.models", "lightly.models.modules",
                     "lightly.utils"):
            path = os.path.join(root, *name.split(".")[1:])
            added[name] = _bare_package(name, path)
        if importlib.util.find_spec("torchvision") is None:
            added.update(_torchvision_stand_in())
        added = {k: v for k, v in added.items() if k not in sys.modules}
        sys.modules.update(added)
        try:
            return importlib.import_module("lightly.loss.ntx_ent_loss").NTXentLoss
        finally:
            for name in set(sys.modules) - before:     # torch etc. stay imported
                if name.split(".")[0] in ("lightly", "torchvision"):
                    del sys.modules[name]
    except Exception:
        return None


# ----------------------------------------------------------------------------- comparison

def rel(a, b, floor=1e-30):
    """max |a - b| relative to max |b| (at least `floor`); a must be finite."""
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.isfinite(a).all()
    return float((a - b).abs().max() / b.abs().max().clamp_min(floor)) if b.numel() else 0.0


def check_against(got, want, tol, where="", names=()):
    """An adapter's result against the library's: `got` and `want` are (value, gradient,
    gradient, ...), as the tests' run() returns them. The value must agree within
    tol["loss"] relative to max(|want|, 1), each gradient within tol["grad"] relative to
    its largest entry, and a gradient must be None in both or in neither. names: the
    gradients' names in the messages (by default their positions)."""
    assert len(got) == len(want), (where, len(got), len(want))
    assert rel(got[0], want[0], floor=1.0) <= tol["loss"], (where, got[0], want[0])
    for i, (g, w) in enumerate(zip(got[1:], want[1:])):
        name = names[i] if i < len(names) else f"gradient {i}"
        assert (g is None) == (w is None), (where, name)
        if w is not None:
            assert rel(g, w) <= tol["grad"], (where, name, rel(g, w))
