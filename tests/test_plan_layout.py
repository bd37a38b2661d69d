"""tools/plan_layout.py: the paper's 8.3B on 512 V100s, an emitted overlay that trains, errors."""
import os
import re

import pytest

from megatron.config import load_config
from megatron.planning.hardware import get_profile
from megatron.planning.layout import ModelShape, config_for
from megatron.planning.paper import paper_layout
from megatron.planning.planner import enumerate_layouts
from megatron.planning.time_model import calibrated_efficiency, step_time
from tools.plan_layout import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")


def test_paper_8_3b_on_512_v100_beats_the_papers_layout(capsys):
    cfg = os.path.join(CONFIGS, "gpt2_8.3b.yaml")
    # The paper's run: TP 8, DP 64, batch 8 per replica, activations recomputed.
    assert main(["--config", cfg, "--gpus", "512", "--gpus-per-node", "16",
                 "--hardware", "V100-32GB", "training.recompute=full"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if re.match(r"\s+\d+ TP", line)]
    assert len(rows) == 10
    seconds = [float(line.split()[-4]) for line in rows]
    assert seconds == sorted(seconds)
    own = re.search(r"config's layout TP8 PP1 DP64 mb8 full: ([\d.]+) s/iter, [\d.]+ GiB/GPU "
                    r"\(fits\); the best is ([\d.]+)x as fast", out)
    assert own, out
    assert float(own.group(2)) >= 1.0 and seconds[0] <= float(own.group(1))


def test_paper_layout_is_among_the_candidates():
    cfg = load_config(os.path.join(CONFIGS, "gpt2_8.3b.yaml"), ["training.recompute=full"])
    shape = ModelShape.from_config(cfg, 50257)
    layouts = enumerate_layouts(cfg, shape, 512, 512)
    paper = paper_layout(8, 64).with_(grad_fp32=True)
    assert paper in layouts
    # Every candidate is a layout the config accepts (its own validation decides).
    for lay in layouts[::97]:
        config_for(cfg, lay)
    hw = get_profile("V100-32GB")
    best = min(step_time(shape, lay, hw, calibrated_efficiency()).total for lay in layouts)
    assert best <= step_time(shape, paper, hw, calibrated_efficiency()).total


def test_emitted_overlay_is_a_config_pretrain_accepts(tmp_path, capsys):
    base = os.path.join(CONFIGS, "gpt2_tiny.yaml")
    overlay = str(tmp_path / "best.yaml")
    assert main(["--config", base, "--gpus", "4", "--gpus-per-node", "2", "--hardware", "H100-80GB",
                 "--global-batch", "32", "--emit", overlay, "--top", "3"]) == 0
    out = capsys.readouterr().out
    best = [line for line in out.splitlines() if re.match(r"\s+1 TP", line)][0].split()
    cfg = load_config([base, overlay], world_size=4)
    p, t = cfg.parallel, cfg.training
    assert best[1:3] == [f"TP{p.tensor_model_parallel_size}", f"PP{p.pipeline_model_parallel_size}"]
    assert f"mb{t.micro_batch_size}" in best and t.recompute in best
    assert t.global_batch_size == 32
    # The base config's other sections are untouched by the overlay.
    assert cfg.model.num_layers == load_config(base).model.num_layers


def test_overlays_replace_fields_key_by_key(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("model: {num_layers: 6, hidden_size: 96}\ntraining: {train_iters: 5}\n")
    b.write_text("model: {num_layers: 2}\n")
    cfg = load_config([str(a), str(b)], ["model.num_attention_heads=3"])
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_attention_heads) == (2, 96, 3)


@pytest.mark.parametrize("argv, message", [
    (["--hardware", "B300"], "unknown hardware 'B300'"),
    (["--hardware", "V100-32GB", "training.precision=bf16"], "V100-32GB has no bf16 peak"),
    (["--hardware", "V100-32GB", "--gpus-per-node", "1"], "no layout of"),
])
def test_user_errors_are_one_line(argv, message, capsys):
    cfg = os.path.join(CONFIGS, "gpt2_8.3b.yaml")
    gpus = ["--gpus", "1"] if "--gpus-per-node" in argv else ["--gpus", "8"]
    assert main(["--config", cfg, *gpus, *argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
