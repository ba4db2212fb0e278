"""Run by tests/test_bounds.py in a child process: the losses on inputs that end exactly
at an inaccessible (PROT_NONE) page, so that a kernel reading past the last row, or past
a row's end in the last row, dies of SIGSEGV instead of reading garbage.

    python tests/bounds_probe.py BACKEND [selftest]

Prints one line per case run, then "ok". `selftest` reads one element past the end of a
guarded tensor on purpose (the test expects that to crash).
"""
import ctypes
import mmap
import os
import sys

import torch

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_keep = []


def guarded(x):
    """A contiguous copy of x whose last byte is followed by a PROT_NONE page."""
    x = x.contiguous()
    nbytes = x.numel() * x.element_size()
    data_pages = max(1, -(-nbytes // PAGE))
    mm = mmap.mmap(-1, (data_pages + 1) * PAGE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    if _libc.mprotect(ctypes.c_void_p(base + data_pages * PAGE), PAGE, 0) != 0:
        raise OSError(ctypes.get_errno(), "mprotect failed")
    offset = data_pages * PAGE - nbytes
    t = torch.frombuffer(mm, dtype=x.dtype, count=x.numel(), offset=offset).view(x.shape)
    t.copy_(x)
    _keep.append(mm)
    return t


def cases(backend):
    import contrastive_kernels as ck
    g = torch.Generator().manual_seed(0)
    dtypes = [torch.float32, torch.float64]
    if backend == "cuda":
        dtypes += [torch.float16, torch.bfloat16]
    # tails in every dimension; D = 37 and 3 leave a partial SIMD vector / chunk per row
    shapes = [(70, 131, 37), (5, 9, 3), (1, 1, 1)] if backend != "triton" else [(9, 13, 5)]
    for dtype in dtypes:
        for n, m, d in shapes:
            q = guarded(torch.randn(n, d, generator=g).to(dtype)).requires_grad_()
            k = guarded(torch.randn(m, d, generator=g).to(dtype)).requires_grad_()
            idx = guarded(torch.randint(0, m, (n,), generator=g))
            lab = guarded(torch.randint(0, 3, (n,), generator=g))
            klab = guarded(torch.randint(0, 3, (m,), generator=g))
            calls = {
                "info_nce symmetric": lambda: ck.info_nce(
                    q, k, positive_index=idx, symmetric=True, backend=backend),
                "info_nce labels": lambda: ck.info_nce(
                    q, k, labels=lab, key_labels=klab, backend=backend),
                "info_nce self": lambda: ck.info_nce(
                    q, labels=lab, backend=backend),
                "siglip passes=3": lambda: ck.siglip_loss(
                    q, k, positive_index=idx, backend=backend, passes=3),
                "siglip passes=4": lambda: ck.siglip_loss(
                    q, k, labels=lab, key_labels=klab, backend=backend, passes=4),
            }
            if backend == "triton":     # the blocked algorithm, both tile sources
                for algo in ("blocked", "epilogue"):
                    calls[f"info_nce symmetric {algo}"] = lambda a=algo: ck.info_nce(
                        q, k, positive_index=idx, symmetric=True, backend=backend, algorithm=a)
                    calls[f"siglip passes=3 {algo}"] = lambda a=algo: ck.siglip_loss(
                        q, k, positive_index=idx, backend=backend, passes=3, algorithm=a)
            if backend == "cpu":
                calls["info_nce margin"] = lambda: ck.info_nce(
                    q, k, positive_index=idx, margin=0.2, symmetric=True, backend=backend)
            for name, call in calls.items():
                loss = call()
                loss.backward()
                assert torch.isfinite(loss), (name, float(loss))
                q.grad = k.grad = None
                print(f"{backend} {dtype} {n}x{m}x{d} {name}: ok", flush=True)


def main():
    backend = sys.argv[1]
    if len(sys.argv) > 2 and sys.argv[2] == "selftest":
        t = guarded(torch.arange(10, dtype=torch.float32))
        print("reading past the end ...", flush=True)
        ptr = ctypes.cast(t.data_ptr(), ctypes.POINTER(ctypes.c_float))
        print(ptr[10])          # one past the end: SIGSEGV
        return
    if backend == "cuda":       # the CUDA kernels, emulated on the CPU
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import cuda_emu
        from contrastive_kernels import backends
        why = cuda_emu.build()
        if why:
            raise SystemExit(f"cuda emulator: {why}")
        cuda_emu.install(backends.REGISTRY)
    cases(backend)
    print("ok")


if __name__ == "__main__":
    main()
