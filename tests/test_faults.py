"""Failures a run must survive: killed workers, a torn save, a hung rank.

- One process SIGKILLed at 5 random moments (one mid-save), started again each time:
  the final checkpoint and every logged loss equal the uninterrupted run's bit for bit.
- ``torchrun --max-restarts=2`` whose workers are SIGKILLed twice (once before the first
  checkpoint, once mid-save), at TP=2 with sequence parallelism and at DP=2 with the
  distributed optimizer: it completes in exactly 3 rendezvous rounds (one per kill) and
  equals the uninterrupted run bit for bit.
- The uninterrupted TP=2 run with sequence parallelism prints its sample of a 3-token
  prompt, and tools/generate.py continues that prompt from its checkpoint the same way.
- One of two ranks SIGSTOPped mid-training: the other fails within the configured
  collective timeout with one line naming it, and torchrun ends.

The kill and compare machinery is bench/kill_runs.py (bench/faults.py runs the long form).
Each random plan's seed is in the failure message.
"""
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers.training import make_corpus, tiny_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import kill_runs  # noqa: E402

ITERS, SAVE_INTERVAL = 12, 2
PROMPT = "1 2 3"  # NullTokenizer ids: a 3-token prompt, odd against TP=2
LAYOUTS = {
    "tp2_sp": {"parallel.tensor_model_parallel_size": 2, "parallel.sequence_parallel": True,
               "training.sample_prompt": PROMPT, "training.sample_tokens": 4},
    "dp2_distopt": {"parallel.distributed_optimizer": True},
}


def _overrides(prefix, save, **extra):
    """The tiny GPT, every iteration logged, a checkpoint every 2 iterations, resuming
    from its own save directory."""
    return tiny_overrides(prefix, **{
        "training.train_iters": ITERS, "logging.log_interval": 1, "training.eval_interval": 4,
        "training.eval_iters": 1, "checkpoint.save": save, "checkpoint.load": save,
        "checkpoint.save_interval": SAVE_INTERVAL, **extra})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(str(tmp_path_factory.mktemp("faults") / "corpus"))


@pytest.fixture(scope="module")
def references(corpus, tmp_path_factory):
    """The uninterrupted run of each layout, made once: {layout: (console, save dir, timing)}."""
    made = {}

    def get(layout):
        if layout not in made:
            save = str(tmp_path_factory.mktemp(f"reference_{layout}") / "ckpt")
            nproc = 1 if layout == "single" else 2
            text, timing = kill_runs.reference(_overrides(corpus, save, **LAYOUTS.get(layout, {})),
                                               nproc)
            made[layout] = text, save, timing
        return made[layout]
    return get


def _killed_run(corpus, references, tmp_path, layout, kills, mid_saves):
    text, ref_save, timing = references(layout)
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    nproc = 1 if layout == "single" else 2
    plan = kill_runs.make_plan(rng, kills, mid_saves, nproc, first_before=SAVE_INTERVAL)
    save = str(tmp_path / "ckpt")
    result = kill_runs.run_with_kills(_overrides(corpus, save, **LAYOUTS.get(layout, {})), plan,
                                      timing, rng, save, SAVE_INTERVAL, nproc)
    where = f"seed {seed}, plan {plan}, kills {result['kills']}"
    assert result["code"] == 0, f"{where}\n{result['text'][-4000:]}"
    assert len(result["kills"]) == kills, where
    assert sum(k["mid_save"] for k in result["kills"]) >= mid_saves, where
    assert result["kills"][0]["checkpoint"] is None, where  # before the first checkpoint
    differences = kill_runs.compare(text, ref_save, result["text"], save)
    assert differences == [], f"{where}: {differences}"
    return result, save, ref_save, text


def test_single_process_killed_at_5_moments_resumes_bit_for_bit(corpus, references, tmp_path):
    _, save, ref_save, text = _killed_run(corpus, references, tmp_path, "single", 5, 1)
    # The comparison does see one changed value in the final checkpoint.
    changed = str(tmp_path / "changed")
    shutil.copytree(save, changed)
    path = os.path.join(changed, f"iter_{ITERS:07d}", "mp_rank_00", "model_optim_rng.pt")
    state = torch.load(path, weights_only=True)
    state["model"]["final_layernorm.bias"][0] += 1e-6
    torch.save(state, path)
    assert kill_runs.compare(text, ref_save, text, changed) == [
        "mp_rank_00/model_optim_rng.pt.model.final_layernorm.bias"]


@pytest.mark.parametrize("layout", ["tp2_sp", "dp2_distopt"])
def test_torchrun_two_kills_cost_two_restart_rounds_and_lose_nothing(corpus, references, tmp_path,
                                                                      layout):
    result, save, _, _ = _killed_run(corpus, references, tmp_path, layout, 2, 1)
    assert result["rounds"] == 3, result["text"][-4000:]  # the first and one per kill
    if layout == "dp2_distopt":
        names = os.listdir(os.path.join(save, f"iter_{ITERS:07d}", "mp_rank_00"))
        assert sorted(names) == ["distrib_optim_dp_000.pt", "distrib_optim_dp_001.pt",
                                 "model_optim_rng.pt"]


def test_sequence_parallel_run_samples_and_generates_from_its_checkpoint(references):
    text, save, _ = references("tp2_sp")
    sample = text.split("sample from the final model:\n", 1)
    assert len(sample) == 2, text[-3000:]
    tokens = sample[1].splitlines()[0].split()
    assert tokens[:3] == PROMPT.split() and len(tokens) == 3 + 4, sample[1][:200]
    gen = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "generate.py"), "--load", save,
                          "--prompt", PROMPT, "--max-new-tokens", "4", "--greedy", "--device", "cpu"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert gen.returncode == 0, gen.stderr[-3000:]
    # The continuation; greedy both times (training.sample_top_k defaults to 1), from the
    # same weights: at TP=2 in the loop, merged into one process here.
    continuation = gen.stdout.strip().splitlines()[-1].split()
    assert continuation == tokens[3:], (continuation, tokens)


HUNG_TIMEOUT_MINUTES = 0.1  # 6 s keeps the suite short; bench/faults.py runs the 1-minute form


def test_a_stopped_rank_fails_the_other_in_one_line_within_the_timeout(corpus, tmp_path):
    launch = kill_runs.Launch(tiny_overrides(corpus, **{
        "training.train_iters": 100000, "logging.log_interval": 1, "training.eval_iters": 0,
        "training.distributed_timeout_minutes": HUNG_TIMEOUT_MINUTES}), nproc=2).start()
    deadline = time.monotonic() + 300
    try:
        assert launch.out.wait_for(kill_runs.ITERATION, 0, deadline) is not None, launch.out.text()
        stopped = launch.workers()[1]
        os.kill(stopped, signal.SIGSTOP)
        t0 = time.monotonic()
        failed = launch.out.wait_for(re.compile(r"error: .*timed out"), 0, deadline)
        failed_after = time.monotonic() - t0
        code = launch.wait(t0 + 180)
        ended_after = time.monotonic() - t0
    finally:
        if launch.proc.poll() is None:
            os.killpg(launch.proc.pid, signal.SIGKILL)
    text = launch.out.text()
    assert failed is not None, text[-3000:]
    line = failed[1].string
    assert line.startswith("error: a collective operation on rank 0 timed out after 0.1 minutes "
                           "(training.distributed_timeout_minutes=0.1)"), line
    assert "[rank0]: Traceback" not in text, text[-3000:]
    assert 0.9 * HUNG_TIMEOUT_MINUTES * 60 <= failed_after < 60, failed_after
    assert code not in (0, None) and ended_after < 180, (code, ended_after)
