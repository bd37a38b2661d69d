"""`torchrun --nnodes=2` (two local node ranks, c10d rendezvous on loopback) trains and
matches a one-process run of the same global batch (DP=2 == DP=1)."""
import os
import re
import subprocess
import sys

import torch

from megatron import checkpoint
from tests.dist_harness import free_port
from tests.helpers.training import make_corpus, tiny_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
ITERS = 4


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _train_cmd(prefix, save):
    return [os.path.join(ROOT, "pretrain_gpt.py"), "--config", os.devnull,
            *tiny_overrides(prefix, **{"training.train_iters": ITERS, "logging.log_interval": 1,
                                       "training.eval_interval": 2, "checkpoint.save": save})]


def _losses(log):
    return [float(x) for x in re.findall(r"\| lm loss: ([0-9.E+-]+) \|", log)]


def _final_model(save):
    it = checkpoint.read_latest_iteration(save)
    path = os.path.join(save, f"iter_{it:07d}", "mp_rank_00", "model_optim_rng.pt")
    return it, torch.load(path, weights_only=True)


def test_two_nodes_match_single_node(tmp_path):
    prefix = make_corpus(str(tmp_path / "corpus"))
    multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
    port = free_port()
    nodes = [subprocess.Popen(
        TORCHRUN + ["--nnodes=2", f"--node_rank={r}", "--nproc_per_node=1", "--rdzv_backend=c10d",
                    f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=test2nodes",
                    *_train_cmd(prefix, multi)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=_env())
        for r in (0, 1)]
    logs = []
    try:
        for p in nodes:
            logs.append(p.communicate(timeout=300)[0])
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    for p, log in zip(nodes, logs):
        assert p.returncode == 0, log
    # The same global batch on one process: 2 micro batches instead of 2 DP ranks.
    one = subprocess.run([sys.executable, *_train_cmd(prefix, single)],
                         capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=300)
    assert one.returncode == 0, one.stdout + one.stderr
    multi_losses = _losses("".join(logs))
    single_losses = _losses(one.stdout + one.stderr)
    assert len(single_losses) == ITERS and len(multi_losses) == ITERS, (multi_losses, single_losses)
    for m, o in zip(multi_losses, single_losses):
        assert abs(m - o) <= 1e-5 * abs(o), (multi_losses, single_losses)
    (it_m, a), (it_s, b) = _final_model(multi), _final_model(single)
    assert it_m == it_s == ITERS and a["parallel"]["data_parallel_size"] == 2
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], rtol=1e-5, atol=1e-6), k
