"""Gradient caching: a contrastive step over a batch larger than the encoders' activations fit.

    gc = GradCache(encoders, loss_fn, chunk_size, get_embedding=None, scaler=None)
    loss = gc(*inputs, **loss_kwargs)   # the loss (detached); every parameter's .grad is filled

Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup". A step runs in three stages:

1. Every input is encoded chunk by chunk without a graph (torch.no_grad), encoder by
   encoder, in order; the embeddings are kept (N x D each), the activations are not.
2. loss_fn(*embeddings, **loss_kwargs) runs on the whole batch and is backwarded: its
   own parameters (a learnable logit_scale) get their gradients, the embeddings get
   theirs (the cache). A collective loss (ck.ring_info_nce) runs its backward here, on
   every rank, before any re-forward.
3. Every chunk is encoded again, with a graph, and backwarded with its slice of the
   cached gradient, one chunk at a time.

So the parameters' .grad gain exactly what
loss_fn(*[enc(x) for enc, x in zip(encoders, inputs)], **loss_kwargs).backward() would add
(two calls accumulate, like .backward()), and the peak activation memory is one chunk's
plus the embeddings. Chunking never changes the loss value.

Inputs. One per encoder (a single encoder serves every input; the same module may
appear twice, a shared tower). Each input is a tensor, or a Mapping (dict, a tokenizer's
BatchEncoding), list or tuple whose tensors are split along dim 0. The batch size of an
input is the largest dim 0 among its tensors of at least one dimension; tensors of that
dim 0 are split, tensors with dim 0 == 1 (broadcast, such as position_ids (1, L)),
0-dim tensors and non-tensor values are passed to every chunk unchanged. Any other dim 0
is an error (ValueError naming the input). Values are not searched recursively.

A chunk goes to its encoder as ONE positional argument of the input's type, as
sentence-transformers calls model(features): a tensor, a Mapping rebuilt with its type
(type(x)(dict); a plain dict when that fails), a list, a tuple (or namedtuple). An
encoder that takes several arguments needs a small wrapper module.

The encoder's output goes through get_embedding (default: identity, e.g.
lambda out: out["sentence_embedding"]); it must be a floating tensor with one row per
chunk row, the same trailing shape and dtype for every chunk.

Randomness (dropout; torch's default generators, not Python's or NumPy's). Before each
chunk of stage 1 the CPU RNG state is recorded (and, when CUDA is initialized, the CUDA
RNG states of the devices in use: the inputs', the encoders' and the current one);
stage 3 restores it before the chunk's re-forward, so the dropout masks are the same.
Under a fixed seed a step equals encoding the same chunks one after another with
gradients. After the call the RNG state is what it was
after stages 1 and 2, as if every chunk had been encoded once.

Autocast. Both passes and the loss run in the caller's autocast state.

scaler (torch.amp.GradScaler): stage 2 backwards scaler.scale(loss), so the cached
gradients, and through them every parameter's gradient, are scaled, as with
scaler.scale(loss).backward() on the whole batch. Then scaler.step(opt) as usual.

DDP. An encoder with a no_sync() method (DistributedDataParallel, FSDP) re-forwards and
backwards every chunk but its last inside no_sync(), so its gradients are all-reduced
once per step, not once per chunk. A shared tower (the same module for two inputs)
syncs only on its very last chunk overall. The loss's backward (collective for
ck.ring_info_nce) runs on every rank before any re-forward. Keep the local batch sizes
equal across ranks: DDP may broadcast buffers at a forward, a collective, so every rank
should make the same number of encoder calls.

Not supported: modules whose forward changes state besides the RNG (BatchNorm's running
statistics are updated twice per chunk, and its batch statistics are a chunk's, not the
batch's).

Skipped work: an embedding that the loss does not use gets no re-forward (its encoder
no gradient from it). A module with no parameter requiring grad, on an input with no
tensor requiring grad (a locked tower, LiT), gives an embedding that needs no gradient
(the fused losses then skip its gradient) and gets no re-forward.
"""
import collections.abc
import contextlib
from typing import Any, Callable, Optional, Sequence, Union

import torch

__all__ = ["GradCache"]


class GradCache:
    """A contrastive training step over a batch larger than the encoders' activations fit.

    `GradCache(encoders, loss_fn, chunk_size)(*inputs, **loss_kwargs)` fills every
    parameter's .grad with what
    loss_fn(*[enc(x) for enc, x in zip(encoders, inputs)], **loss_kwargs).backward()
    would add, while the encoders see at most `chunk_size` rows at a time (gradient
    caching, Gao et al. 2021). It encodes every chunk without a graph, runs loss_fn and
    its backward on the whole batch (caching the embeddings' gradients), then encodes
    each chunk again with a graph and backwards its slice of the cache. Dropout masks
    are replayed (the RNG state is restored per chunk); an encoder with no_sync() (DDP)
    syncs once per step. See the module docstring (contrastive_kernels.gradcache) for
    the full contract: input types, autocast, GradScaler, DDP and what is not supported.

    Args:
        encoders: a module (any callable), used for every input, or a list or tuple of
            them, one per input (the same module may appear twice: a shared tower).
        loss_fn: called as loss_fn(*embeddings, **loss_kwargs); returns a scalar tensor
            (e.g. a `FusedInfoNCE` module).
        chunk_size: rows per encoder call, an int > 0.
        get_embedding: maps an encoder's output to its embedding tensor (default: the
            output itself), e.g. lambda out: out["sentence_embedding"].
        scaler: a torch.amp.GradScaler: the cached gradients are those of
            scaler.scale(loss); then call scaler.step(optimizer) as usual.

    Returns:
        Calling the object runs one step and returns the loss, see `GradCache.__call__`.

    Raises:
        TypeError: an encoder, `loss_fn` or `get_embedding` not callable, `chunk_size`
            not an int, or `scaler` without a scale() method.
        ValueError: an empty list of encoders, or `chunk_size` <= 0.

    Example:
        >>> import torch, contrastive_kernels as ck
        >>> image_enc, text_enc = torch.nn.Linear(12, 8), torch.nn.Linear(10, 8)
        >>> images, texts = torch.randn(16, 12), torch.randn(16, 10)
        >>> step = ck.GradCache([image_enc, text_enc], ck.FusedInfoNCE(), chunk_size=4)
        >>> loss = step(images, texts)           # encoders see 4 rows at a time
        >>> loss.shape, loss.requires_grad
        (torch.Size([]), False)
        >>> cached = image_enc.weight.grad.clone()
        >>> image_enc.weight.grad = None
        >>> ck.FusedInfoNCE()(image_enc(images), text_enc(texts)).backward()   # whole batch
        >>> torch.allclose(image_enc.weight.grad, cached, atol=1e-5)
        True
    """

    def __init__(self, encoders: Union[Callable[..., Any], Sequence[Callable[..., Any]]],
                 loss_fn: Callable[..., torch.Tensor], chunk_size: int, *,
                 get_embedding: Optional[Callable[[Any], torch.Tensor]] = None,
                 scaler: Optional[Any] = None) -> None:
        if isinstance(encoders, (list, tuple)):
            if not encoders:
                raise ValueError("encoders must not be empty")
            for i, enc in enumerate(encoders):
                if not callable(enc):
                    raise TypeError(f"encoders[{i}] must be a module (callable), "
                                    f"got {type(enc).__name__}")
            self.encoders = list(encoders)
            self.single = False
        elif callable(encoders):
            self.encoders = [encoders]
            self.single = True
        else:
            raise TypeError(f"encoders must be a module or a list of modules, "
                            f"got {type(encoders).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__}")
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        if get_embedding is not None and not callable(get_embedding):
            raise TypeError(f"get_embedding must be callable or None, "
                            f"got {type(get_embedding).__name__}")
        if scaler is not None and not callable(getattr(scaler, "scale", None)):
            raise TypeError(f"scaler must be a torch.amp.GradScaler or None, "
                            f"got {type(scaler).__name__}")
        self.loss_fn = loss_fn
        self.chunk_size = chunk_size
        self.get_embedding = get_embedding
        self.scaler = scaler

    def __repr__(self):
        return (f"GradCache(encoders={len(self.encoders)}, chunk_size={self.chunk_size}, "
                f"scaler={self.scaler is not None})")

    def __call__(self, *inputs: Any, **loss_kwargs: Any) -> torch.Tensor:
        """Run one gradient-cached step: encode, loss and backward, chunk by chunk.

        Args:
            *inputs: one input per encoder (a single encoder serves every input): a
                tensor, or a Mapping (dict, a tokenizer's BatchEncoding), list or tuple
                whose tensors are split along dim 0. Tensors whose dim 0 is the batch
                size are split; those with dim 0 == 1, 0-dim tensors and other values go
                to every chunk unchanged. Each chunk is passed to its encoder as one
                positional argument of the input's type.
            **loss_kwargs: passed to loss_fn (e.g. logit_scale=model.logit_scale.exp()).

        Returns:
            The loss on the whole batch, detached (0-dim or one element). The gradients
            are accumulated into the parameters' .grad (and into those of loss_fn's
            arguments), as a .backward() call would.

        Raises:
            TypeError: an input that is not a tensor, Mapping, list or tuple, or holds
                no batched tensor; an encoder output (after get_embedding) that is not a
                floating tensor; or loss_fn returning a non-tensor.
            ValueError: no input, not one input per encoder, an inconsistent or empty
                batch, an embedding without one row per input row or whose shape or
                dtype differs between chunks, a non-scalar loss, or a loss with no
                gradient.
            RuntimeError: a re-forward giving another shape than the first pass.

        Example:
            >>> import torch, contrastive_kernels as ck
            >>> enc = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Dropout(0.1))
            >>> step = ck.GradCache(enc, ck.FusedInfoNCE(symmetric=False), chunk_size=3)
            >>> views = torch.randn(8, 6)     # NT-Xent: two views of 4 samples, stacked
            >>> scale = torch.tensor(1.0, requires_grad=True)
            >>> loss = step(views, logit_scale=scale.exp())
            >>> bool(torch.isfinite(loss)), enc[0].weight.grad.shape, scale.grad.shape
            (True, torch.Size([8, 6]), torch.Size([]))
        """
        if not inputs:
            raise ValueError("GradCache needs at least one input")
        if self.single:
            encoders = self.encoders * len(inputs)
        elif len(self.encoders) != len(inputs):
            raise ValueError(f"got {len(inputs)} inputs for {len(self.encoders)} encoders; "
                             f"pass one input per encoder")
        else:
            encoders = self.encoders
        splits = [_Split(x, i) for i, x in enumerate(inputs)]
        devices = _cuda_devices(inputs, encoders)

        # stage 1: embeddings without a graph, RNG state recorded per chunk
        states, embs = [], []
        with torch.no_grad():
            for i, (enc, sp) in enumerate(zip(encoders, splits)):
                emb, st = None, []
                for start, stop in sp.bounds(self.chunk_size):
                    st.append(_rng_state(devices))
                    out = self._embed(enc, sp.chunk(start, stop), stop - start, i)
                    if emb is None:
                        emb = out.new_empty((sp.rows,) + out.shape[1:])
                    elif out.shape[1:] != emb.shape[1:] or out.dtype != emb.dtype:
                        raise ValueError(
                            f"get_embedding: input {i}'s chunks gave embeddings of shapes "
                            f"{tuple(emb.shape[1:])} and {tuple(out.shape[1:])} (dtypes "
                            f"{emb.dtype}, {out.dtype}) after the row dimension")
                    emb[start:stop] = out
                    del out
                states.append(st)
                embs.append(emb.requires_grad_(_trainable(enc, sp.x)))

        # stage 2: the loss on the whole batch; its backward caches the embeddings' gradients
        loss = self.loss_fn(*embs, **loss_kwargs)
        if not torch.is_tensor(loss):
            raise TypeError(f"loss_fn must return a tensor, got {type(loss).__name__}")
        if loss.numel() != 1:
            raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
        if not loss.requires_grad:
            raise ValueError("loss_fn's result has no gradient (it depends on no trainable "
                             "embedding or parameter)")
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        grads = [e.grad for e in embs]
        del embs
        after = _rng_state(devices)

        # stage 3: re-forward each chunk with its RNG state and backward its slice; an
        # encoder with no_sync() syncs only on its last chunk
        plan = [(i, start, stop) for i, sp in enumerate(splits) if grads[i] is not None
                for start, stop in sp.bounds(self.chunk_size)]
        last = {}
        for n, (i, _, _) in enumerate(plan):
            last[id(encoders[i])] = n
        try:
            for n, (i, start, stop) in enumerate(plan):
                enc = encoders[i]
                _set_rng_state(states[i][start // self.chunk_size], devices)
                sync = last[id(enc)] == n or not hasattr(enc, "no_sync")
                with contextlib.nullcontext() if sync else enc.no_sync():
                    out = self._embed(enc, splits[i].chunk(start, stop), stop - start, i)
                    if not out.requires_grad:       # nothing to train through it
                        continue
                    g = grads[i][start:stop]
                    if out.shape != g.shape:
                        raise RuntimeError(f"input {i}: the re-forward of rows {start}:{stop} "
                                           f"gave shape {tuple(out.shape)}, the first pass "
                                           f"{tuple(g.shape)}")
                    out.backward(g.to(out.dtype))
                    del out, g
        finally:
            _set_rng_state(after, devices)
        return loss.detach()

    def _embed(self, enc, chunk, rows, i):
        out = enc(chunk)
        if self.get_embedding is not None:
            out = self.get_embedding(out)
        if not torch.is_tensor(out):
            raise TypeError(f"get_embedding: encoder {i}'s output must be (or map to) a "
                            f"tensor, got {type(out).__name__}; pass get_embedding=")
        if not out.is_floating_point():
            raise TypeError(f"get_embedding: encoder {i}'s embedding must be floating point, "
                            f"got {out.dtype}")
        if out.dim() == 0 or out.shape[0] != rows:
            raise ValueError(f"get_embedding: encoder {i} gave an embedding of shape "
                             f"{tuple(out.shape)} for a chunk of {rows} rows; it needs one "
                             f"row per input row")
        return out


class _Split:
    """One input, validated: its batch size and how to cut a chunk of it."""

    def __init__(self, x, i):
        self.x = x
        if torch.is_tensor(x):
            if x.dim() == 0:
                raise ValueError(f"input {i} is a 0-dim tensor; it needs a batch dimension")
            self.kind, items = "tensor", [("", x)]
        elif isinstance(x, collections.abc.Mapping):
            self.kind, items = "mapping", [(f"[{k!r}]", v) for k, v in x.items()]
        elif isinstance(x, (list, tuple)):
            self.kind, items = "sequence", [(f"[{j}]", v) for j, v in enumerate(x)]
        else:
            raise TypeError(f"input {i} must be a tensor, a Mapping, a list or a tuple, "
                            f"got {type(x).__name__}")
        dims = {name: v.shape[0] for name, v in items if torch.is_tensor(v) and v.dim() > 0}
        if not dims:
            raise TypeError(f"input {i} holds no tensor with a batch dimension")
        self.rows = max(dims.values())
        for name, d in dims.items():
            if d != self.rows and d != 1:
                raise ValueError(f"input {i}{name} has {d} rows where input {i} has "
                                 f"{self.rows}: inconsistent batch size")
        if self.rows == 0:
            raise ValueError(f"input {i} is an empty batch")

    def bounds(self, size):
        return [(s, min(s + size, self.rows)) for s in range(0, self.rows, size)]

    def cut(self, v, start, stop):
        if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == self.rows:
            return v[start:stop]
        return v

    def chunk(self, start, stop):
        x = self.x
        if self.kind == "tensor":
            return x[start:stop]
        if self.kind == "mapping":
            d = {k: self.cut(v, start, stop) for k, v in x.items()}
            if type(x) is dict:
                return d
            try:
                return type(x)(d)
            except Exception:
                return d
        items = [self.cut(v, start, stop) for v in x]
        if hasattr(x, "_fields"):       # namedtuple
            return type(x)(*items)
        return type(x)(items)


def _trainable(enc, x):
    """False for a module with no parameter requiring grad on an input with no tensor
    requiring grad (a locked tower): its embedding then needs no gradient."""
    if not isinstance(enc, torch.nn.Module) or any(p.requires_grad for p in enc.parameters()):
        return True
    vals = x.values() if isinstance(x, collections.abc.Mapping) else (
        x if isinstance(x, (list, tuple)) else [x])
    return any(torch.is_tensor(v) and v.requires_grad for v in vals)


def _cuda_devices(inputs, encoders):
    """CUDA device indices whose RNG the step may use (none unless CUDA is initialized)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []
    found = {torch.cuda.current_device()}

    def add(t):
        if torch.is_tensor(t) and t.is_cuda:
            found.add(t.device.index)
    for x in inputs:
        vals = x.values() if isinstance(x, collections.abc.Mapping) else (
            x if isinstance(x, (list, tuple)) else [x])
        for v in vals:
            add(v)
    seen = set()
    for enc in encoders:
        if isinstance(enc, torch.nn.Module) and id(enc) not in seen:
            seen.add(id(enc))
            for p in enc.parameters():
                add(p)
    return sorted(found)


def _rng_state(devices):
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def _set_rng_state(state, devices):
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for d, s in zip(devices, cuda):
        torch.cuda.set_rng_state(s, d)
