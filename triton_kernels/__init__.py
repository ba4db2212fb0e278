"""Triton kernels, installed as contrastive_kernels.triton_kernels (issue 3)."""
