"""The analytic memory model against real CPU training steps, and its static parts exactly.

Eight layouts of megatron/planning/validation.py run for real (one process, then
two gloo ranks); the model's peak per pipeline rank must be within 10 % of the
measured live tensor bytes (bench/memory_model.py runs all ten and prints them).
"""
import pytest
import torch

from megatron import mpu
from megatron.config import Config, finalize
from megatron.model import GPTModel
from megatron.planning.layout import Layout, ModelShape
from megatron.planning.measure import LiveTensorBytes
from megatron.planning.memory_model import in_flight, rank_memory, stage_params, static_bytes
from megatron.planning.validation import LAYOUTS, measure_layouts, predicted_rows
from tests.dist_harness import run_distributed

MODEL = dict(num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=64,
             micro_batch_size=2, vocab_size=512)
WORLD_2 = ["TP2 SP fp32 selective", "PP2 1F1B m4 fp32", "PP2 VP2 m4 fp32", "DP2 distopt bf16",
           "TP2 fp32"]


def _check(rows, tolerance=10.0):
    bad = [f"{r['name']} rank {r['pipeline_rank']}: predicted {r['predicted']} measured "
           f"{r['peak']} ({r['error_pct']:+.1f} %)" for r in rows
           if abs(r["error_pct"]) > tolerance]
    assert not bad, "\n".join(bad)
    for r in rows:  # the static parts are counted exactly
        assert r["predicted_static"] == sum(r["breakdown"].values()), r["name"]


def _measure(names):
    return measure_layouts([s for s in LAYOUTS if s["name"] in names], MODEL)


def _measured(world, names):
    measured = {}
    for rank_rows in run_distributed(_measure, world, names, timeout=600):
        for r in rank_rows:
            key = (r["name"], r["pipeline_rank"])
            # Ranks of one stage differ only by the DP buffer's padding: keep the largest.
            if key not in measured or r["peak"] > measured[key]["peak"]:
                measured[key] = r
    return measured


def test_single_process_layouts_within_10_percent():
    names = [s["name"] for s in LAYOUTS if s["world"] == 1]
    rows = predicted_rows(_measured(1, names), MODEL)
    assert len(rows) == 3
    _check(rows)


def test_two_rank_layouts_within_10_percent():
    measured = _measured(2, WORLD_2)
    rows = predicted_rows(measured, MODEL)
    assert {r["name"] for r in rows} == set(WORLD_2)
    _check(rows)


def test_parameter_count_matches_the_model():
    cfg = finalize(Config.from_dict({"model": {"num_layers": 3, "hidden_size": 64,
                                               "num_attention_heads": 4, "seq_length": 32},
                                     "training": {"train_iters": 1}}), 1)
    model = GPTModel(cfg, 512)
    shape = ModelShape.from_config(cfg, 512)
    assert shape.num_parameters() == sum(p.numel() for p in model.parameters())
    assert stage_params(shape, Layout(), 0) == shape.num_parameters()


def test_static_bytes_follow_precision_and_sharding():
    shape = ModelShape(num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256,
                       seq_length=32, vocab_size=512, max_position_embeddings=32)
    n = stage_params(shape, Layout(), 0)
    assert static_bytes(shape, Layout(precision="fp32"), 0) == (4 * n, 4 * n, 0, 8 * n)
    assert static_bytes(shape, Layout(precision="bf16"), 0) == (2 * n, 4 * n, 4 * n, 8 * n)
    assert static_bytes(shape, Layout(precision="bf16", grad_fp32=False), 0)[1] == 2 * n
    params, grads, masters, adam = static_bytes(
        shape, Layout(precision="bf16", dp=4, distributed_optimizer=True), 0)
    shard = -(-n // 4)
    assert (params, grads, masters, adam) == (2 * n, 16 * shard, 4 * shard, 8 * shard)


def test_schedules_hold_the_micro_batches_they_keep_in_flight():
    # 1F1B: stage r holds p - r; interleaved: the warm-up forwards plus one.
    assert [in_flight(Layout(pp=4, num_microbatches=8), r) for r in range(4)] == [4, 3, 2, 1]
    assert in_flight(Layout(pp=4, num_microbatches=2), 0) == 2
    assert in_flight(Layout(pp=2, vp=2, num_microbatches=4), 0) == 5
    assert in_flight(Layout(pp=2, vp=2, num_microbatches=2), 1) == 4  # m = p: all of them
    shape = ModelShape(num_layers=8, hidden_size=256, num_attention_heads=8, ffn_hidden_size=1024,
                       seq_length=512, vocab_size=50257, max_position_embeddings=512)
    base = Layout(tp=2, pp=4, micro_batch=2, num_microbatches=8, precision="bf16")
    # Each memory-saving option lowers the first stage's peak.
    for cheaper in (base.with_(recompute="selective"), base.with_(recompute="full"),
                    base.with_(sequence_parallel=True)):
        assert rank_memory(shape, cheaper, 0).total < rank_memory(shape, base, 0).total


def test_live_tensor_bytes_counts_new_storages_once():
    x = torch.zeros(1000)
    with LiveTensorBytes() as t:
        y = torch.ones(256)          # 1 KiB
        v = y[10:]                   # a view: nothing new
        x.add_(1.0)                  # in place on an old storage: nothing new
        z = torch.empty(512)         # 2 KiB more
        del z
    assert t.peak == 3 * 1024 and t.current == 1024
    del y, v
    assert t.current == 0


@pytest.fixture(autouse=True)
def _no_model_parallel_state():
    yield
    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
