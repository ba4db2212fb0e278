// The emulator's stand-in (csrc/test/cuda_emu/): one null stream.
#pragma once
#include <cuda_runtime_api.h>
#include <c10/core/Device.h>

namespace c10 {
namespace cuda {
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
}  // namespace cuda
}  // namespace c10
