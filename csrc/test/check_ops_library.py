"""ctest: load the CMake-built ops library and check its ops against plain torch."""
import sys

import torch

torch.ops.load_library(sys.argv[1])
ops = torch.ops.contrastive_kernels
torch.manual_seed(0)
q = torch.randn(37, 19, dtype=torch.float64)
k = torch.randn(301, 19, dtype=torch.float64)
s = 2.5
lse_r, lse_c = ops.lse_forward(q, k, s, False, True)
S = s * q @ k.T
assert torch.allclose(lse_r, S.logsumexp(1), rtol=1e-12), "lse rows"
assert torch.allclose(lse_c, S.logsumexp(0), rtol=1e-12), "lse cols"
g_r, g_c = torch.rand(37, dtype=torch.float64), torch.rand(301, dtype=torch.float64)
dq, dk = ops.lse_backward(q, k, s, False, lse_r, lse_c, g_r, g_c)
dS = g_r[:, None] * torch.softmax(S, 1) + g_c[None, :] * torch.softmax(S, 0)
assert torch.allclose(dq, dS @ k, rtol=1e-10), "dq"
assert torch.allclose(dk, dS.T @ q, rtol=1e-10), "dk"
d_r, d_c = ops.dense_lse(S, True)
assert torch.allclose(d_r, S.logsumexp(1), rtol=1e-12), "dense lse rows"
assert torch.allclose(d_c, S.logsumexp(0), rtol=1e-12), "dense lse cols"
assert torch.allclose(ops.dense_grad(S, d_r, g_r, d_c, g_c, 0.5, False), 0.5 * dS,
                      rtol=1e-10), "dense grad"
Z = S.clone()
rid = torch.arange(37, dtype=torch.int32)            # the diagonal: key i is row i's positive
cid = torch.arange(301, dtype=torch.int32)
y = torch.where(rid[:, None] == cid[None, :], 1.0, -1.0).double()
r, t = ops.dense_siglip(Z, -1.5, rid, cid)
D = torch.sigmoid(S - 1.5) - (y > 0).double()
assert torch.allclose(r, -torch.nn.functional.logsigmoid(y * (S - 1.5)).sum(1), rtol=1e-12), \
    "dense siglip losses"
assert torch.allclose(t, D.sum(1), rtol=1e-12), "dense siglip bias derivatives"
assert torch.allclose(Z, D, rtol=1e-12), "dense siglip in place"
print("ops library: forward and backward match torch")
