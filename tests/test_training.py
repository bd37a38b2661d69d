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


def _evaluate_saved(overrides, root):
    """Validation and test losses of the model saved under ``root``, computed here
    without the training loop: a fresh GPTModel with the checkpoint file's weights on
    the first eval_iters global batches of each split, in order (the loss-mask weighted
    mean per micro batch, averaged)."""
    import pretrain_gpt
    from megatron.config import load_config
    from megatron.model import GPTModel
    cfg = load_config(None, overrides)
    t = cfg.training
    eval_samples = t.eval_iters * t.global_batch_size
    _, valid, test = pretrain_gpt.datasets_provider(
        cfg, [t.train_iters * t.global_batch_size, eval_samples, eval_samples], eod=VOCAB - 1)
    with open(os.path.join(root, "latest_checkpointed_iteration.txt")) as f:
        iteration = int(f.read())
    state = torch.load(os.path.join(root, f"iter_{iteration:07d}", "mp_rank_00",
                                    "model_optim_rng.pt"), weights_only=True)
    model = GPTModel(cfg, VOCAB, vocab_size=VOCAB)  # 64 ids: no padding at TP=1
    model.load_state_dict(state["model"])
    model.eval()
    out = {"iteration": iteration}
    for name, ds in (("valid", valid), ("test", test)):
        losses = []
        for start in range(0, eval_samples, t.micro_batch_size):
            samples = [ds[i] for i in range(start, start + t.micro_batch_size)]
            field = {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in samples[0]}
            with torch.no_grad():
                per_token = model(field["tokens"], field["position_ids"], labels=field["labels"])
            mask = field["loss_mask"].float()
            losses.append(float((per_token.float() * mask).sum() / mask.sum()))
        out[name] = sum(losses) / len(losses)
    return out


def _single_rank_runs(workdir):
    prefix = make_corpus(os.path.join(workdir, "corpus"))
    tb = os.path.join(workdir, "tb")
    full_overrides = tiny_overrides(prefix, **{
        "training.train_iters": 40, "data.split": "80,10,10", "logging.tensorboard_dir": tb,
        "checkpoint.save": os.path.join(workdir, "ck_full")})
    full = run_pretrain(full_overrides)
    saved = _evaluate_saved(full_overrides, os.path.join(workdir, "ck_full"))
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
    return {"full": full, "saved": saved, "nan_error": nan_error, "timed_out": timed_out}


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
    # The final validation and the test split's one evaluation (after the final save)
    # are the saved model's losses on those splits, computed independently; the two
    # splits hold other documents, so their losses tell them apart.
    saved = result["saved"]
    assert saved["iteration"] == 40
    assert valid[40] == pytest.approx(saved["valid"], rel=1e-6), (valid[40], saved)
    test = result["full"]["test_loss"]
    assert test == pytest.approx(saved["test"], rel=1e-6), (test, saved)
    assert abs(saved["test"] - saved["valid"]) > 1e-3 * saved["valid"], saved


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
                "skipped-iterations", "tflops-per-device", "mfu"]:
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
