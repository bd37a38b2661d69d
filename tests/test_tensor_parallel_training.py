"""Tensor parallelism through the real training loop (megatron.training.pretrain).

One 4-process launch trains the tiny GPT of tests/test_training.py for 10
iterations at TP=2 x DP=2, TP=4 x DP=1 and TP=2 x DP=2 with sequence
parallelism; losses and gradient norms must equal a single-process TP=1 run's
at every iteration (1e-5 relative). The same launch checks that per-TP-rank
checkpoints (mp_rank_00, mp_rank_01) resume exactly at TP=2 x DP=2, with
dropout on: N iterations, exit, resume, N more equals 2N bit for bit.

The vocabulary (64 ids, padded to a multiple of 16 x TP) is 64 at TP=1, 2 and 4,
so no padded logits enter the loss at any TP size.
"""
import os

import pytest
import torch

from tests.dist_harness import run_distributed
from tests.helpers.training import make_corpus, run_pretrain, tiny_overrides

ITERS = 10
N = 3  # resume after N of 2N iterations


def _overrides(prefix, **extra):
    return tiny_overrides(prefix, **{"training.train_iters": ITERS, "training.eval_iters": 0,
                                     "model.make_vocab_size_divisible_by": 16, **extra})


def _reference_run(workdir):
    prefix = make_corpus(os.path.join(workdir, "corpus"))
    h = run_pretrain(_overrides(prefix))
    return {"losses": h["train_losses"], "grad_norms": h["grad_norms"]}


def _tensor_parallel_runs(workdir):
    from megatron import mpu
    rank = torch.distributed.get_rank()
    prefix = os.path.join(workdir, "corpus")
    out = {}

    def run(**extra):
        # pretrain keeps an initialized model-parallel layout; start each run afresh
        if mpu.model_parallel_is_initialized():
            mpu.destroy_model_parallel()
        return run_pretrain(_overrides(prefix, **extra))

    for name, extra in [("tp2_dp2", {"parallel.tensor_model_parallel_size": 2}),
                        ("tp4", {"parallel.tensor_model_parallel_size": 4}),
                        ("tp2_dp2_sp", {"parallel.tensor_model_parallel_size": 2,
                                        "parallel.sequence_parallel": True})]:
        h = run(**extra)
        out[name] = {"losses": h["train_losses"], "grad_norms": h["grad_norms"]}

    # Exact resume per TP rank, dropout on: the model-parallel RNG tracker (different
    # stream on each TP rank) must be restored too.
    resume = {"parallel.tensor_model_parallel_size": 2, "training.train_iters": 2 * N,
              "model.hidden_dropout": 0.1, "model.attention_dropout": 0.1}
    straight = run(**resume)
    split_dir = os.path.join(workdir, "tp2_ckpt")
    first = run(**resume, **{"checkpoint.save": split_dir, "training.exit_interval": N})
    rank_dirs = sorted(os.listdir(os.path.join(split_dir, f"iter_{N:07d}")))
    second = run(**resume, **{"checkpoint.save": split_dir, "checkpoint.load": split_dir})
    out["resume"] = {"straight": straight, "first": first, "second": second,
                     "rank_dirs": rank_dirs, "rank": rank}
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("tp_training"))
    (reference,) = run_distributed(_reference_run, 1, workdir)
    return reference, run_distributed(_tensor_parallel_runs, 4, workdir)


@pytest.mark.parametrize("name", ["tp2_dp2", "tp4", "tp2_dp2_sp"])
def test_tensor_parallel_matches_single_process(runs, name):
    reference, results = runs
    assert sorted(reference["losses"]) == list(range(1, ITERS + 1))
    assert all(g > 0 for g in reference["grad_norms"].values())  # clip_grad 1.0: norms computed
    for rank, r in enumerate(results):
        got = r[name]
        assert sorted(got["losses"]) == list(range(1, ITERS + 1)), (name, rank)
        for i in range(1, ITERS + 1):
            assert got["losses"][i] == pytest.approx(reference["losses"][i], rel=1e-5), \
                (name, rank, i, got["losses"][i], reference["losses"][i])
            assert got["grad_norms"][i] == pytest.approx(reference["grad_norms"][i], rel=1e-5), \
                (name, rank, i, got["grad_norms"][i], reference["grad_norms"][i])
    # the loss did move: the comparison is over real training, not a constant
    assert reference["losses"][ITERS] < reference["losses"][1] - 0.1


def test_tensor_parallel_checkpoints_resume_exactly(runs):
    _, results = runs
    for r in results:
        res = r["resume"]
        assert res["rank_dirs"] == ["manifest.json", "mp_rank_00", "mp_rank_01"]
        assert "exit_interval" in res["first"]["exit_reason"]
        assert sorted(res["first"]["train_losses"]) == list(range(1, N + 1))
        assert sorted(res["second"]["train_losses"]) == list(range(N + 1, 2 * N + 1))
        # dropout is on here (the losses differ from the dropout-free run's)
        assert res["straight"]["train_losses"][1] != r["tp2_dp2"]["losses"][1]
        for key in ("train_losses", "grad_norms"):
            resumed = {**res["first"][key], **res["second"][key]}
            assert resumed == res["straight"][key], (key, res["rank"], resumed,
                                                     res["straight"][key])
