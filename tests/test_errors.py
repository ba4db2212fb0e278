"""Bad input: a clear ValueError/TypeError naming the argument, before any kernel runs."""
import math

import pytest
import torch

import contrastive_kernels as ck
from contrastive_kernels import backends
from conftest import DEVICE


@pytest.fixture(autouse=True)
def no_kernel_may_run(monkeypatch):
    """Every backend's kernels raise if called: errors must come before them."""
    def boom(*args, **kwargs):
        raise AssertionError("a kernel ran before the input was rejected")
    for be in backends.REGISTRY.by_name.values():
        monkeypatch.setattr(be, "lse_forward", boom)


def q_(n=4, d=3, dtype=torch.float32):
    return torch.randn(n, d, dtype=dtype, device=DEVICE)


BAD = [
    # (description, kwargs for info_nce, error type, message pattern)
    ("query not a tensor", dict(query=[[1.0]]), TypeError, "query must be a torch.Tensor"),
    ("query rank 1", dict(query=torch.randn(4)), ValueError, r"query must be 2-D"),
    ("query rank 3", dict(query=torch.randn(2, 3, 4)), ValueError, r"query must be 2-D"),
    ("key rank 1", dict(key=torch.randn(4)), ValueError, r"key must be 2-D"),
    ("N = 0", dict(query=torch.randn(0, 3)), ValueError, r"query must have at least one row"),
    ("M = 0", dict(key=torch.randn(0, 3)), ValueError, r"key must have at least one row"),
    ("D = 0", dict(query=torch.randn(4, 0), key=torch.randn(4, 0)), ValueError, r"non-zero embedding dim"),
    ("D mismatch", dict(key=torch.randn(4, 5)), ValueError, r"key has embedding dim 5 but query has 3"),
    ("dtype mismatch", dict(key=torch.randn(4, 3, dtype=torch.float64)), TypeError, r"key has dtype torch.float64"),
    ("integer query", dict(query=torch.ones(4, 3, dtype=torch.long), key=None), TypeError, r"query must be float16"),
    ("positive_index float", dict(positive_index=torch.zeros(4)), TypeError, r"positive_index must be an integer tensor"),
    ("positive_index list", dict(positive_index=[0, 1, 2, 3]), TypeError, r"positive_index must be an integer torch.Tensor"),
    ("positive_index too big", dict(positive_index=torch.tensor([0, 1, 2, 4])), ValueError, r"positive_index values must be in \[0, 4\)"),
    ("positive_index negative", dict(positive_index=torch.tensor([0, -1, 2, 3])), ValueError, r"positive_index values must be in"),
    ("positive_index length", dict(positive_index=torch.tensor([0, 1])), ValueError, r"positive_index must have shape \(4,\)"),
    ("positive_index self", dict(key=None, positive_index=torch.tensor([1, 1, 3, 2])), ValueError, r"must not point a query at itself"),
    ("both targets", dict(positive_index=torch.arange(4), labels=torch.arange(4)), ValueError, r"either positive_index or labels"),
    ("labels length", dict(labels=torch.arange(3)), ValueError, r"labels must have shape \(4,\)"),
    ("labels float", dict(labels=torch.zeros(4)), TypeError, r"labels must be an integer tensor"),
    ("key_labels length", dict(key=torch.randn(6, 3), labels=torch.arange(4), key_labels=torch.arange(5)), ValueError, r"key_labels must have shape \(6,\)"),
    ("key_labels missing", dict(key=torch.randn(6, 3), labels=torch.arange(4)), ValueError, r"key_labels is required"),
    ("key_labels alone", dict(key_labels=torch.arange(4)), ValueError, r"key_labels needs labels"),
    ("key_labels self", dict(key=None, labels=torch.arange(4), key_labels=torch.arange(4)), ValueError, r"key_labels must be None when key is None"),
    ("temperature 0", dict(temperature=0.0), ValueError, r"temperature must be > 0"),
    ("temperature < 0", dict(temperature=-0.1), ValueError, r"temperature must be > 0"),
    ("temperature nan", dict(temperature=math.nan), ValueError, r"temperature must be finite"),
    ("temperature inf", dict(temperature=math.inf), ValueError, r"temperature must be finite"),
    ("temperature tensor nan", dict(temperature=torch.tensor(math.nan)), ValueError, r"temperature must be finite"),
    ("temperature string", dict(temperature="0.1"), TypeError, r"temperature must be a float"),
    ("logit_scale 0", dict(logit_scale=0.0), ValueError, r"logit_scale must be > 0"),
    ("logit_scale inf tensor", dict(logit_scale=torch.tensor(math.inf)), ValueError, r"logit_scale must be finite"),
    ("logit_scale vector", dict(logit_scale=torch.ones(2)), ValueError, r"logit_scale must be a float, a 0-dim tensor or a tensor of shape"),
    ("logit_bias nan", dict(logit_bias=math.nan), ValueError, r"logit_bias must be finite"),
    ("logit_bias bool", dict(logit_bias=True), TypeError, r"logit_bias must be a float or a 0-dim tensor, got bool"),
    ("symmetric M < N, default index", dict(key=torch.randn(2, 3), symmetric=True), ValueError, r"needs key rows >= query rows"),
    ("fewer keys than queries", dict(key=torch.randn(2, 3)), ValueError, r"needs key rows >= query rows"),
    ("odd NT-Xent", dict(query=torch.randn(5, 3), key=None), ValueError, r"needs an even number of query rows"),
    ("reduction", dict(reduction="avg"), ValueError, r"reduction must be one of"),
    ("label_smoothing 1", dict(label_smoothing=1.0), ValueError, r"label_smoothing must be in \[0, 1\)"),
    ("label_smoothing negative", dict(label_smoothing=-0.1), ValueError, r"label_smoothing must be in"),
    ("symmetric not bool", dict(symmetric=1), TypeError, r"symmetric must be a bool"),
    ("normalize not bool", dict(normalize=1), TypeError, r"normalize must be a bool, got int"),
    ("normalize None", dict(normalize=None), TypeError, r"normalize must be a bool, got NoneType"),
    ("normalize string", dict(normalize="l2", key=None), TypeError, r"normalize must be a bool, got str"),
    ("temperature and logit_scale", dict(temperature=0.1, logit_scale=10.0), ValueError, r"either temperature or logit_scale, not both"),
    ("logit_scale overflows float32", dict(logit_scale=1e39), ValueError, r"logit_scale must be finite"),
    ("temperature reciprocal overflows", dict(temperature=1e-39), ValueError, r"temperature must be > 0 with a finite reciprocal"),
    ("logit_scale fp64 tensor overflows float32", dict(logit_scale=torch.tensor(1e39, dtype=torch.float64)), ValueError, r"logit_scale must be finite in float32"),
    ("logit_bias overflows float32", dict(logit_bias=-1e39), ValueError, r"logit_bias must be finite in float32"),
    ("logit_bias fp64 tensor overflows float32", dict(logit_bias=torch.tensor(1e39, dtype=torch.float64)), ValueError, r"logit_bias must be finite in float32"),
    ("temperature fp64 tensor reciprocal overflows", dict(temperature=torch.tensor(1e-39, dtype=torch.float64)), ValueError, r"temperature must be > 0 with a finite reciprocal in float32"),
    ("temperature int beyond float", dict(temperature=10**400), ValueError, r"temperature must be finite, got an integer of 401 digits"),
    ("logit_scale int beyond float", dict(logit_scale=10**400), ValueError, r"logit_scale must be finite"),
    ("logit_bias int beyond float", dict(logit_bias=-10**400), ValueError, r"logit_bias must be finite"),
    ("margin int beyond float", dict(margin=10**400), ValueError, r"margin must be finite"),
    ("per-row logit_scale overflows float32", dict(logit_scale=torch.tensor([7.0, 1e39, 7.0, 7.0], dtype=torch.float64)), ValueError, r"logit_scale must be finite in float32"),
    ("per-row temperature reciprocal overflows", dict(temperature=torch.tensor([0.1, 1e-39, 0.1, 0.1], dtype=torch.float64)), ValueError, r"temperature must be > 0 with a finite reciprocal in float32"),
    ("sparse query", dict(query=torch.randn(4, 3).to_sparse()), TypeError, r"query must be a dense \(strided\) tensor.*to_dense"),
    ("sparse key", dict(key=torch.randn(4, 3).to_sparse()), TypeError, r"key must be a dense \(strided\) tensor"),
    ("sparse labels", dict(labels=torch.arange(4).to_sparse()), TypeError, r"labels must be a dense \(strided\) tensor"),
    ("unknown backend", dict(backend="cudnn"), ValueError, r"backend must be 'auto' or one of .*available on"),
    ("backend not a string", dict(backend=None), TypeError, r"backend must be a string"),
]


@pytest.mark.parametrize("desc,kwargs,exc,pattern", BAD, ids=[b[0] for b in BAD])
def test_bad_input(desc, kwargs, exc, pattern):
    kwargs = dict(kwargs)
    query = kwargs.pop("query", q_())
    key = kwargs.pop("key", q_())
    query = query.to(DEVICE) if torch.is_tensor(query) else query
    key = key.to(DEVICE) if torch.is_tensor(key) else key
    kwargs = {k: (v.to(DEVICE) if torch.is_tensor(v) else v) for k, v in kwargs.items()}
    with pytest.raises(exc, match=pattern):
        ck.info_nce(query, key, **kwargs)
    # The reference checks the same way (it ignores `backend`).
    if "backend" not in kwargs:
        with pytest.raises(exc, match=pattern):
            ck.reference.info_nce(query, key, **kwargs)


@pytest.mark.parametrize("timeout", [10**400, -10**400, float("inf"), 0, 5e-4, 1e-7])
def test_distributed_timeout_out_of_range(timeout):
    """Beyond the float range, or under torch.distributed's 1 ms (0 ms: no timeout)."""
    import datetime
    from contrastive_kernels.faults import check_timeout
    with pytest.raises(ValueError, match="timeout must be (finite and > 0|at least 0.001)"):
        check_timeout(timeout)
    if timeout == 5e-4:
        with pytest.raises(ValueError, match="at least 0.001 seconds"):
            check_timeout(datetime.timedelta(microseconds=500))
        assert check_timeout(1e-3) == datetime.timedelta(milliseconds=1)


def test_half_temperature_whose_reciprocal_overflows():
    """1e-5 is a float16 number, but 1 / 1e-5 is not: the scale would be inf (NaN loss)."""
    t = torch.tensor(1e-5, dtype=torch.float16)      # on the CPU: its value is read
    with pytest.raises(ValueError, match=r"finite reciprocal in torch.float16"):
        ck.info_nce(q_(), q_(), temperature=t)
    with pytest.raises(ValueError, match=r"finite reciprocal in torch.float16"):
        ck.reference.info_nce(q_(), q_(), temperature=t)


def test_mixed_devices():
    q = torch.randn(4, 3)
    k = torch.randn(4, 3, device="meta")
    with pytest.raises(ValueError, match=r"key is on meta but query is on cpu"):
        ck.info_nce(q, k)
    with pytest.raises(ValueError, match=r"labels is on meta"):
        ck.info_nce(q, q, labels=torch.arange(4, device="meta"))
    for name in ("logit_scale", "logit_bias"):
        with pytest.raises(ValueError, match=f"{name} is on meta but query is on cpu"):
            ck.info_nce(q, q, **{name: torch.tensor(1.0, device="meta")})
        with pytest.raises(ValueError, match=f"{name} is on meta but query is on cpu"):
            ck.siglip_loss(q, q, **{name: torch.tensor(1.0, device="meta")})


def test_backend_unable_to_serve_names_available():
    q = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"backend 'cuda' cannot run this call on cpu.*Available "
                                         r"for this call: \['cpu'"):
        ck.info_nce(q, q, backend="cuda")


def test_module_rejects_bad_distributed():
    with pytest.raises(ValueError, match=r"distributed must be None, 'ring' or 'gather'"):
        ck.FusedInfoNCE(distributed="allgather")
