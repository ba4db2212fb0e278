"""Builds contrastive_kernels and its C++ (and, where possible, CUDA) extension.

The extension is compiled against the torch already installed, so build without pip's
build isolation:  pip install torch && pip install --no-build-isolation .
(a build without torch stops at once with that command; metadata and the sdist need no
torch). The wheel requires the torch version it was compiled against.
CK_BUILD_CUDA=1 forces the CUDA sources in csrc/cuda/, CK_BUILD_CUDA=0 leaves them
out; by default they are built when torch is a CUDA build and nvcc is found.
"""
import glob
import json
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension as ce
except ImportError:
    torch = None

# Commands that compile the extension (the others, egg_info, dist_info, sdist, need no torch).
BUILDS = {"build", "build_ext", "bdist_wheel", "bdist", "install", "develop", "editable_wheel"}
NO_TORCH = """
contrastive_kernels: torch is not importable in this build environment.
The C++ extension is compiled against the torch you have installed, so it must be built
without pip's build isolation (which hides that torch). Run:

    pip install torch            # if it is not installed yet
    pip install --no-build-isolation .          (or: pip install --no-build-isolation -e .)
"""
if torch is None and BUILDS & set(sys.argv[1:]):
    sys.exit(NO_TORCH)

ROOT = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(ROOT, "csrc", "build_flags.json")) as f:
    FLAGS = json.load(f)


def _want_cuda():
    flag = os.environ.get("CK_BUILD_CUDA")
    if flag is not None:
        return flag == "1"
    return torch.version.cuda is not None and ce.CUDA_HOME is not None


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def extension():
    sources = ["csrc/bindings.cpp", "csrc/ops.cpp"] + _sources("csrc/cpu/*.cpp")
    include = [os.path.join(ROOT, "csrc")]
    # (csrc/build_flags.json) -fno-trapping-math: GCC then vectorises the CPU kernel's exp
    # loops (their NaN and range tests) for AVX2 and the baseline ISA too, not only
    # AVX-512. No FP traps are enabled anyway, and results are unchanged.
    cxx = FLAGS["cxx"] + FLAGS["openmp"] if os.name != "nt" else FLAGS["cxx_msvc"]
    link = FLAGS["openmp"] if os.name != "nt" else []
    if _want_cuda():
        sources += _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
        archs = os.environ.get("CK_CUDA_ARCHS", ";".join(FLAGS["cuda_archs"])).split(";")
        define = "-D" + FLAGS["cuda_define"]
        nvcc = FLAGS["nvcc"] + [define]
        nvcc += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        # PTX of the newest arch too, so that newer GPUs can JIT-compile the kernels.
        newest = max(archs, key=lambda a: int("".join(c for c in a if c.isdigit())))
        nvcc += [f"-gencode=arch=compute_{newest},code=compute_{newest}"]
        return ce.CUDAExtension("contrastive_kernels._C", sources, include_dirs=include,
                                extra_compile_args={"cxx": cxx + [define], "nvcc": nvcc},
                                extra_link_args=link)
    return ce.CppExtension("contrastive_kernels._C", sources, include_dirs=include,
                           extra_compile_args={"cxx": cxx}, extra_link_args=link)


def torch_requirement():
    """The torch the extension is compiled against (its ABI): that version, without the
    local tag (+cpu, +cu130); unpinned where torch is absent (metadata, the sdist)."""
    if torch is None:
        return "torch"
    return "torch==" + torch.__version__.split("+")[0]


setup(
    packages=["contrastive_kernels", "contrastive_kernels.backends", "contrastive_kernels.integrations",
              "contrastive_kernels.triton_kernels"],
    package_dir={"contrastive_kernels.triton_kernels": "triton_kernels"},
    package_data={"contrastive_kernels": ["py.typed"]},
    ext_modules=[extension()] if torch is not None else [],
    cmdclass={"build_ext": ce.BuildExtension.with_options(use_ninja=True)} if torch is not None else {},
    install_requires=[torch_requirement(), "numpy"],
    extras_require={"triton": ["triton"], "test": ["pytest", "pytest-benchmark"],
                    "bench": ["matplotlib", "pytest-benchmark"]},
)
