"""Fused CUDA C++ kernels (csrc/cuda/). Not implemented yet: see issue 4."""
NAME = "cuda"


def unavailable_reason(device):
    if device.type != "cuda":
        return "it runs on CUDA tensors only"
    return "the CUDA C++ backend is not implemented yet"
