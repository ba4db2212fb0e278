"""Smoke test of an installed contrastive_kernels (the wheel or the sdist, in a fresh venv):
run from outside the source tree by .ci/package.sh. Not collected by pytest."""
import os
import sys

import torch

import contrastive_kernels as ck

here = os.path.dirname(os.path.abspath(ck.__file__))
assert "site-packages" in here, f"imported from {here}, not from the installed package"
assert os.path.exists(os.path.join(here, "py.typed")), "py.typed is missing"
assert os.path.exists(os.path.join(here, "_build_info.py")), "_build_info.py is missing"
assert ck.extension.COMPILED_TORCH == str(torch.__version__), (
    f"compiled against torch {ck.extension.COMPILED_TORCH}, running {torch.__version__}")
assert ck.extension.loaded(), f"the C++ extension did not load: {ck.extension.LOAD_ERROR}"
assert "cpu" in ck.available_backends(torch.device("cpu"))

torch.manual_seed(0)
q = torch.randn(37, 24, requires_grad=True)
k = torch.randn(41, 24, requires_grad=True)
for loss_fn, ref_fn in ((ck.info_nce, ck.reference.info_nce),
                        (ck.siglip_loss, ck.reference.siglip_loss)):
    got = loss_fn(q, k, backend="cpu")
    gq, gk = torch.autograd.grad(got, (q, k))
    want = ref_fn(q.double(), k.double())
    wq, wk = torch.autograd.grad(want, (q, k))   # q, k enter the reference as float64 views
    got, want = got.detach(), want.detach()
    assert abs(float(got) - float(want)) <= 1e-5 * max(1.0, abs(float(want))), (got, want)
    for a, b in ((gq, wq), (gk, wk)):
        assert (a.double() - b).abs().max() <= 1e-4 * b.abs().max(), "gradient mismatch"
print(f"package smoke test passed: {ck.__name__} from {here}, torch {torch.__version__}, "
      f"python {sys.version.split()[0]}")
