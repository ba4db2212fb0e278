// The Python module contrastive_kernels._C. Importing it loads the ops defined in
// ops.cpp and registered by the backends; it has no Python functions of its own.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "contrastive_kernels C++ extension; the ops live in torch.ops.contrastive_kernels";
}
