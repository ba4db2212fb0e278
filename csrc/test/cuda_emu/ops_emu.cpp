// The CUDA backend's ATen launcher (csrc/cuda/lse_cuda.cpp) over the emulated kernels,
// registered for CPU tensors as torch.ops.ck_cuda_emu.* (tests/cuda_emu.py builds it and
// writes the schemas, taken from csrc/ops.cpp, into ck_emu_schemas.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#pragma push_macro("TORCH_LIBRARY_IMPL")
#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, key, m) static void ck_emu_register(torch::Library& m)
#define is_cuda is_cpu
#include "cuda/lse_cuda.cpp"
#undef is_cuda
#pragma pop_macro("TORCH_LIBRARY_IMPL")

TORCH_LIBRARY(ck_cuda_emu, m) {
#include "ck_emu_schemas.h"
}

TORCH_LIBRARY_IMPL(ck_cuda_emu, CPU, m) { ck_emu_register(m); }
