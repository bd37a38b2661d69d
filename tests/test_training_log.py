"""The log line's TFLOP/s per device and MFU: Megatron-LM's figures, against a profile or a measured peak."""
import re
import time
from types import SimpleNamespace

import pytest
import torch

from megatron.config import ConfigError, load_config
from megatron.logging import TensorBoardWriter
from megatron.model import GPTModel
from megatron.planning.flops import gpt_flops_per_iteration
from megatron.training_log import LogWindow

# Big enough a step (on paper) that the figures have digits: the window is a 50 ms sleep.
OVERRIDES = ["model.num_layers=4", "model.hidden_size=256", "model.num_attention_heads=4",
             "model.seq_length=128", "training.micro_batch_size=64", "training.train_iters=10"]


def _emit(extra, capsys):
    cfg = load_config(None, OVERRIDES + extra, world_size=1)
    run = SimpleNamespace(cfg=cfg, writer=TensorBoardWriter(None), device=torch.device("cpu"),
                          model_chunks=[GPTModel(cfg, 256)],
                          optimizer=SimpleNamespace(get_loss_scale=lambda: torch.tensor(1.0)))
    window = LogWindow(0)
    window.add(3.0, False, True)
    time.sleep(0.05)
    window.emit(run, 1, 4, 1.0, 1e-4)
    line = capsys.readouterr().out
    ms = float(re.search(r"elapsed time per iteration \(ms\): ([\d.]+)", line).group(1))
    tflops = float(re.search(r"throughput per GPU \(TFLOP/s/GPU\): ([\d.]+)", line).group(1))
    mfu = float(re.search(r"MFU: ([\d.naninf]+)", line).group(1))
    return window, ms, tflops, mfu


def test_tflops_and_mfu_against_a_named_profile(capsys):
    window, ms, tflops, mfu = _emit(["training.hardware=A100-80GB"], capsys)
    assert window.peak_flops == 19.5e12  # A100's fp32 peak: nothing measured
    flops = gpt_flops_per_iteration(64, 128, 4, 256, 256)
    assert tflops == pytest.approx(flops / (ms / 1e3) / 1e12, rel=0.01)
    assert mfu == pytest.approx(tflops * 1e12 / 19.5e12, abs=2e-3) and mfu > 0.01


def test_mfu_against_a_measured_gemm_peak(capsys):
    window, _, tflops, mfu = _emit([], capsys)
    assert window.peak_flops > 1e8  # a GEMM on this CPU, measured once
    # (The 50 ms "step" did no work, so the MFU is far above 1: only the ratio is checked.)
    assert mfu == pytest.approx(tflops * 1e12 / window.peak_flops, rel=0.01)


@pytest.mark.parametrize("hardware, message", [("V100-32GB", "no bf16 peak"),
                                               ("TPU-v5", "unknown hardware")])
def test_hardware_is_checked_with_the_config(hardware, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, OVERRIDES + [f"training.hardware={hardware}", "training.precision=bf16"],
                    world_size=1)


def test_measuring_the_peak_leaves_the_global_rng_alone():
    # The log measures its peak mid-run: dropout's stream (and exact resume) must not move.
    from megatron.planning.measure import measure_peak_gflops
    before = torch.get_rng_state()
    measure_peak_gflops(torch.device("cpu"), repeats=1, n=64)
    assert torch.equal(before, torch.get_rng_state())
