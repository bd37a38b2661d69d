"""Training loop: loss falls, TensorBoard tags, DP=2 equals DP=1, non-finite loss stop."""
import math
import os

import numpy as np
import pytest
import torch

from tests.dist_harness import run_distributed
from tests.helpers.training import VOCAB, make_corpus, run_pretrain, tiny_overrides


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
    from megatron import checkpointing
    timed_out["checkpoints"] = checkpointing.list_checkpoints(ck)
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
