"""Training loop: loss falls, TensorBoard tags, DP=2 equals DP=1, non-finite loss stop.

Also holds the helpers (synthetic corpus, tiny config, a pretrain call) that the
resume / checkpoint / torchrun tests share.
"""
import functools
import glob
import math
import os

import numpy as np
import pytest
import torch

from tests.dist_harness import run_distributed

VOCAB = 64  # NullTokenizer: id 63 is the end of document


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


def _nan_forward_step(data_iterator, model):
    import pretrain_gpt
    output, loss_func = pretrain_gpt.forward_step(data_iterator, model, device=torch.device("cpu"))

    def nan_loss(out):
        loss, d = loss_func(out)
        loss = loss * float("nan")
        return loss, {"lm loss": loss.detach()}
    return output, nan_loss


def _single_rank_runs(workdir):
    prefix = make_corpus(os.path.join(workdir, "corpus"))
    tb = os.path.join(workdir, "tb")
    full = run_pretrain(tiny_overrides(prefix, **{"training.train_iters": 40, "data.split": "80,10,10",
                                                  "logging.tensorboard_dir": tb}))
    ck = os.path.join(workdir, "ck_duration")
    timed_out = run_pretrain(tiny_overrides(prefix, **{"training.exit_duration_in_mins": 1e-9,
                                                       "checkpoint.save": ck}))
    from megatron import checkpoint
    timed_out["checkpoints"] = checkpoint.list_checkpoints(ck)
    nan_error = None
    from megatron.training import TrainingError
    try:
        run_pretrain(tiny_overrides(prefix, **{"training.max_nonfinite_losses": 3}),
                     forward_step=_nan_forward_step)
    except TrainingError as e:
        nan_error = str(e)
    return {"full": full, "nan_error": nan_error, "timed_out": timed_out}


def _dp2_run(workdir):
    prefix = os.path.join(workdir, "corpus")
    return run_pretrain(tiny_overrides(prefix, **{"training.train_iters": 40, "data.split": "80,10,10",
                                                  "training.exit_interval": 10}))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("train"))
    (result,) = run_distributed(_single_rank_runs, 1, workdir)
    return workdir, result


def test_loss_falls_and_validation_runs(single):
    _, result = single
    losses = result["full"]["train_losses"]
    assert sorted(losses) == list(range(1, 41))
    first, last = np.mean([losses[i] for i in range(1, 4)]), np.mean([losses[i] for i in range(38, 41)])
    assert first > 0.9 * math.log(VOCAB), first  # starts near uniform
    assert last < 0.6 * first, (first, last)
    valid = result["full"]["valid_losses"]
    assert sorted(valid) == [0, 10, 20, 30, 40]
    assert valid[0] > 0.9 * math.log(VOCAB) and valid[40] < valid[10] < valid[0]
    # The test split is evaluated once at the end: other documents, a similar loss.
    test = result["full"]["test_loss"]
    assert test != valid[40] and abs(test - valid[40]) < 0.2 * valid[40], (test, valid[40])


def test_exit_duration_saves_and_exits(single):
    _, result = single
    r = result["timed_out"]
    assert "exit_duration_in_mins" in r["exit_reason"] and r["iteration"] == 1
    assert sorted(r["train_losses"]) == [1] and "test_loss" not in r
    assert r["checkpoints"] == [1]


def test_tensorboard_scalars(single):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    workdir, _ = single
    acc = EventAccumulator(os.path.join(workdir, "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ["lm loss", "lm loss validation", "lm loss validation ppl", "lm loss test",
                "lm loss test ppl", "learning-rate",
                "grad-norm", "tokens-per-sec", "iteration-time", "params-norm", "loss-scale",
                "skipped-iterations"]:
        assert tag in tags and f"{tag} vs samples" in tags, tag
    steps = [e.step for e in acc.Scalars("lm loss vs samples")]
    assert steps == [40, 80, 120, 160, 200, 240, 280, 320]


def test_nonfinite_losses_stop_training(single):
    _, result = single
    msg = result["nan_error"]
    assert msg is not None and "3 consecutive" in msg and "iteration 3" in msg


def test_dp2_matches_dp1(single):
    workdir, result = single
    ref = result["full"]["train_losses"]
    dp2 = run_distributed(_dp2_run, 2, workdir)
    for rank_result in dp2:
        losses = rank_result["train_losses"]
        assert sorted(losses) == list(range(1, 11))
        for i in range(1, 11):
            assert losses[i] == pytest.approx(ref[i], rel=1e-5), (i, losses[i], ref[i])
