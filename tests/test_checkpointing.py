"""Checkpoints: weights_only RNG round trip, crash while saving, SIGTERM saves and exits,
the one atomic writer and loader, the model-chunk key rule."""
import os
import random
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from megatron import checkpoint
from tests.helpers.training import make_corpus, tiny_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_rng_state_round_trip_weights_only(tmp_path):
    from megatron import mpu
    mpu.model_parallel_seed(7)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = checkpoint.get_rng_state()
    path = tmp_path / "rng.pt"
    torch.save(state, path)

    def draws():
        with mpu.get_rng_tracker().fork():
            tracked = torch.rand(3)
        return [random.random(), float(np.random.rand()), float(np.random.randn())], \
            torch.rand(3), tracked
    expected = draws()
    checkpoint.set_rng_state(torch.load(path, weights_only=True))
    got = draws()
    assert got[0] == expected[0]
    assert torch.equal(got[1], expected[1]) and torch.equal(got[2], expected[2])


_CRASH_SCRIPT = textwrap.dedent("""
    import os, sys, functools, torch
    sys.path.insert(0, {root!r})
    import pretrain_gpt
    from megatron import checkpoint
    from megatron.config import load_config
    from megatron.initialize import initialize_megatron
    from megatron.optimizer import get_megatron_optimizer
    from megatron.training import build_model, build_scheduler
    cfg = load_config(None, {overrides!r}, world_size=1)
    device = initialize_megatron(cfg)
    chunks = build_model(cfg, functools.partial(pretrain_gpt.model_provider, cfg, 64), device)
    opt = get_megatron_optimizer(cfg, chunks)
    sched = build_scheduler(cfg, opt)
    checkpoint.save_checkpoint(cfg, 1, 8, chunks, opt, sched)
    real_save = torch.save
    def dying_save(obj, f):  # f: the open temporary file (checksummed as it is written)
        real_save(obj, f)
        f.flush()
        os.ftruncate(f.fileno(), os.fstat(f.fileno()).st_size // 2)  # half a file, then death
        os._exit(9)
    checkpoint.files.torch.save = dying_save
    checkpoint.save_checkpoint(cfg, 2, 16, chunks, opt, sched)
""")


def test_crash_while_saving_keeps_previous_checkpoint(tmp_path):
    save = str(tmp_path / "ck")
    overrides = tiny_overrides(str(tmp_path / "unused"), **{"checkpoint.save": save})
    script = _CRASH_SCRIPT.format(root=ROOT, overrides=overrides)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 9, proc.stderr
    assert checkpoint.read_latest_iteration(save) == 1
    assert checkpoint.list_checkpoints(save) == [1]
    assert os.path.isdir(os.path.join(save, "iter_0000002.tmp"))  # the torn write, never renamed
    state = torch.load(os.path.join(save, "iter_0000001", "mp_rank_00", "model_optim_rng.pt"),
                       weights_only=True)
    assert state["iteration"] == 1 and state["consumed_samples"] == 8
    assert "embedding.word_embeddings.weight" in state["model"] and "optimizer" in state


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    prefix = make_corpus(str(tmp_path / "corpus"))
    save = str(tmp_path / "ck")
    overrides = tiny_overrides(prefix, **{"training.train_iters": 100000, "checkpoint.save": save,
                                          "logging.log_interval": 1,
                                          "training.eval_interval": 100000})
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), "--config",
                             os.devnull, *overrides], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "iteration        3/" in line:
                proc.send_signal(signal.SIGTERM)
                break
        out = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    log = "".join(lines) + out
    assert proc.returncode == 0, log
    assert "SIGTERM" in log
    it = checkpoint.read_latest_iteration(save)
    assert it is not None and it >= 3, log
    state = torch.load(os.path.join(save, f"iter_{it:07d}", "mp_rank_00", "model_optim_rng.pt"),
                       weights_only=True)
    assert state["iteration"] == it and state["consumed_samples"] == 8 * it


def test_interrupted_resave_falls_back_to_old_and_stale_tmp_dirs_go(tmp_path, capsys):
    root = str(tmp_path)
    # A crash between the two renames of a second save of iteration 5.
    os.makedirs(os.path.join(root, "iter_0000005.old", "mp_rank_00"))
    with open(os.path.join(root, checkpoint.LATEST), "w") as f:
        f.write("5\n")
    assert checkpoint.existing_iteration_dir(root, 5) == os.path.join(root, "iter_0000005.old")
    assert "iter_0000005.old" in capsys.readouterr().out
    os.makedirs(os.path.join(root, "iter_0000007"))
    assert checkpoint.existing_iteration_dir(root, 7) == os.path.join(root, "iter_0000007")
    for name in ["iter_0000003.tmp", "iter_0000009.tmp"]:
        os.makedirs(os.path.join(root, name, "mp_rank_00"))
    checkpoint.files.remove_stale_tmp_dirs(root, 9)
    assert sorted(os.listdir(root)) == ["iter_0000005.old", "iter_0000007", "iter_0000009.tmp",
                                        checkpoint.LATEST]


def test_atomic_write_and_load_file(tmp_path):
    from megatron.checkpoint.files import CheckpointError, atomic_write, load_file
    text, obj = str(tmp_path / "latest.txt"), str(tmp_path / "state.pt")
    atomic_write(text, "3\n")
    atomic_write(text, "4\n")  # replaces the old file
    atomic_write(obj, {"w": torch.arange(4.0), "n": 2})
    assert open(text).read() == "4\n"
    loaded = load_file(obj)
    assert torch.equal(loaded["w"], torch.arange(4.0)) and loaded["n"] == 2
    assert sorted(os.listdir(tmp_path)) == ["latest.txt", "state.pt"]  # no temporary left

    def broken_save(obj, f):  # the write fails half-way
        f.write(b"torn")
        raise OSError(28, "No space left on device")
    real_save, checkpoint.files.torch.save = torch.save, broken_save
    try:
        with pytest.raises(OSError):
            atomic_write(obj, {"w": torch.zeros(4)})
    finally:
        checkpoint.files.torch.save = real_save
    assert torch.equal(load_file(obj)["w"], torch.arange(4.0))  # the old file is intact
    assert sorted(os.listdir(tmp_path)) == ["latest.txt", "state.pt"]  # the torn one removed

    for path, message in ((str(tmp_path / "absent.pt"), "is missing"),
                          (text, "cannot read checkpoint")):
        with pytest.raises(CheckpointError) as e:
            load_file(path)
        assert path in str(e.value) and message in str(e.value) and "\n" not in str(e.value)


def test_model_key_rule_round_trip():
    states = [{"a": torch.ones(1)}, {"b": torch.zeros(1)}]
    one = checkpoint.build_rank_state(iteration=1, consumed_samples=8, config={}, parallel={},
                                      rng_state=[], scheduler_state=None,
                                      model_states=states[:1])
    two = checkpoint.build_rank_state(iteration=1, consumed_samples=8, config={}, parallel={},
                                      rng_state=[], scheduler_state=None, model_states=states)
    assert "model" in one and "model0" not in one and "optimizer" not in one
    assert [k for k in two if k.startswith("model")] == ["model0", "model1"]
    assert checkpoint.rank_state.model_states(two, 2) == states
    assert checkpoint.rank_state.model_states(one, 1) == states[:1]
