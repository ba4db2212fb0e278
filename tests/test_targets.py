"""The target terms (contrastive_kernels.targets.Targets) do O((N + M) * D) work in few ops.

Their values and gradients are checked against the reference in test_info_nce.py. Here:
on a GPU every op is a kernel launch of a few microseconds, so the host part must not
split a large problem into thousands of small pieces (an early version made ~21 000
ops at N = 65536, D = 768, more launch time than the fused kernels' own run).
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from contrastive_kernels.problem import check_inputs
from contrastive_kernels.targets import Targets

pytestmark = pytest.mark.cpu_only  # CI runs it; skipped under CK_TEST_DEVICE=cuda



class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


CASES = {"clip": dict(symmetric=True), "smoothing": dict(symmetric=True, label_smoothing=0.1),
         "supcon": dict(symmetric=True, labels="labels")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_target_terms_take_few_ops_at_large_sizes(case):
    n, d = 65536, 768
    kw = dict(CASES[case])
    labels = torch.arange(n) % 1000 if kw.pop("labels", None) else None
    q = torch.randn(n, d, dtype=torch.bfloat16)
    k = torch.randn(n, d, dtype=torch.bfloat16)
    p = check_inputs(q, k, None, labels, None, 0.07, None, None, kw["symmetric"],
                     kw.get("label_smoothing", 0.0), "mean")
    g = torch.randn(n)
    dq, dk = torch.zeros(n, d), torch.zeros(n, d)
    eps = p.label_smoothing
    with _CountOps() as c:
        t = Targets(n, d, n, p.labels, p.positive_index if p.labels is None else None, eps,
                    p.symmetric)
        b = t.block(n, False, p.key_labels, 0)
        t.stats(b, q, k, torch.float32)
        t.add_grads(b, q, k, g, g, g, g, dq, dk)
    assert c.ops <= 1500, f"{case}: {c.ops} ops for the target terms of one step"
