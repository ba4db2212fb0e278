"""Triton kernels, installed as contrastive_kernels.triton_kernels (issue 3).

lse  the fused log-sum-exp forward and recompute backward kernels (see its docstring);
     driven by contrastive_kernels.backends.triton.
aot  ahead-of-time compilation of every kernel variant for a GPU target without a GPU
     (python -m contrastive_kernels.triton_kernels.aot; used by tests/test_triton_aot.py).

Nothing here is imported by `import contrastive_kernels`.
"""
