"""Builds contrastive_kernels and its C++ (and, where possible, CUDA) extension.

torch must be installed first:  pip install -e . --no-build-isolation
CK_BUILD_CUDA=1 forces the CUDA sources in csrc/cuda/, CK_BUILD_CUDA=0 leaves them
out; by default they are built when torch is a CUDA build and nvcc is found.
"""
import glob
import json
import os

from setuptools import setup

import torch
from torch.utils import cpp_extension as ce

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


setup(
    name="contrastive_kernels",
    version="0.1.0",
    description="Fused contrastive losses (InfoNCE/CLIP, NT-Xent, SupCon) that never materialize N x M logits",
    packages=["contrastive_kernels", "contrastive_kernels.backends", "contrastive_kernels.integrations",
              "contrastive_kernels.triton_kernels"],
    package_dir={"contrastive_kernels.triton_kernels": "triton_kernels"},
    ext_modules=[extension()],
    cmdclass={"build_ext": ce.BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.9",
    install_requires=["torch", "numpy"],
    extras_require={"triton": ["triton"], "test": ["pytest", "pytest-benchmark"],
                    "bench": ["matplotlib", "pytest-benchmark"]},
)
