"""Train a tiny sentence embedding model with SentenceTransformerTrainer and the fused,
gradient-cached MultipleNegativesRankingLoss (contrastive_kernels.integrations).

Everything is local and synthetic, on CPU: a randomly initialised BERT built from a
config, a word-level tokenizer written from a vocab list, and (anchor, positive) pairs
where the positive is a shuffled paraphrase of the anchor: about half of its words are
replaced by a fixed "synonym" token, plus one random word. Identical words are easy to
match even for an untrained model; the synonyms must be learnt. Before and after
training it prints recall@1, recall@5 and MRR of retrieving each held-out anchor's
positive among all held-out positives (ck.retrieval_metrics).

    python examples/train_sentence_embeddings.py            # a few minutes on 2 cores
    python examples/train_sentence_embeddings.py --smoke    # seconds
"""
import argparse
import os
import random
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import contrastive_kernels as ck  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=8192, help="training pairs")
    p.add_argument("--eval-pairs", type=int, default=1000, help="held-out pairs")
    p.add_argument("--words", type=int, default=300, help="words (each with a synonym)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--mini-batch-size", type=int, default=64, help="GradCache chunk rows")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--scale", type=float, default=20.0)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--logging-steps", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1),
                   help="torch threads (1 for tiny models on a busy machine)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for a quick check")
    args = p.parse_args()
    if args.smoke:
        args.pairs, args.eval_pairs, args.words = 96, 64, 40
        args.batch_size, args.mini_batch_size, args.epochs = 32, 8, 1.0
        args.hidden, args.layers, args.logging_steps, args.threads = 16, 1, 1, 1
    return args


def make_pairs(n, words, rng):
    """(anchors, positives): a positive is its anchor with about half of the words
    replaced by their synonyms, shuffled, plus one random word."""
    anchors, positives = [], []
    for _ in range(n):
        ids = rng.sample(range(words), rng.randint(4, 8))
        para = [f"s{i}" if rng.random() < 0.5 else f"w{i}" for i in ids]
        para.append(f"w{rng.randrange(words)}")
        rng.shuffle(para)
        anchors.append(" ".join(f"w{i}" for i in ids))
        positives.append(" ".join(para))
    return anchors, positives


def build_model(path, args):
    """A randomly initialised BERT + mean pooling, with a word-level tokenizer."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizer
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [f"w{i}" for i in range(args.words)] + [f"s{i}" for i in range(args.words)]
    with open(os.path.join(path, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    BertTokenizer(os.path.join(path, "vocab.txt")).save_pretrained(path)
    config = BertConfig(vocab_size=len(vocab), hidden_size=args.hidden,
                        num_hidden_layers=args.layers, num_attention_heads=2,
                        intermediate_size=2 * args.hidden, max_position_embeddings=32)
    torch.manual_seed(args.seed)
    BertModel(config).save_pretrained(path)
    tr = Transformer(path, max_seq_length=16)
    return SentenceTransformer(modules=[tr, Pooling(tr.get_embedding_dimension(), "mean")],
                               device="cpu")


def retrieval(model, anchors, positives):
    q = F.normalize(model.encode(anchors, convert_to_tensor=True, batch_size=256), dim=-1)
    d = F.normalize(model.encode(positives, convert_to_tensor=True, batch_size=256), dim=-1)
    m = ck.retrieval_metrics(q, d, ks=(1, 5))
    return {k: float(m[k]) for k in ("recall@1", "recall@5", "mrr")}


def show(when, m):
    print(f"recall@1 {when}: {m['recall@1']:.3f}   recall@5 {m['recall@5']:.3f}   "
          f"mrr {m['mrr']:.3f}", flush=True)


def main():
    args = parse_args()
    torch.set_num_threads(max(1, args.threads))
    from datasets import Dataset
    from sentence_transformers import (SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)
    from transformers import PrinterCallback, TrainerCallback

    from contrastive_kernels.integrations.sentence_transformers import (
        CachedMultipleNegativesRankingLoss)

    class PrintLoss(TrainerCallback):
        def on_log(self, targs, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                print(f"step {state.global_step:4d}  loss {float(logs['loss']):.4f}", flush=True)

    rng = random.Random(args.seed)
    train = make_pairs(args.pairs, args.words, rng)
    held_out = make_pairs(args.eval_pairs, args.words, rng)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(tmp, args)
        print(f"model: BERT {args.layers} x {args.hidden}, {args.words} words + synonyms; "
              f"{args.pairs} training pairs, {args.eval_pairs} held out; batch "
              f"{args.batch_size} in chunks of {args.mini_batch_size}", flush=True)
        show("before", retrieval(model, *held_out))
        loss = CachedMultipleNegativesRankingLoss(model, scale=args.scale,
                                                  mini_batch_size=args.mini_batch_size)
        targs = SentenceTransformerTrainingArguments(
            output_dir=os.path.join(tmp, "out"), per_device_train_batch_size=args.batch_size,
            num_train_epochs=args.epochs, learning_rate=args.lr, warmup_steps=0,
            logging_steps=args.logging_steps, report_to=[], save_strategy="no",
            use_cpu=True, disable_tqdm=True, seed=args.seed, dataloader_drop_last=True)
        data = Dataset.from_dict({"anchor": train[0], "positive": train[1]})
        trainer = SentenceTransformerTrainer(model=model, args=targs, train_dataset=data,
                                             loss=loss, callbacks=[PrintLoss()])
        trainer.remove_callback(PrinterCallback)    # PrintLoss prints the losses
        t = time.perf_counter()
        trainer.train()
        print(f"trained {trainer.state.global_step} steps in {time.perf_counter() - t:.1f} s",
              flush=True)
        show("after", retrieval(model, *held_out))


if __name__ == "__main__":
    main()
