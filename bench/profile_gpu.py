"""The CUDA kernels of one symmetric CLIP step (bf16) of the Triton backend as `auto`
runs it, by total GPU time (torch.profiler).

    python bench/profile_gpu.py [--n 32768] [--d 768] [--top 10]
"""
import argparse

import torch
import torch.nn.functional as F


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--top", type=int, default=10)
    a = ap.parse_args(argv)
    import contrastive_kernels as ck
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k = (F.normalize(torch.randn(a.n, a.d, device="cuda", generator=g), dim=1).bfloat16()
            .requires_grad_() for _ in range(2))

    def step():
        loss = ck.info_nce(q, k, temperature=0.07, symmetric=True, backend="triton")
        return torch.autograd.grad(loss, (q, k))

    step()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        step()
        torch.cuda.synchronize()
    print(f"# N={a.n} D={a.d} bf16, one step of backend='triton'")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=a.top,
                                    max_name_column_width=60))


if __name__ == "__main__":
    main()
