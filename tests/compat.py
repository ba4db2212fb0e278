"""The installed libraries the compatibility tests compare against (requirements-compat.txt).

They are installed without their dependencies (torchvision and timm would pull a CUDA
torch), so a package whose __init__ imports those is loaded module by module: the loss
module itself, from the installed package's files. Returns None where not installed.
"""
import functools
import importlib
import importlib.util
import os


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
