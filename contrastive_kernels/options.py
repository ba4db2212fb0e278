"""Kernel options: the keyword arguments of the public API that change results or memory.

    info_nce(q, k, ..., backend="auto", deterministic=None, precision=None,
             low_memory=None, algorithm=None, workspace=None)

  deterministic  True: the same bits on every run (no float atomics, no autotuning).
                 torch.use_deterministic_algorithms(True) turns it on as well.
  precision      "ieee" (default) or "tf32": float32 inputs may use TF32 tensor cores
                 (a permission: backends without TF32 compute in full float32).
  low_memory     True: the backward writes the final gradients in the input dtype,
                 without float32 N x D buffers (backends that declare "low_memory").
  algorithm      "auto", "fused" (the tiled kernels), "blocked" (cuBLAS GEMMs give blocks
                 of rows of S, a pass reads them) or "epilogue" (the same blocks, each
                 tile of S computed and used in one kernel, never stored); Triton only.
  workspace      bytes for the blocked algorithm's blocks (0: its default).

A value left None comes from the environment (read once, at import), else the default:
CK_DETERMINISTIC=1, CK_PRECISION=tf32, CK_LOW_MEMORY=1, CK_ALGORITHM=blocked|epilogue|fused,
CK_WORKSPACE=<bytes>. CK_LOW_MEMORY and CK_ALGORITHM are preferences: a call whose loss,
variant or backend cannot take them runs without them (`prefer`); passed as arguments,
they are requirements, and such a call raises.
"""
import dataclasses
import os
from typing import Any, Tuple

import torch

PRECISIONS = ("ieee", "tf32")
ALGORITHMS = ("auto", "fused", "blocked", "epilogue")


@dataclasses.dataclass(frozen=True)
class Options:
    """The kernel options of one call, checked and resolved (see `make_options`).

    The losses build it from their keyword arguments; pass those rather than an
    Options. The fields are the options of the module docstring, with their defaults.

    Args:
        deterministic: True: the same bits on every run (no float atomics, no
            autotuning).
        precision: "ieee" or "tf32" (float32 inputs may use TF32 tensor cores).
        low_memory: True: backward writes the gradients in the input dtype, without
            float32 N x D buffers (backends that support it).
        algorithm: "auto", "fused", "blocked" or "epilogue" (Triton only).
        workspace: bytes for the blocked algorithm's blocks (0: its default).

    Returns:
        An immutable (frozen) dataclass; `as_args()` gives the values in field order.

    Raises:
        TypeError: an unknown field (Options itself checks no value: `make_options`
            does).

    Example:
        >>> import contrastive_kernels as ck
        >>> opts = ck.Options(precision="tf32")
        >>> opts.precision, opts.as_args()
        ('tf32', (False, 'tf32', False, 'auto', 0))
    """
    deterministic: bool = False
    precision: str = "ieee"
    low_memory: bool = False
    algorithm: str = "auto"
    workspace: int = 0

    def as_args(self) -> Tuple[Any, ...]:
        """The values in field order (arguments of the custom ops)."""
        # not dataclasses.astuple: it deep-copies, which dynamo in torch 2.11 cannot trace
        return tuple(getattr(self, name) for name in NAMES)


NAMES = tuple(f.name for f in dataclasses.fields(Options))
DEFAULTS = Options()
# The options that need a backend feature (base.FEATURES) at some values: those values.
FEATURE_VALUES = {"low_memory": ("low_memory", (True,)),
                  "algorithm": ("blocked", ("blocked", "epilogue"))}


def needs_feature(options: Options, name: str) -> bool:
    """Whether option `name` of `options` asks for a feature some backends lack."""
    return getattr(options, name) in FEATURE_VALUES[name][1]


def prefer(options: Options, kwargs: dict, features, refused=()) -> Options:
    """`options` without the environment's CK_LOW_MEMORY / CK_ALGORITHM where the call
    cannot take them: the loss or variant refuses the option (`refused`: names), or its
    feature is not in `features()` (what the call's backend, or every backend "auto" may
    pick, declares; called only when needed). A value in `kwargs` (passed) is kept, and
    fails later if it cannot be served."""
    env = [n for n in FEATURE_VALUES if kwargs.get(n) is None and needs_feature(options, n)]
    if not env:
        return options
    have = features()
    drop = [n for n in env if n in refused or FEATURE_VALUES[n][0] not in have]
    return dataclasses.replace(options, **{n: getattr(DEFAULTS, n) for n in drop})


ENV_DEFAULTS = dict(
    deterministic=os.environ.get("CK_DETERMINISTIC", "0") == "1",
    precision=os.environ.get("CK_PRECISION", "ieee"),
    low_memory=os.environ.get("CK_LOW_MEMORY", "0") == "1",
    algorithm=os.environ.get("CK_ALGORITHM", "auto"),
    workspace=os.environ.get("CK_WORKSPACE", "0"),
)


def _flag(name, v):
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
    return v


def _choice(name, v, allowed):
    if not isinstance(v, str):
        raise TypeError(f"{name} must be a string, got {type(v).__name__}")
    if v not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {v!r}")
    return v


def _bytes(name, v):
    if isinstance(v, str):
        try:
            v = int(v)
        except ValueError:
            raise ValueError(f"{name} must be a number of bytes, got {v!r}") from None
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int (bytes), got {type(v).__name__}")
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    return v


def make_options(**kwargs: Any) -> Options:
    """Check and resolve the kernel options given as keyword arguments.

    A value that is None or absent comes from the environment (CK_DETERMINISTIC,
    CK_PRECISION, CK_LOW_MEMORY, CK_ALGORITHM, CK_WORKSPACE, read at import), else the
    default. torch.use_deterministic_algorithms(True) turns deterministic on as well.

    Args:
        **kwargs: any of deterministic (bool), precision ("ieee" or "tf32"),
            low_memory (bool), algorithm ("auto", "fused", "blocked" or "epilogue")
            and workspace (int bytes >= 0, or a string of digits).

    Returns:
        The resolved `Options`.

    Raises:
        TypeError: an unknown name (the message lists the known ones), or a value of
            the wrong type.
        ValueError: a value out of range (an unknown precision or algorithm, a
            negative workspace).

    Example:
        >>> import contrastive_kernels as ck
        >>> ck.make_options(precision="tf32", deterministic=True).precision
        'tf32'
        >>> ck.make_options(algorithm="fused").algorithm
        'fused'
    """
    if not kwargs:          # the defaults: resolved once (while they stay the same)
        key = (torch.are_deterministic_algorithms_enabled(), *ENV_DEFAULTS.values())
        if _DEFAULT[0] != key:
            _DEFAULT[:] = [key, _resolve({}, key[0])]
        return _DEFAULT[1]
    return _resolve(kwargs, torch.are_deterministic_algorithms_enabled())


_DEFAULT = [None, None]      # (its key, the Options of no keyword argument)


def _resolve(kwargs, torch_deterministic):
    unknown = sorted(set(kwargs) - set(NAMES))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {unknown}; the kernel options are "
                        f"{list(NAMES)}")
    v = {name: (ENV_DEFAULTS[name] if kwargs.get(name) is None else kwargs[name])
         for name in NAMES}
    return Options(
        deterministic=_flag("deterministic", v["deterministic"]) or torch_deterministic,
        precision=_choice("precision", v["precision"], PRECISIONS),
        low_memory=_flag("low_memory", v["low_memory"]),
        algorithm=_choice("algorithm", v["algorithm"], ALGORITHMS),
        workspace=_bytes("workspace", v["workspace"]))
