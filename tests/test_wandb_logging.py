"""Weights & Biases logging (megatron/wandb_writer.py) through the real training loop,
with the real wandb package in offline mode: the run's config and one history row per
log interval holding TensorBoard's scalars; an unreachable service only warns."""
import os

import pytest

from tests.helpers.training import make_corpus, run_pretrain, tiny_overrides
from tests.helpers.wandb_records import read_offline_run

pytest.importorskip("wandb")

TAGS = ["lm loss", "learning-rate", "grad-norm", "tokens-per-sec", "iteration-time", "params-norm",
        "loss-scale", "skipped-iterations"]


def _overrides(tmp_path, **extra):
    prefix = make_corpus(str(tmp_path / "corpus"))
    return tiny_overrides(prefix, **{
        "training.train_iters": 10, "logging.log_interval": 5, "training.eval_interval": 10,
        "training.eval_iters": 1, "logging.wandb_project": "bridges-test",
        "logging.wandb_exp_name": "tiny", "logging.wandb_save_dir": str(tmp_path / "wb"), **extra})


def _flush_wandb():
    """wandb's service may still be writing the run file after finish(); its teardown waits
    (a training process gets the same at exit)."""
    import wandb
    wandb.teardown()


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # leave pytest's capture of stdout alone
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_default"))  # nothing lands in the repo
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    import wandb
    wandb.teardown()  # wandb reads its environment once per session: start a fresh one
    yield
    wandb.teardown()


def test_offline_run_holds_config_and_one_row_per_log_interval(tmp_path, monkeypatch, wandb_env):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    monkeypatch.setenv("WANDB_MODE", "offline")
    history = run_pretrain(_overrides(tmp_path, **{"logging.tensorboard_dir": str(tmp_path / "tb")}))
    assert history["iteration"] == 10
    _flush_wandb()
    run_dir, config, rows = read_offline_run(str(tmp_path / "wb"))
    # The resolved config: global batch size and the W&B settings themselves.
    assert config["training"]["global_batch_size"] == 8 and config["model"]["hidden_size"] == 32
    assert config["logging"]["wandb_project"] == "bridges-test"
    # One row per log interval, plus the evaluation before the first step (iteration 0);
    # the evaluation at iteration 10 joins that iteration's row.
    assert [r["_step"] for r in rows] == [0, 5, 10]
    assert "lm loss" not in rows[0]
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    for row in rows[1:]:
        for tag in TAGS:  # the same scalars as TensorBoard, at the same iteration
            tb = {e.step: e.value for e in acc.Scalars(tag)}
            assert row[tag] == pytest.approx(tb[row["_step"]], rel=1e-6, nan_ok=True), tag
        assert row["consumed-samples"] == row["_step"] * 8
    validation = {e.step: e.value for e in acc.Scalars("lm loss validation")}
    assert [rows[0]["lm loss validation"], rows[2]["lm loss validation"]] == \
        pytest.approx([validation[0], validation[10]], rel=1e-6)
    assert rows[1]["lm loss"] == pytest.approx(sum(history["train_losses"][i] for i in range(1, 6)) / 5, rel=1e-5)


def test_unreachable_service_warns_and_training_goes_on(tmp_path, monkeypatch, capfd, wandb_env):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # the discard port: connection refused
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_X_GRAPHQL_RETRY_MAX", "1")  # give up after one retry, not minutes
    history = run_pretrain(_overrides(tmp_path))
    assert history["iteration"] == 10 and history["exit_reason"] is None
    err = capfd.readouterr().err
    _flush_wandb()
    assert "warning: W&B: cannot start the run (" in err and "logging offline to" in err
    _, config, rows = read_offline_run(str(tmp_path / "wb"))  # nothing lost: sync it later
    assert [r["_step"] for r in rows] == [0, 5, 10] and config["training"]["train_iters"] == 10


def test_missing_wandb_names_the_extra(tmp_path, monkeypatch):
    import sys
    from megatron.metrics_writer import build_metrics_writer
    from megatron.config import load_config
    from megatron.optional_deps import MissingDependencyError
    monkeypatch.setitem(sys.modules, "wandb", None)
    cfg = load_config(None, ["logging.wandb_project=p"])
    with pytest.raises(MissingDependencyError, match=r"logging.wandb_project \(Weights & Biases logging\) needs "
                                                     r"the Python package 'wandb'.*pip install -e \.\[wandb\]"):
        build_metrics_writer(cfg, enabled=False)  # every rank checks, not only the one that logs
