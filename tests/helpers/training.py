"""The tiny GPT on a synthetic corpus, trained through the real loop (pretrain()).

``make_corpus`` writes learnable documents, ``tiny_overrides`` sizes a ~30k-parameter
model for them, ``run_pretrain`` trains it in this process. ``reshard_overrides`` is
the layout the checkpoint-conversion tests train and convert.
"""
import functools

import numpy as np
import torch

VOCAB = 64  # NullTokenizer: id 63 is the end of document

# The re-sharding tests: 64 ids padded to a multiple of 15 x TP (75 rows at TP=1, 90 at
# TP=2, 120 at TP=4), so every layout pads differently; the model masks the padding
# logits, so the loss must not change across conversions anyway.
RESHARD_DIVISIBLE_BY = 15
RESHARD_SEQ = 32


def make_corpus(prefix, docs=80, seed=0):
    """Learnable documents (arithmetic progressions mod 63) as PREFIX.bin/.idx."""
    from megatron.data.indexed_dataset import IndexedDatasetBuilder
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(docs):
        n = int(rng.integers(30, 120))
        start, step = int(rng.integers(0, VOCAB - 1)), int(rng.integers(1, 4))
        tokens = (start + step * np.arange(n)) % (VOCAB - 1)
        builder.add_item(np.append(tokens, VOCAB - 1))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


def tiny_overrides(prefix, **extra):
    """Overrides for a ~30k-parameter GPT on the synthetic corpus (fp32, CPU, no dropout)."""
    base = {
        "model.num_layers": 2, "model.hidden_size": 32, "model.num_attention_heads": 4,
        "model.seq_length": 32, "model.hidden_dropout": 0.0, "model.attention_dropout": 0.0,
        "model.make_vocab_size_divisible_by": 32,
        # NullTokenizer(n) has n ordinary ids plus the end of document n: VOCAB ids in all.
        "tokenizer.type": "NullTokenizer", "tokenizer.vocab_size": VOCAB - 1,
        "data.data_path": f"[{prefix}]", "data.split": "90,10,0",
        "training.micro_batch_size": 4, "training.global_batch_size": 8,
        "training.train_iters": 20, "training.eval_interval": 10, "training.eval_iters": 2,
        "training.device": "cpu", "training.seed": 1234,
        "optimizer.lr": 1e-2, "optimizer.min_lr": 1e-3, "optimizer.lr_warmup_iters": 2,
        "logging.log_interval": 5,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def llama_overrides():
    """The Llama-style options (tests.helpers.model.LLAMA_OPTIONS) as ``model.key`` overrides,
    with position ids that restart after each end of document."""
    from tests.helpers.model import LLAMA_OPTIONS
    return {**{f"model.{k}": v for k, v in LLAMA_OPTIONS.items()}, "data.reset_position_ids": True}


def run_pretrain(overrides, forward_step=None):
    """Build the config and run pretrain() in this process; the history without the sample."""
    import pretrain_gpt
    from megatron.config import load_config
    from megatron.tokenizer import padded_vocab_size
    from megatron.training import pretrain
    cfg = load_config(None, overrides)
    padded = padded_vocab_size(VOCAB, cfg.model.make_vocab_size_divisible_by,
                               cfg.parallel.tensor_model_parallel_size)
    step = forward_step or functools.partial(pretrain_gpt.forward_step, device=torch.device("cpu"))
    history = pretrain(cfg, functools.partial(pretrain_gpt.model_provider, cfg, padded),
                       functools.partial(pretrain_gpt.datasets_provider, eod=VOCAB - 1), step)
    return {k: v for k, v in history.items() if k != "sample"}


def reshard_overrides(prefix, tp, pp, **extra):
    """The conversion tests' model at TP x PP: 4 layers, the vocabulary padded per layout
    (RESHARD_DIVISIBLE_BY), micro batch 2 of a global batch of 8, no evaluation."""
    return tiny_overrides(prefix, **{
        "tokenizer.vocab_size": VOCAB - 1, "model.make_vocab_size_divisible_by": RESHARD_DIVISIBLE_BY,
        "model.num_layers": 4, "model.seq_length": RESHARD_SEQ,
        "parallel.tensor_model_parallel_size": tp, "parallel.pipeline_model_parallel_size": pp,
        "training.micro_batch_size": 2, "training.global_batch_size": 8,
        "training.eval_iters": 0, "data.split": "100,0,0", "logging.log_interval": 100,
        **extra})


def reset_layout():
    """Destroy the model-parallel layout pretrain() left, so the next run starts afresh."""
    from megatron import mpu
    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
