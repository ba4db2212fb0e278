"""Triton kernels (triton_kernels/). Not implemented yet: see issue 3."""
NAME = "triton"


def unavailable_reason(device):
    return "the Triton backend is not implemented yet"
