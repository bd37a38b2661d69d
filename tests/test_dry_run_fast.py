"""The dry run of many micro batches simulates a few and extrapolates the counts.

- The interleaved schedule's plan (integers only): the full step is the simulated one
  with whole periods inserted after the measured one, which comes after every chunk's
  first backward; so the simulated step passes through every state of the full one.
- Small layouts (no pipelining, 1F1B with a middle stage, interleaved; DP, TP + SP, the
  distributed optimizer): the fast dry run's report equals the full simulation's, peak
  bytes exactly, FLOPs, collectives and host reads after extrapolation, and the calls
  equal what the model's code must issue for all the micro batches.
- A config whose tokenizer files are absent names --vocab-size.
"""
import os

import pytest

from megatron import schedule_plan as plan
from megatron.config import ConfigError, load_config
from megatron.dryrun import dry_run
from megatron.dryrun.microbatches import plan_sample
from megatron.dryrun.validate import small_overrides
from tests.helpers.dry_run_checks import collective_calls, expected_collectives

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_MICROBATCHES = 10


def _signature(step, p, v):
    """A plan step without its micro batch numbers: which chunks run and receive."""
    return (None if step.forward is None else plan.forward_chunk(step.forward, p, v),
            None if step.backward is None else plan.backward_chunk(step.backward, p, v),
            step.input_chunk, step.grad_chunk)


@pytest.mark.parametrize("p", [2, 3, 4, 8])
@pytest.mark.parametrize("v", [2, 3, 4])
def test_interleaved_sample_is_the_full_step_minus_whole_periods(p, v):
    for rank in range(p):
        for m in range(p, 7 * p + 1, p):
            sample = plan_sample(p, v, rank, m)
            if sample is None:
                continue
            k = sample.simulated
            assert p < k < m and k % p == 0 and sample.skipped_periods * p == m - k
            short = [_signature(s, p, v) for s in plan.interleaved_steps(p, v, rank, k)]
            full = [_signature(s, p, v) for s in plan.interleaved_steps(p, v, rank, m)]
            steps = plan.interleaved_steps(p, v, rank, k)
            begin = next(i for i, s in enumerate(steps) if s.forward == sample.start)
            end = next(i for i, s in enumerate(steps) if s.forward == sample.end)
            assert end - begin == p * v  # one period: p micro batches through v chunks
            period = short[begin:end]
            assert full == short[:begin] + period * (1 + sample.skipped_periods) + short[end:]
            # Every chunk ran its first backward before the measured period.
            first_backward = {}
            for i, s in enumerate(short):
                if s[1] is not None:
                    first_backward.setdefault(s[1], i)
            assert len(first_backward) == v and max(first_backward.values()) < begin
    # Few micro batches: all of them run (no steady state, or no room for a period).
    assert plan_sample(p, v, 0, p) is None and plan_sample(p, v, 0, 2 * p) is None


def test_one_forward_one_backward_samples():
    # Warm-up w = p - r - 1 forwards, then steady iterations 0 (first backward), 1 (the
    # measured period) and 2 (the last).
    for p in (1, 2, 4):
        for rank in range(p):
            w = p - rank - 1
            assert plan_sample(p, 1, rank, w + 3) is None
            s = plan_sample(p, 1, rank, 256)
            assert (s.simulated, s.start, s.end, s.per_period, s.skipped_periods) == \
                (w + 3, w + 1, w + 2, 1, 256 - w - 3)


LAYOUTS = {  # name: (overrides, world size)
    "dp2_distopt": ({"parallel.distributed_optimizer": True}, 2),
    "tp2_sp_dp2": ({"parallel.tensor_model_parallel_size": 2,
                    "parallel.sequence_parallel": True, "training.recompute": "selective"}, 4),
    "pp3_1f1b_tp2_sp": ({"model.num_layers": 3, "parallel.pipeline_model_parallel_size": 3,
                         "parallel.tensor_model_parallel_size": 2,
                         "parallel.sequence_parallel": True}, 6),
    "pp2_vp2_dp2_distopt": ({"model.num_layers": 4, "parallel.pipeline_model_parallel_size": 2,
                             "parallel.virtual_pipeline_model_parallel_size": 2,
                             "parallel.distributed_optimizer": True,
                             "training.precision": "bf16"}, 4),
}


def _cfg(overrides, world):
    base = {"model.num_layers": 1, "model.hidden_size": 32, "model.seq_length": 16,
            "model.hidden_dropout": 0.0, "model.attention_dropout": 0.0,
            "training.micro_batch_size": 1}
    base.update(overrides)
    cfg = load_config(None, small_overrides(**base))
    p = cfg.parallel
    dp = world // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size)
    cfg.training.global_batch_size = NUM_MICROBATCHES * dp
    return cfg


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_fast_dry_run_equals_the_full_simulation(name):
    overrides, world = LAYOUTS[name]
    cfg = _cfg(overrides, world)
    pp = cfg.parallel.pipeline_model_parallel_size
    for stage in range(pp):  # first, middle and last stages; DP rank 0
        rank = stage * (world // pp)
        full = dry_run(cfg, world, rank, target="cpu", all_microbatches=True).to_dict()
        fast = dry_run(cfg, world, rank, target="cpu")
        assert full["simulated_microbatches"] == NUM_MICROBATCHES
        assert fast.simulated_microbatches < NUM_MICROBATCHES, (name, rank)
        assert f"simulated {fast.simulated_microbatches} of {NUM_MICROBATCHES} micro batches" \
            in "\n".join(fast.format())
        fast = fast.to_dict()
        for report in (full, fast):
            del report["seconds"], report["simulated_microbatches"]
        assert fast == full, (name, rank, {k: (full[k], fast[k]) for k in full
                                           if full[k] != fast[k]})
        assert collective_calls(fast) == expected_collectives(fast, cfg), (name, rank)


def test_missing_tokenizer_names_vocab_size():
    cfg = load_config(os.path.join(ROOT, "configs", "llama2_7b.yaml"))
    with pytest.raises(ConfigError, match=r"does not exist; .*pass --vocab-size N") as e:
        dry_run(cfg, 8, 0)
    assert "\n" not in str(e.value)
