"""contrastive_kernels.integrations.transformers.siglip_loss against the installed
transformers' own SigLIP loss (`SiglipModel` and `Siglip2Model` with return_loss=True): the loss and the
gradient of every model parameter (both towers, logit_scale, logit_bias), locally and,
over 2, 3 and 4 gloo ranks, as the global batch."""
import copy
import warnings

import pytest
import torch
import torch.distributed as dist

from contrastive_kernels.integrations import transformers as ck_tf
from conftest import DEVICE, rel_err
from test_distributed import _allreduce, _close, _offsets, spawn

transformers = pytest.importorskip("transformers")

VOCAB, SEQ, IMG = 50, 8, 16


TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=SEQ, bos_token_id=1, eos_token_id=2,
            pad_token_id=1)
VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)


def tiny_model(kind="siglip", seed=0):
    """A small SiglipModel or Siglip2Model from a config (no download), float64, eval
    mode (no dropout)."""
    if kind == "siglip":
        cfg = transformers.SiglipConfig(text_config=TEXT, vision_config=dict(
            VISION, image_size=IMG, patch_size=8))
        cls = transformers.SiglipModel
    else:
        cfg = transformers.Siglip2Config(text_config=TEXT, vision_config=dict(
            VISION, num_patches=16, patch_size=4))
        cls = transformers.Siglip2Model
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls(cfg).double().eval()
    with torch.no_grad():      # away from the initialisation
        model.logit_scale.fill_(1.7)
        model.logit_bias.fill_(-3.0)
    return model


def batch(n, kind="siglip", seed=1):
    """Processor-like inputs; SigLIP 2's are patch sequences with a padding mask (one
    image with 4 of its 16 patches padded)."""
    g = torch.Generator().manual_seed(seed)
    out = dict(input_ids=torch.randint(3, VOCAB, (n, SEQ), generator=g))
    if kind == "siglip":
        out["pixel_values"] = torch.randn(n, 3, IMG, IMG, generator=g, dtype=torch.float64)
    else:
        out["pixel_values"] = torch.randn(n, 16, 3 * 4 * 4, generator=g, dtype=torch.float64)
        mask = torch.ones(n, 16, dtype=torch.long)
        mask[n // 2, 12:] = 0
        out.update(pixel_attention_mask=mask, spatial_shapes=torch.tensor([[4, 4]] * n))
    return out


def grads(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()
            if p.grad is not None}


@pytest.mark.parametrize("n", [1, 7, 33])
@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("kind", ["siglip", "siglip2"])
def test_same_loss_and_gradients_as_the_model(kind, n, backend):
    ref_model = tiny_model(kind).to(DEVICE)
    model = copy.deepcopy(ref_model)
    inputs = {k: v.to(DEVICE) for k, v in batch(n, kind).items()}
    ref = ref_model(**inputs, return_loss=True).loss
    ref.backward()
    out = ck_tf.siglip_loss(model, **inputs, return_loss=True, backend=backend)
    out.backward()
    assert rel_err(out, ref, floor=1.0) < 1e-10, (float(out), float(ref))
    want, got = grads(ref_model), grads(model)
    assert set(got) == set(want) and "logit_bias" in got and "logit_scale" in got
    for name in want:
        assert rel_err(got[name], want[name], floor=1e-6) < 1e-8, name


def test_the_inputs_the_model_ignores_are_ignored():
    """A processor's token_type_ids, output flags, and a model whose config returns
    tuples: the same loss as the model's own."""
    model = tiny_model()
    inputs = batch(4)
    ref = model(**inputs, return_loss=True).loss
    extra = dict(token_type_ids=torch.zeros_like(inputs["input_ids"]),
                 output_hidden_states=True, output_attentions=False, return_dict=True)
    assert rel_err(ck_tf.siglip_loss(model, **inputs, **extra), ref, floor=1.0) < 1e-10
    model.config.return_dict = False
    model.text_model.config.return_dict = False
    model.vision_model.config.return_dict = False
    assert rel_err(ck_tf.siglip_loss(model, **inputs), ref, floor=1.0) < 1e-10


def test_bad_arguments_are_named():
    model = tiny_model()
    inputs = batch(3)
    with pytest.raises(ValueError, match="pixel_values is required"):
        ck_tf.siglip_loss(model, input_ids=inputs["input_ids"])
    with pytest.raises(ValueError, match=r"unknown model inputs \['labels'\]"):
        ck_tf.siglip_loss(model, **inputs, labels=torch.arange(3))
    with pytest.raises(ValueError, match="distributed must be None or 'ring'"):
        ck_tf.siglip_loss(model, **inputs, distributed="gather")
    with pytest.raises(TypeError, match="Linear has no get_text_features, .*logit_bias"):
        ck_tf.siglip_loss(torch.nn.Linear(2, 2), **inputs)
    with pytest.raises(ValueError, match="same number of pairs .* got 3 and 2"):
        ck_tf.siglip_loss(model, input_ids=inputs["input_ids"],
                          pixel_values=inputs["pixel_values"][:2])

    class Wrapped(torch.nn.Module):        # as DistributedDataParallel holds it
        def __init__(self, m):
            super().__init__()
            self.module = m
    with pytest.raises(TypeError, match="wrap SiglipLossModel"):
        ck_tf.siglip_loss(Wrapped(model), **inputs)


SIZES = [3, 5, 2, 4]


def _ring_cases(world, rank):
    sizes = SIZES[:world]
    off = _offsets(sizes)
    full = batch(sum(sizes), "siglip2", seed=4)
    mine = {k: v[off[rank]:off[rank] + sizes[rank]] for k, v in full.items()}
    ref_model, model = tiny_model("siglip2"), tiny_model("siglip2")
    ref = ref_model(**full, return_loss=True).loss      # the concatenated batch
    ref.backward()
    # the documented DDP use: the loss module wrapped, so DDP averages the gradients
    ddp = torch.nn.parallel.DistributedDataParallel(
        ck_tf.SiglipLossModel(model, distributed="ring", backend="torch"))
    loss = ddp(**mine)
    loss.backward()
    # the mean over ranks is the global loss; DDP's averaged gradients are its
    _close("mean of the rank losses", _allreduce(loss) / world, ref.reshape(1), 1e-9)
    want, got = grads(ref_model), grads(model)
    assert set(got) == set(want)
    for name, g in want.items():
        _close(name, got[name], g, 1e-8)
    dist.barrier()


@pytest.mark.cpu_only
@pytest.mark.parametrize("world", [2, 3, 4])
def test_ring_is_the_global_batch(world, tmp_path):
    spawn(world, tmp_path, _ring_cases)
