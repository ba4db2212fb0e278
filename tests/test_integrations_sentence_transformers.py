"""contrastive_kernels.integrations.sentence_transformers against the installed
sentence-transformers losses: loss values and every parameter gradient of a tiny, randomly
initialised SentenceTransformer (a one-layer BERT built from a config, a word-level vocab
written here: no downloads), in one process and over gloo (2, 3 and 4 processes, spawned
by test_distributed.spawn), and both losses as the loss of SentenceTransformerTrainer.
"""
import functools
import os
import random
import subprocess
import sys

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
st = pytest.importorskip("sentence_transformers")
pytest.importorskip("datasets")

from sentence_transformers import util  # noqa: E402
from sentence_transformers.sentence_transformer import losses  # noqa: E402

from contrastive_kernels.integrations import sentence_transformers as cks  # noqa: E402
from test_distributed import spawn  # noqa: E402

pytestmark = pytest.mark.cpu_only

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = [f"w{i}" for i in range(40)]
ALL = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")


# ----------------------------------------------------------------------------- helpers

def write_model_dir(path, seed=0):
    """A one-layer BERT (hidden 16, dropout 0.1) and its word-level tokenizer in `path`."""
    from transformers import BertConfig, BertModel, BertTokenizer
    os.makedirs(path, exist_ok=True)
    vocab = os.path.join(path, "vocab.txt")
    with open(vocab, "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    BertTokenizer(vocab).save_pretrained(path)
    cfg = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=16, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(seed)
    BertModel(cfg).save_pretrained(path)
    return path


def load_model(path):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    tr = Transformer(path, max_seq_length=16)
    return SentenceTransformer(modules=[tr, Pooling(tr.get_embedding_dimension(), "mean")],
                               device="cpu")


def sentences(n, rng):
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 7))) for _ in range(n)]


def columns(batch, n_columns, seed):
    rng = random.Random(seed)
    return [sentences(batch, rng) for _ in range(n_columns)]


def features(model, cols):
    return [model.preprocess(c) for c in cols]


def run(model, loss, cols, train=False, seed=1, grad_scale=1.0):
    """(loss, {name: grad}) of one forward and backward from zero gradients."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    value = loss(features(model, cols), None)
    (value * grad_scale).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    return value.detach(), grads


def check_same(got, want, tol=2e-5, where=""):
    (lg, gg), (lw, gw) = got, want
    assert torch.allclose(lg, lw, rtol=tol, atol=tol), f"{where}loss {lg} != {lw}"
    assert gg.keys() == gw.keys() and gw, f"{where}parameters with gradients differ"
    scale = max(max(g.abs().max() for g in gw.values()), 1e-6)   # next to their size
    for name in gw:
        err = float((gg[name] - gw[name]).abs().max() / scale)
        assert err < tol, f"{where}{name}: gradient error {err:.2e}"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops are microseconds: OpenMP threads only contend (seconds per
    test on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model_dir(str(tmp_path_factory.mktemp("tiny_bert")))


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(model_dir)


def similarity(kw):
    kw = dict(kw)
    if kw.get("similarity_fct") == "dot":
        kw["similarity_fct"] = util.dot_score
    return kw


# ----------------------------------------------------------------------------- one process

CASES = {
    "default": dict(),
    "scale7": dict(scale=7.0),
    "dot": dict(similarity_fct="dot", scale=1.0),
    "all_directions": dict(directions=ALL),
    "q2q_dot": dict(directions=("query_to_doc", "query_to_query"), similarity_fct="dot",
                    scale=0.5),
    "per_direction": dict(directions=("query_to_doc", "doc_to_query"),
                          partition_mode="per_direction"),
    "in_batch_negatives": dict(hardness_mode="in_batch_negatives", hardness_strength=9.0),
    "hard_negatives_all": dict(hardness_mode="hard_negatives", hardness_strength=5.0,
                               directions=ALL),
    "all_negatives_dot": dict(hardness_mode="all_negatives", hardness_strength=3.0,
                              similarity_fct="dot", scale=0.5,
                              directions=("query_to_doc", "doc_to_query"),
                              partition_mode="per_direction"),
}


@pytest.mark.parametrize("cached", [False, True], ids=["plain", "cached"])
@pytest.mark.parametrize("n_columns", [2, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_installed_loss(model, case, n_columns, cached):
    """Loss and every parameter gradient, dropout off, batch 7 (chunks of 3 when cached)."""
    kw = similarity(CASES[case])
    cols = columns(7, n_columns, seed=len(case) + n_columns)
    if cached:
        ours = cks.CachedMultipleNegativesRankingLoss(model, mini_batch_size=3, **kw)
        theirs = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=3, **kw)
    else:
        ours = cks.MultipleNegativesRankingLoss(model, **kw)
        theirs = losses.MultipleNegativesRankingLoss(model, **kw)
    check_same(run(model, ours, cols), run(model, theirs, cols))


@pytest.mark.parametrize("batch", [1, 2])
def test_tiny_batches(model, batch):
    """One or two rows: no other query (the masked directions are empty), all directions."""
    kw = dict(directions=ALL, hardness_mode="in_batch_negatives", hardness_strength=2.0)
    cols = columns(batch, 3, seed=batch)
    check_same(run(model, cks.MultipleNegativesRankingLoss(model, **kw), cols),
               run(model, losses.MultipleNegativesRankingLoss(model, **kw), cols))
    kw = dict(hardness_mode="all_negatives", hardness_strength=2.0)
    cols = columns(batch, 2, seed=batch)
    cached = cks.CachedMultipleNegativesRankingLoss(model, mini_batch_size=1, **kw)
    check_same(run(model, cached, cols),
               run(model, losses.MultipleNegativesRankingLoss(model, **kw), cols))


def test_dropout_matches_installed_loss(model):
    """Dropout on: the same masks are drawn (the cached loss replays each chunk's RNG), so
    both adapters equal the installed losses under the same seed."""
    cols = columns(9, 3, seed=5)
    check_same(run(model, cks.CachedMultipleNegativesRankingLoss(model, mini_batch_size=4), cols,
                   train=True),
               run(model, losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=4),
                   cols, train=True))
    check_same(run(model, cks.MultipleNegativesRankingLoss(model), cols, train=True),
               run(model, losses.MultipleNegativesRankingLoss(model), cols, train=True))
    # and dropout changes the result (the masks are really drawn)
    a = run(model, cks.MultipleNegativesRankingLoss(model), cols, train=True, seed=1)[0]
    b = run(model, cks.MultipleNegativesRankingLoss(model), cols, train=True, seed=2)[0]
    assert not torch.allclose(a, b)


def test_cached_equals_plain_and_scales_gradient(model):
    """Chunk size changes nothing; the backward's incoming gradient (gradient accumulation,
    fp16 loss scaling) scales the parameters' gradients; no_grad gives the value only."""
    cols = columns(8, 3, seed=7)
    plain = run(model, cks.MultipleNegativesRankingLoss(model, scale=10.0), cols, grad_scale=0.25)
    for size in (1, 3, 8, 50):
        cached = cks.CachedMultipleNegativesRankingLoss(model, scale=10.0, mini_batch_size=size)
        check_same(run(model, cached, cols, grad_scale=0.25), plain, where=f"chunk {size}: ")
    check_same(run(model, cached, cols, grad_scale=0.25),
               run(model, losses.CachedMultipleNegativesRankingLoss(model, scale=10.0), cols,
                   grad_scale=0.25))
    with torch.no_grad():
        value = cached(features(model, cols), None)
    assert not value.requires_grad and torch.allclose(value, plain[0])


def test_cached_under_autocast(model):
    """Under bf16 autocast the re-forward (in the backward, outside the autocast block)
    runs under the forward's autocast state: the cached loss equals the plain one."""
    cols = columns(9, 3, seed=3)

    def step(loss):
        model.eval()
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = loss(features(model, cols), None)
        value.backward()
        return value.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters()
                                        if p.grad is not None}
    check_same(step(cks.CachedMultipleNegativesRankingLoss(model, mini_batch_size=4)),
               step(cks.MultipleNegativesRankingLoss(model)), tol=1e-3)


def test_attributes_match_installed_loss(model):
    kw = dict(scale=5.0, similarity_fct=util.dot_score, directions=ALL)
    pairs = [(cks.MultipleNegativesRankingLoss(model, **kw),
              losses.MultipleNegativesRankingLoss(model, **kw)),
             (cks.CachedMultipleNegativesRankingLoss(model, mini_batch_size=4, **kw),
              losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=4, **kw))]
    for ours, theirs in pairs:
        assert ours.get_config_dict() == theirs.get_config_dict()
        assert ours.citation.strip() == theirs.citation.strip()
        assert ours.temperature == theirs.temperature and ours.model is model
        assert isinstance(ours, torch.nn.Module)
    cached = pairs[1][0]
    cached.scale = 8.0                  # delegated to the wrapped loss, as installed
    assert cached.loss.scale == 8.0 and cached.get_config_dict()["scale"] == 8.0
    plain = cks.MultipleNegativesRankingLoss(model, directions=("query_to_doc", "doc_to_query"),
                                             partition_mode="per_direction")
    assert plain.citation == losses.MultipleNegativesRankingLoss(
        model, directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction").citation


@pytest.mark.parametrize("kw, match", [
    (dict(similarity_fct=util.manhattan_sim), "similarity_fct"),
    (dict(similarity_fct=lambda a, b: a @ b.T), "similarity_fct"),
    (dict(directions=("doc_to_query",)), "query_to_doc"),
    (dict(directions=("query_to_doc", "sideways")), "Invalid directions"),
    (dict(directions=ALL, partition_mode="per_direction"), "per_direction"),
    (dict(partition_mode="both"), "partition_mode"),
    (dict(hardness_mode="hardest"), "hardness_mode"),
    (dict(hardness_strength=-1.0), "hardness_strength"),
    (dict(scale=0.0), "Scale"),
])
def test_invalid_options_raise(model, kw, match):
    for cls in (cks.MultipleNegativesRankingLoss, cks.CachedMultipleNegativesRankingLoss):
        with pytest.raises(ValueError, match=match):
            cls(model, **kw)


def test_cached_only_options(model):
    with pytest.raises(ValueError, match="mini_batch_num_tokens"):
        cks.CachedMultipleNegativesRankingLoss(model, mini_batch_num_tokens=64)
    with pytest.raises(ValueError, match="mini_batch_size"):
        cks.CachedMultipleNegativesRankingLoss(model, mini_batch_size=0)
    with pytest.raises(ValueError, match="Expected at least 2"):
        cks.CachedMultipleNegativesRankingLoss(model)(features(model, columns(3, 1, 0)), None)
    cks.CachedMultipleNegativesRankingLoss(model, show_progress_bar=True)   # no effect


@pytest.mark.no_poison
def test_imports_without_sentence_transformers():
    code = ("import sys; sys.modules['sentence_transformers'] = None\n"
            "import contrastive_kernels.integrations.sentence_transformers as m\n"
            "assert 'sentence_transformers' not in [k for k, v in sys.modules.items() if v]\n"
            "print(m.MultipleNegativesRankingLoss.__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "MultipleNegativesRankingLoss" in out.stdout


# ----------------------------------------------------------------------------- trainer

@pytest.mark.no_poison
@pytest.mark.parametrize("cached", [False, True], ids=["plain", "cached"])
def test_trainer(model_dir, tmp_path, cached):
    """A few steps of SentenceTransformerTrainer (gradient accumulation 2) with the adapter
    as its loss: finite logged losses, every parameter moves, the model card is written."""
    from datasets import Dataset
    from sentence_transformers import (SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)
    model = load_model(model_dir)
    anchor, positive, negative = columns(24, 3, seed=11)
    data = Dataset.from_dict({"anchor": anchor, "positive": positive, "negative": negative})
    loss = (cks.CachedMultipleNegativesRankingLoss(model, mini_batch_size=3) if cached
            else cks.MultipleNegativesRankingLoss(model))
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=3,
        gradient_accumulation_steps=2, learning_rate=1e-3, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=loss)
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3 and all(map(lambda x: x == x and abs(x) < 1e3, logged))
    still = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert all("pooler" in n for n in still), still    # mean pooling: BERT's pooler unused
    model.save(str(tmp_path / "saved"))
    card = (tmp_path / "saved" / "README.md").read_text()
    assert type(loss).__name__ in card
    if cached:
        assert "gao2021scaling" in card


# ----------------------------------------------------------------------------- gloo

DIST_CASES = [
    ("plain", dict()),
    ("plain", dict(directions=ALL, hardness_mode="in_batch_negatives", hardness_strength=2.0,
                   scale=10.0)),
    ("plain", dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction",
                   hardness_mode="hard_negatives", hardness_strength=5.0, similarity_fct="dot",
                   scale=0.5)),
    ("cached", dict()),
    ("cached", dict(directions=("query_to_doc", "query_to_query"), hardness_mode="all_negatives",
                    hardness_strength=3.0)),
    ("cached_ddp", dict()),     # the model in DistributedDataParallel, as the Trainer wraps it
]


def _dist_cases(model, world, rank):
    """Every case on this rank's shard (3 rows, 3 columns): ours vs installed, both with
    gather_across_devices=True. Mismatches are collected, so no rank stops early."""
    from torch.nn.parallel import DistributedDataParallel
    n = 3
    cols = columns(n * world, 3, seed=world)
    mine = [c[rank * n:(rank + 1) * n] for c in cols]
    errors = []
    for i, (kind, case) in enumerate(DIST_CASES):
        kw = dict(similarity(case), gather_across_devices=True)
        if kind.startswith("cached"):
            ours = cks.CachedMultipleNegativesRankingLoss(model, mini_batch_size=2, **kw)
            theirs = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=2, **kw)
        else:
            ours = cks.MultipleNegativesRankingLoss(model, **kw)
            theirs = losses.MultipleNegativesRankingLoss(model, **kw)
        if kind.endswith("ddp"):    # BERT's pooler is unused: find_unused_parameters
            ours.model = theirs.model = DistributedDataParallel(model,
                                                                find_unused_parameters=True)
        try:
            check_same(run(model, ours, mine), run(model, theirs, mine),
                       where=f"world {world} rank {rank} case {i}: ")
        except AssertionError as e:
            errors.append(str(e))
    return errors


def _dist_check(model_dir, world, rank):
    """One rank of test_distributed.spawn: every case, then its mismatches (if any)."""
    errors = _dist_cases(load_model(model_dir), world, rank)
    if errors:
        raise AssertionError("\n".join(errors))


@pytest.mark.no_poison
@pytest.mark.parametrize("world", [2, 3, 4])
def test_gather_across_devices(model_dir, world, tmp_path):
    """gloo, `world` processes: per-rank loss and parameter gradients equal
    sentence-transformers' gather_across_devices=True (all_gather with gradient) for the
    plain and the cached loss."""
    spawn(world, tmp_path, functools.partial(_dist_check, model_dir))


# ----------------------------------------------------------------------------- example

@pytest.mark.no_poison
def test_example_smoke():
    script = os.path.join(ROOT, "examples", "train_sentence_embeddings.py")
    out = subprocess.run([sys.executable, script, "--smoke"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "recall@1 before" in out.stdout and "recall@1 after" in out.stdout
    assert "loss" in out.stdout
