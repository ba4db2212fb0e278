"""sentence-transformers' MultipleNegativesRankingLoss and CachedMultipleNegativesRankingLoss
on the fused kernels: same constructor, same call (`loss(sentence_features, labels)`), same
values and gradients as sentence-transformers 6.3.0, without the batch x candidates score
matrix.

    from contrastive_kernels.integrations.sentence_transformers import (
        CachedMultipleNegativesRankingLoss)
    loss = CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=32)
    trainer = SentenceTransformerTrainer(model=model, train_dataset=ds, loss=loss)

Columns: (anchor, positive, negative_1, ..., negative_n); labels are ignored. Each direction
is one fused call that gives the per-row log-sum-exp over its candidates (the target, a
local dot product, is added back); the directions are then joined ("joint": one
log-sum-exp over the union of the candidate sets) or averaged ("per_direction"). Masked
pairs (a query with itself, a document with its own query's documents) are left out with
labels and decoupled=True. The hardness penalties (hardness_mode) are exact: the penalized
candidates form their own fused call at scale `scale + hardness_strength`, whose gradient
is scaled by scale / (scale + hardness_strength) (the penalty gets no gradient).

Supported: similarity_fct cos_sim or dot_score (any other raises a ValueError); every
direction, partition_mode and hardness_mode of the installed loss; gather_across_devices
(ck.ring_info_nce over the default process group: no rank holds the gathered embeddings).
The cached loss raises a ValueError for mini_batch_num_tokens (chunks are
mini_batch_size rows); show_progress_bar has no effect. Not supported: the cached loss
inside sentence-transformers' MatryoshkaLoss (which patches the installed cached losses'
calculate_loss; this one has none).

sentence-transformers is imported only inside the functions that need it.
"""
import contextlib
import math

import torch
from torch import nn
from torch.nn import functional as F

import contrastive_kernels as ck

__all__ = ["MultipleNegativesRankingLoss", "CachedMultipleNegativesRankingLoss", "mnrl_loss"]

DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
HARDNESS_MODES = (None, "in_batch_negatives", "hard_negatives", "all_negatives")


# ----------------------------------------------------------------------------- options

def _similarity(similarity_fct):
    """(the function, normalize?) for cos_sim or dot_score (or their names)."""
    from sentence_transformers import util
    if similarity_fct is None or similarity_fct == "cos_sim":
        return util.cos_sim, True
    if similarity_fct == "dot_score":
        return util.dot_score, False
    if similarity_fct is util.cos_sim:
        return similarity_fct, True
    if similarity_fct is util.dot_score:
        return similarity_fct, False
    name = getattr(similarity_fct, "__name__", type(similarity_fct).__name__)
    raise ValueError(f"similarity_fct={name} is not supported by the fused loss: use "
                     f"sentence_transformers.util.cos_sim or dot_score")


def _check(scale, directions, partition_mode, hardness_mode, hardness_strength):
    """The installed loss's checks (same errors), returning the directions as a tuple."""
    if not scale > 0:
        raise ValueError("Scale must be a positive value.")
    if isinstance(directions, str):
        directions = (directions,)
    directions = tuple(directions)
    if not directions:
        raise ValueError("At least one direction must be specified.")
    bad = set(directions) - set(DIRECTIONS)
    if bad:
        raise ValueError(f"Invalid directions: {bad}. Valid: {set(DIRECTIONS)}")
    if "query_to_doc" not in directions:
        raise ValueError("'query_to_doc' direction is required (contains the positive pair).")
    if partition_mode not in ("joint", "per_direction"):
        raise ValueError(f"partition_mode must be 'joint' or 'per_direction', got {partition_mode}")
    if partition_mode == "per_direction" and set(directions) & {"query_to_query", "doc_to_doc"}:
        raise ValueError("partition_mode='per_direction' needs the positive pair in every "
                         "direction's candidates; 'query_to_query' and 'doc_to_doc' have "
                         "none. Use partition_mode='joint'.")
    if hardness_mode not in HARDNESS_MODES:
        raise ValueError(f"hardness_mode must be one of {set(HARDNESS_MODES)}, "
                         f"got {hardness_mode!r}")
    if hardness_strength < 0.0:
        raise ValueError("hardness_strength must be non-negative.")
    return directions


# ----------------------------------------------------------------------------- the loss

def _world(gather):
    """(world size, rank) of the default process group when gathering, else (1, 0)."""
    dist = torch.distributed
    if gather and dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _lse(rows, keys, scale, gather, **kw):
    """Per-row loss of one fused call (reduction="none"), local or over the ring."""
    fn = ck.ring_info_nce if gather else ck.info_nce
    return fn(rows, keys, logit_scale=scale, reduction="none", **kw)


def _scale_grad(x, k):
    """x with its gradient multiplied by k (value unchanged)."""
    return x if k == 1 else k * x + (1 - k) * x.detach()


def mnrl_loss(embeddings, *, scale=20.0, normalize=True, directions=("query_to_doc",),
              partition_mode="joint", hardness_mode=None, hardness_strength=0.0,
              gather=False):
    """The MultipleNegativesRankingLoss of embeddings [anchors, positives, negatives_1, ...]
    (each B x D). gather: over the global batch of the default process group (each rank
    passes its shard; ck.ring_info_nce's gradient contract, as sentence-transformers'
    all_gather_with_grad)."""
    if len(embeddings) < 2:
        raise ValueError(f"Expected at least 2 embeddings, got {len(embeddings)}")
    if normalize:
        embeddings = [F.normalize(e, p=2, dim=-1) for e in embeddings]
    q, docs = embeddings[0], list(embeddings[1:])
    d0 = docs[0]
    keys = torch.cat(docs)
    s = float(scale)
    alpha = float(hardness_strength) if hardness_mode is not None else 0.0
    if set(directions) == {"query_to_doc"} and alpha == 0.0:
        fn = ck.ring_info_nce if gather else ck.info_nce
        return fn(q, keys, logit_scale=s)       # key i is query i's positive

    world, rank = _world(gather)
    n = q.shape[0]
    several = n * world > 1         # some other query (and its documents) exists
    gid = torch.arange(n, device=q.device) * world + rank     # unique over the ranks
    doc_gid = gid.repeat(len(docs))
    own = torch.stack([(q * d).sum(-1) for d in docs], 1)      # <q_i, own documents>
    pos = s * own[:, 0]
    lses = [_query_to_doc(q, keys, own, s, alpha, hardness_mode, gid, doc_gid, gather,
                          several, len(keys) * world > 1)]
    if "query_to_query" in directions and several:
        rows = _lse(q, q, s, gather, labels=gid, key_labels=gid, decoupled=True)
        lses.append(rows + s * (q * q).sum(-1))
    if "doc_to_query" in directions:
        lses.append(_lse(d0, q, s, gather) + pos)
    if "doc_to_doc" in directions and several:
        rows = _lse(d0, keys, s, gather, labels=gid, key_labels=doc_gid, decoupled=True)
        lses.append(rows + s * torch.stack([(d0 * d).sum(-1) for d in docs], 1).mean(1))
    lses = torch.stack(lses)
    log_z = torch.logsumexp(lses, 0) if partition_mode == "joint" else lses.mean(0)
    return (log_z - pos).mean()     # under gather: this rank's rows, as sentence-transformers


def _query_to_doc(q, keys, own, s, alpha, mode, gid, doc_gid, gather, several, negatives):
    """log-sum-exp over the documents of each query, with the hardness penalty alpha on the
    mode's negatives (logit s c + alpha c, gradient s)."""
    pos = s * own[:, 0]
    if alpha == 0.0 or (mode == "hard_negatives" and own.shape[1] == 1):
        return _lse(q, keys, s, gather) + pos
    k = s / (s + alpha)
    inf = torch.full_like(pos, -math.inf)
    if mode == "all_negatives":     # all but the positive, penalized
        pen = inf
        if negatives:
            pen = _lse(q, keys, s + alpha, gather, decoupled=True) + (s + alpha) * own[:, 0]
        return torch.logaddexp(_scale_grad(pen, k), pos)
    # documents of the other queries, without the query's own ones
    other = inf
    if several:
        sa = s + alpha if mode == "in_batch_negatives" else s
        other = _lse(q, keys, sa, gather, labels=gid, key_labels=doc_gid, decoupled=True)
        other = other + sa * own.mean(1)
    if mode == "in_batch_negatives":
        return torch.logaddexp(_scale_grad(other, k), torch.logsumexp(s * own, 1))
    hard = s * own[:, 1:] + alpha * own[:, 1:].detach()     # "hard_negatives"
    return torch.logsumexp(torch.cat([other[:, None], pos[:, None], hard], 1), 1)


# ----------------------------------------------------------------------------- modules

def _embed(model, features):
    """One sentence embedding per column, as the installed loss computes them."""
    try:
        from sentence_transformers.base.losses.merged_forward import embed_columns
    except ImportError:
        return [model(f)["sentence_embedding"] for f in features]
    return embed_columns(model, features)


class MultipleNegativesRankingLoss(nn.Module):
    """sentence_transformers.losses.MultipleNegativesRankingLoss (6.3.0) on the fused
    kernels: same arguments, values and gradients (see the module docstring)."""

    def __init__(self, model, scale=20.0, similarity_fct=None, gather_across_devices=False,
                 directions=("query_to_doc",), partition_mode="joint", hardness_mode=None,
                 hardness_strength=0.0):
        super().__init__()
        self.directions = _check(scale, directions, partition_mode, hardness_mode,
                                 hardness_strength)
        self.model = model
        self.scale = scale
        self.similarity_fct = similarity_fct
        self.gather_across_devices = gather_across_devices
        self.partition_mode = partition_mode
        self.hardness_mode = hardness_mode
        self.hardness_strength = hardness_strength

    def __setattr__(self, name, value):
        if name == "similarity_fct":    # checked on every assignment
            value, normalize = _similarity(value)
            super().__setattr__("normalize", normalize)
        super().__setattr__(name, value)

    def forward(self, sentence_features, labels=None):
        return self.compute_loss_from_embeddings(_embed(self.model, list(sentence_features)),
                                                 labels)

    def compute_loss_from_embeddings(self, embeddings, labels=None):
        return mnrl_loss(list(embeddings), scale=self.scale, normalize=self.normalize,
                         directions=self.directions, partition_mode=self.partition_mode,
                         hardness_mode=self.hardness_mode,
                         hardness_strength=self.hardness_strength,
                         gather=self.gather_across_devices)

    def get_config_dict(self):
        return {"scale": self.scale, "similarity_fct": self.similarity_fct.__name__,
                "gather_across_devices": self.gather_across_devices,
                "directions": self.directions, "partition_mode": self.partition_mode,
                "hardness_mode": self.hardness_mode,
                "hardness_strength": self.hardness_strength}

    @property
    def temperature(self):
        return 1.0 / self.scale

    @property
    def citation(self):
        d = set(self.directions)
        if d == set(DIRECTIONS) and self.partition_mode == "joint":
            return GTE_CITATION
        if d == {"query_to_doc", "doc_to_query"} and self.partition_mode == "per_direction":
            return JINA_CITATION
        return CPC_CITATION


class CachedMultipleNegativesRankingLoss(nn.Module):
    """sentence_transformers.losses.CachedMultipleNegativesRankingLoss (6.3.0) on ck.GradCache
    and the fused kernels: same arguments, values and gradients (dropout included: the
    same chunks are embedded in the same order, and GradCache replays their RNG).

    forward embeds every chunk of mini_batch_size rows without a graph and returns the
    loss; its backward (loss.backward(), as the Trainer calls it) runs ck.GradCache, which
    computes the loss's gradient and re-embeds each chunk with it, scaled by the incoming
    gradient (gradient accumulation, fp16 loss scaling). The first pass's embeddings are
    handed to GradCache, so every chunk is embedded twice, as in sentence-transformers."""

    def __init__(self, model, scale=20.0, similarity_fct=None, mini_batch_size=32,
                 mini_batch_num_tokens=None, gather_across_devices=False,
                 directions=("query_to_doc",), partition_mode="joint",
                 show_progress_bar=False, hardness_mode=None, hardness_strength=0.0):
        super().__init__()
        if mini_batch_num_tokens is not None:
            raise ValueError("mini_batch_num_tokens is not supported (ck.GradCache splits "
                             "into chunks of mini_batch_size rows); leave it None")
        if isinstance(mini_batch_size, bool) or not isinstance(mini_batch_size, int) \
                or mini_batch_size <= 0:
            raise ValueError(f"mini_batch_size must be a positive int, got {mini_batch_size!r}")
        _reject_static_embedding(model)
        self.model = model
        self.loss = MultipleNegativesRankingLoss(
            model, scale=scale, similarity_fct=similarity_fct,
            gather_across_devices=gather_across_devices, directions=directions,
            partition_mode=partition_mode, hardness_mode=hardness_mode,
            hardness_strength=hardness_strength)
        self.mini_batch_size = mini_batch_size
        self.mini_batch_num_tokens = None
        self.show_progress_bar = show_progress_bar

    _delegated = ("scale", "similarity_fct", "gather_across_devices", "directions",
                  "partition_mode", "hardness_mode", "hardness_strength")

    def __getattr__(self, name):
        if name in CachedMultipleNegativesRankingLoss._delegated:
            return getattr(self._modules["loss"], name)
        return super().__getattr__(name)

    def __setattr__(self, name, value):
        if name in self._delegated and "loss" in self._modules:
            setattr(self._modules["loss"], name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, sentence_features, labels=None):
        features = list(sentence_features)
        if len(features) < 2:
            raise ValueError(f"Expected at least 2 inputs, got {len(features)}")
        enc = _Encoder(self.model)
        chunks = self.mini_batch_size
        with torch.no_grad():
            embs = [enc.first_pass(f, chunks) for f in features]
            value = self.loss.compute_loss_from_embeddings(embs)
        if not torch.is_grad_enabled():
            return value
        out = value.detach().requires_grad_()
        cast = _autocast_state()
        out.register_hook(lambda g: _backward(enc, self.loss, features, chunks, g, cast))
        return out

    def get_config_dict(self):
        config = self.loss.get_config_dict()
        config["mini_batch_size"] = self.mini_batch_size
        config["mini_batch_num_tokens"] = self.mini_batch_num_tokens
        return config

    @property
    def temperature(self):
        return 1.0 / self.scale

    @property
    def citation(self):
        return GRADCACHE_CITATION


def _reject_static_embedding(model):
    """A StaticEmbedding's inputs have no batch dimension to chunk (as the installed loss)."""
    try:
        from sentence_transformers.sentence_transformer.modules import StaticEmbedding
        first = model[0]
    except Exception:
        return
    if isinstance(first, StaticEmbedding):
        raise ValueError("CachedMultipleNegativesRankingLoss cannot chunk a StaticEmbedding "
                         "model's inputs; use MultipleNegativesRankingLoss")


class _Scale:
    """A GradScaler stand-in for GradCache: multiplies the loss by the incoming gradient."""

    def __init__(self, g):
        self.g = g

    def scale(self, loss):
        return loss * self.g.to(loss.dtype)


def _rng():
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng(state):
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


class _Encoder:
    """The model as GradCache's encoder: a chunk of features -> its sentence embeddings.

    first_pass embeds a column chunk by chunk without a graph and keeps, per chunk, the
    embeddings and the RNG state after it. In the backward, GradCache's own first pass is
    answered from that store (no model call), and the RNG is set to what followed each
    chunk, so the states GradCache records before each chunk are those of the first pass:
    its re-forward draws the same dropout masks."""

    def __init__(self, model):
        self.model = model
        self.store = []         # (embeddings, RNG state after) per chunk, columns in order
        self.start = None       # the RNG state before the first chunk
        self.replay = None

    @property
    def no_sync(self):
        """The model's (DDP): GradCache then syncs on the last chunk only. AttributeError
        without one."""
        return self.model.no_sync

    def first_pass(self, features, size):
        rows = _rows(features)
        if self.start is None:
            self.start = _rng()
        parts = []
        for begin in range(0, rows, size):
            chunk = _chunk(features, begin, min(begin + size, rows), rows)
            e = self(chunk)
            self.store.append((e, _rng()))
            parts.append(e)
        return torch.cat(parts)

    def __call__(self, chunk):
        if self.replay is not None and not torch.is_grad_enabled():
            e, after = self.replay.pop(0)
            _set_rng(after)
            return e
        # a plain dict, as the installed loss passes: DDP(find_unused_parameters=True) does
        # not look inside a BatchEncoding output and would mark every parameter unused
        return self.model(dict(_trim(chunk)))["sentence_embedding"]


def _autocast_state():
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in devices]


def _backward(enc, loss, features, size, g, cast):
    """The hook on the returned loss: GradCache's gradient, scaled by g, re-forwarding
    under the forward's autocast state (the backward runs outside it)."""
    outer = _rng()
    enc.replay = list(enc.store)
    gc = ck.GradCache(enc, lambda *e: loss.compute_loss_from_embeddings(e), size,
                      scaler=_Scale(g))
    try:
        _set_rng(enc.start)
        with torch.enable_grad(), contextlib.ExitStack() as stack:
            for device, enabled, dtype in cast:
                stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
            gc(*features)
    finally:
        enc.replay = None
        enc.store = []
        _set_rng(outer)


def _rows(features):
    """The batch size, as GradCache reads it: the largest dim 0."""
    return max(v.shape[0] for v in features.values() if torch.is_tensor(v) and v.dim() > 0)


def _chunk(features, begin, end, rows):
    """Rows begin:end of features, cut as GradCache cuts them."""
    return {k: v[begin:end] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == rows else v
            for k, v in features.items()}


def _trim(chunk):
    """Drop the padding columns at the right end that every row of the chunk has (as the
    installed cached loss does; the values are the same, the work less)."""
    mask = chunk.get("attention_mask")
    if not (torch.is_tensor(mask) and mask.dim() == 2):
        return chunk
    used = mask.bool().any(0).nonzero()
    if used.numel() == 0:
        return chunk
    width, end = mask.shape[1], int(used.max()) + 1
    if end == width:
        return chunk
    return {k: v[:, :end] if torch.is_tensor(v) and v.dim() >= 2 and v.shape[1] == width
            else v for k, v in chunk.items()}


CPC_CITATION = """
@misc{oord2019representationlearningcontrastivepredictive,
      title={Representation Learning with Contrastive Predictive Coding},
      author={Aaron van den Oord and Yazhe Li and Oriol Vinyals},
      year={2019},
      eprint={1807.03748},
      archivePrefix={arXiv},
      primaryClass={cs.LG},
      url={https://arxiv.org/abs/1807.03748},
}
"""

GTE_CITATION = """
@misc{li2023generaltextembeddingsmultistage,
      title={Towards General Text Embeddings with Multi-stage Contrastive Learning},
      author={Zehan Li and Xin Zhang and Yanzhao Zhang and Dingkun Long and Pengjun Xie and Meishan Zhang},
      year={2023},
      eprint={2308.03281},
      archivePrefix={arXiv},
      primaryClass={cs.CL},
      url={https://arxiv.org/abs/2308.03281},
}
"""

JINA_CITATION = """
@misc{günther2024jinaembeddings28192token,
      title={Jina Embeddings 2: 8192-Token General-Purpose Text Embeddings for Long Documents},
      author={Michael Günther and Jackmin Ong and Isabelle Mohr and Alaeddine Abdessalem and Tanguy Abel and Mohammad Kalim Akram and Susana Guzman and Georgios Mastrapas and Saba Sturua and Bo Wang and Maximilian Werk and Nan Wang and Han Xiao},
      year={2024},
      eprint={2310.19923},
      archivePrefix={arXiv},
      primaryClass={cs.CL},
      url={https://arxiv.org/abs/2310.19923},
}
"""

GRADCACHE_CITATION = """
@misc{gao2021scaling,
    title={Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup},
    author={Luyu Gao and Yunyi Zhang and Jiawei Han and Jamie Callan},
    year={2021},
    eprint={2101.06983},
    archivePrefix={arXiv},
    primaryClass={cs.LG}
}
"""
