"""The dry run (megatron/dryrun): a rank of a W-rank job on fake tensors, held against reality.

- Eight small layouts (TP, SP, PP with a middle stage, VP, DP, recompute none / selective /
  full, the distributed optimizer, fp32 and bf16) run for real on 4 gloo ranks under the
  storage tracker; the dry run of each distinct role predicts every rank's peak tensor
  memory within 10 %, its state bytes exactly, and the collectives the step issues,
  which also equal what the model's code must issue (tests/helpers/collectives.py, built
  on tests/test_model_collectives.py's per-layer counts).
- The paper's 8.3 B model at 512 ranks (TP 8 x DP 64) and a PP 4 x VP 2 variant, through
  both command lines: parameters, bytes, FLOPs against the paper's formula, collectives,
  micro batches in flight, all derived from the layout.
- Layout errors surface as one-line config errors, as they would at launch.
- The runtime report: a run's first iteration measured beside its dry run, without
  changing the losses.
"""
import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest

from megatron.config import ConfigError, load_config
from tests.dist_harness import run_distributed
from tests.helpers.collectives import step_collectives
from tests.helpers.dry_run_checks import (LAYOUTS, WORLD_SIZE, collective_calls,
                                          expected_collectives, in_fresh_process, layout_cfg,
                                          measure_then_predict,
                                          pretrain_with_and_without_report, relative_error)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_8_3B = os.path.join(ROOT, "configs", "gpt2_8.3b.yaml")
STATE_KEYS = ("parameter_bytes", "gradient_bytes", "master_weight_bytes", "optimizer_state_bytes")


def test_dry_run_predicts_memory_and_collectives_of_real_steps():
    results = run_distributed(measure_then_predict, WORLD_SIZE, list(LAYOUTS), timeout=900)
    predicted = {}
    for _, by_role in results:
        predicted.update(by_role)
    for name in LAYOUTS:
        cfg = layout_cfg(name)
        # A rank's prediction: the dry run of its pipeline stage and DP class (TP rank 0).
        stages = {(p["pipeline_model_parallel_rank"], p["data_parallel_rank"] > 0): p
                  for (n, _), p in predicted.items() if n == name}
        for rank, (measured, _) in enumerate(results):
            m = measured[name]
            p = stages[(m["pipeline_model_parallel_rank"], m["data_parallel_rank"] > 0)]
            where = (name, rank, m["role"])
            for key in ("first_step_peak_bytes", "peak_bytes", "activation_peak_bytes"):
                assert abs(relative_error(p[key], m[key])) <= 0.10, (where, key, p[key], m[key])
            assert p["in_flight_microbatches"] == m["in_flight_microbatches"], where
            if p["rank"] == rank:  # the role's own rank: exact figures
                assert {k: p[k] for k in STATE_KEYS} == {k: m[k] for k in STATE_KEYS}, where
                assert collective_calls(p) == collective_calls(m), where
            assert collective_calls(p) == expected_collectives(p, cfg), where
            # One value read back by the optimizer (skip the step or not) and the loop's
            # three per-step scalars (the loss and two stop flags); nothing else waits.
            assert p["host_reads"] == 4, where
        # The middle role's representative (stage 1) holds the most of the middle stages:
        # 1F1B keeps p - r micro batches in flight on stage r.
        middle = [stages[(s, False)]["peak_bytes"] for s in range(1, p["layout"]["pp"] - 1)]
        assert not middle or middle[0] == max(middle), (name, middle)
    assert len(LAYOUTS) >= 8


def _max_in_flight(p, v, rank, m):
    """Micro batches a stage holds at most, from the schedule's plan (integers only)."""
    from megatron import schedule_plan
    if v == 1:
        return min(p - rank - 1, m) + (1 if m > p - rank - 1 else 0)
    return min(schedule_plan.num_warmup_forwards(p, v, rank, m) + 1, m * v)


def _params_on_rank(cfg, tp, layers, first, last, padded_vocab):
    """GPT-2 parameters held by one TP rank of a stage with ``layers`` layers."""
    h, ffn = cfg.model.hidden_size, cfg.model.ffn_hidden_size or 4 * cfg.model.hidden_size
    per_layer = ((3 * h * h + 3 * h) + h * h + (h * ffn + ffn) + ffn * h) // tp \
        + h + h + 4 * h  # dense and 4h->h biases, two LayerNorms: replicated
    n = layers * per_layer
    if first:
        n += padded_vocab * h // tp + cfg.model.max_position_embeddings * h
    if last:
        n += 2 * h + (0 if first else padded_vocab * h // tp)
    return n


def _check_paper_rank(report, overrides=()):
    cfg = load_config(CONFIG_8_3B, list(overrides))
    lay = report["layout"]
    tp, pp, vp, dp = lay["tp"], lay["pp"], lay["vp"], lay["dp"]
    assert tp * pp * dp == report["world_size"] == 512
    padded = lay["padded_vocab_size"]
    assert padded % (128 * tp) == 0 and 50257 <= padded < 50257 + 128 * tp
    pp_rank = report["pipeline_model_parallel_rank"]
    first, last = pp_rank == 0, pp_rank == pp - 1
    n = report["num_parameters"]
    assert n == _params_on_rank(cfg, tp, cfg.model.num_layers // pp, first, last, padded)
    # fp16 parameters, an fp32 DP grad buffer (padded to a multiple of DP), fp32 masters,
    # Adam's two fp32 moments (and a step counter per tensor).
    assert report["parameter_bytes"] == 2 * n
    assert 4 * n <= report["gradient_bytes"] < 4 * (n + dp * vp)
    assert report["master_weight_bytes"] == 4 * n
    assert 8 * n < report["optimizer_state_bytes"] < 8 * n + 4 * 10_000
    state = sum(report[k] for k in STATE_KEYS)
    # Every later step holds the state and the schedule's activations at once.
    assert state + report["activation_peak_bytes"] <= report["peak_bytes"] \
        <= 1.02 * (state + report["activation_peak_bytes"])
    assert report["first_step_peak_bytes"] <= report["peak_bytes"]
    assert report["in_flight_microbatches"] == _max_in_flight(
        pp, vp, pp_rank, lay["num_microbatches"])
    # The FLOPs torch counts for this rank's GEMMs match the paper's formula (bench/flops.py)
    # up to the attention backward, whose fused kernel recomputes the scores.
    spec = importlib.util.spec_from_file_location("bench_flops",
                                                  os.path.join(ROOT, "bench", "flops.py"))
    bench_flops = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_flops)
    total = bench_flops.gpt_flops_per_iteration(lay["global_batch_size"], cfg.model.seq_length,
                                    cfg.model.num_layers, cfg.model.hidden_size, padded)
    assert math.isclose(report["formula_flops"], total / 512, rel_tol=1e-12)
    if pp == 1:
        assert 1.0 <= report["flops"] / report["formula_flops"] <= 1.02
    expected = step_collectives(
        tp=tp, pp=pp, vp=vp, dp=dp, layers_on_rank=cfg.model.num_layers // pp,
        first_stage=first, last_stage=last, num_microbatches=lay["num_microbatches"],
        sequence_parallel=lay["sequence_parallel"], recompute=lay["recompute"],
        precision=lay["precision"], distributed_optimizer=lay["distributed_optimizer"],
        clip_grad=cfg.optimizer.clip_grad)
    assert collective_calls(report) == expected


def _run(args, tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, *args, "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("max_peak_gib=")
    return json.loads(out.read_text())


def test_paper_8_3b_at_512_ranks(tmp_path):
    # TP 8 x DP 64 as in the paper (tools/dry_run.py), rank 0.
    (report,) = _run(["tools/dry_run.py", "--config", CONFIG_8_3B, "--world-size", "512",
                      "--rank", "0"], tmp_path)
    assert report["layout"]["tp"] == 8 and report["layout"]["dp"] == 64
    # The whole model: 8.3 B parameters (the replicated ones counted once).
    cfg = load_config(CONFIG_8_3B)
    h, L = cfg.model.hidden_size, cfg.model.num_layers
    replicated = L * 6 * h + 2 * h + cfg.model.max_position_embeddings * h
    assert 8.2e9 < 8 * (report["num_parameters"] - replicated) + replicated < 8.4e9
    _check_paper_rank(report)


def test_paper_8_3b_pipelined_interleaved_at_512_ranks(tmp_path):
    # TP 8 x PP 4 x VP 2 x DP 16 through pretrain_gpt.py --dry-run: the last stage.
    overrides = ["parallel.pipeline_model_parallel_size=4",
                 "parallel.virtual_pipeline_model_parallel_size=2"]
    (report,) = _run(["pretrain_gpt.py", "--config", CONFIG_8_3B, "--dry-run",
                      "--world-size", "512", "--rank", "384", *overrides], tmp_path)
    assert report["pipeline_model_parallel_rank"] == 3 and report["layout"]["vp"] == 2
    _check_paper_rank(report, overrides)


@pytest.mark.parametrize("overrides, world, message", [
    (["parallel.tensor_model_parallel_size=3"], 6,
     "model.num_attention_heads=32 is not divisible by parallel.tensor_model_parallel_size=3"),
    (["parallel.pipeline_model_parallel_size=4", "parallel.virtual_pipeline_model_parallel_size=4"],
     512, "model.num_layers=72 is not divisible by pipeline_model_parallel_size x "
          "virtual_pipeline_model_parallel_size = 4 x 4 = 16"),
    ([], 1024, "training.global_batch_size=512 is not divisible by micro_batch_size x "
               "data-parallel size = 8 x 128"),
    (["model.ffn_hidden_size=12290"], 512,
     "model.ffn_hidden_size=12290 is not divisible by parallel.tensor_model_parallel_size=8"),
    (["parallel.sequence_parallel=true", "model.seq_length=1020"], 512,
     "model.seq_length=1020 is not divisible by parallel.tensor_model_parallel_size=8"),
    ([], 500, "world size 500 is not divisible by tensor x pipeline model parallel size"),
])
def test_layout_errors_surface_as_at_launch(overrides, world, message):
    from megatron.dryrun import dry_run
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")) as e:
        dry_run(load_config(CONFIG_8_3B, overrides), world, 0)
    assert "\n" not in str(e.value)


def test_layout_error_from_the_command_line():
    proc = subprocess.run([sys.executable, "tools/dry_run.py", "--config", CONFIG_8_3B,
                           "--world-size", "6", "parallel.tensor_model_parallel_size=3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("error: model.num_attention_heads=32 is not divisible by "
                                   "parallel.tensor_model_parallel_size=3")


def test_runtime_report_beside_the_prediction_and_losses_unchanged(tmp_path):
    with_report, without, printed = in_fresh_process(pretrain_with_and_without_report,
                                                     str(tmp_path / "corpus"))
    assert with_report == without  # the dry run before training changes nothing
    lines = printed.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("memory at iteration 1"))
    role = lines[head + 1]
    found = re.fullmatch(r"  only stage, DP rank 0 \(1 rank, e\.g\. 0\): measured ([\d.]+) (\w+), "
                         r"predicted ([\d.]+) (\w+) \(.*\)", role)
    assert found, role
    units = {"KiB": 2 ** 10, "MiB": 2 ** 20, "GiB": 2 ** 30}
    measured = float(found[1]) * units[found[2]]
    predicted = float(found[3]) * units[found[4]]
    assert abs(measured - predicted) <= 0.10 * predicted, role
