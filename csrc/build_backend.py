"""The PEP 517 build backend of contrastive_kernels (pyproject.toml: backend-path csrc).

setuptools.build_meta, with one difference: a wheel (or editable) build whose environment
cannot import torch stops in its first hook, before anything is installed, with the
command to run. The C++ extension is compiled against the torch already installed, which
pip's build isolation hides; so `pip install .` without --no-build-isolation fails in
about a second instead of compiling nothing useful. The sdist and metadata need no torch.

Nothing is imported at load time: pyproject.toml asks for no build requirements, and the
hooks return setuptools' own when the build goes on.
"""
import importlib.util

NO_TORCH = """
contrastive_kernels: torch is not importable in this build environment.
The C++ extension is compiled against the torch you have installed, so it must be built
without pip's build isolation (which hides that torch). Run:

    pip install torch            # if it is not installed yet
    pip install --no-build-isolation .          (or: pip install --no-build-isolation -e .)
"""

REQUIRES = ["setuptools>=77", "wheel"]


def _need_torch():
    if importlib.util.find_spec("torch") is None:
        raise SystemExit(NO_TORCH)


def get_requires_for_build_wheel(config_settings=None):
    _need_torch()
    return list(REQUIRES)


def get_requires_for_build_editable(config_settings=None):
    _need_torch()
    return list(REQUIRES)


def get_requires_for_build_sdist(config_settings=None):
    return list(REQUIRES)


def _setuptools():
    from setuptools import build_meta       # installed from the hooks above by now
    return build_meta


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _need_torch()
    return _setuptools().build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    _need_torch()
    return _setuptools().build_editable(wheel_directory, config_settings, metadata_directory)


def build_sdist(sdist_directory, config_settings=None):
    return _setuptools().build_sdist(sdist_directory, config_settings)


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    return _setuptools().prepare_metadata_for_build_wheel(metadata_directory, config_settings)


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None):
    return _setuptools().prepare_metadata_for_build_editable(metadata_directory,
                                                             config_settings)
