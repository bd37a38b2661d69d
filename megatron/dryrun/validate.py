"""The small layouts on which the dry run is held against real steps, and the check itself.

``LAYOUTS`` (name -> overrides of ``small_overrides``, all on ``WORLD_SIZE`` ranks) cover
every parallel feature, each recompute mode, both optimizers, fp32 and bf16.
``measure_then_predict(names)`` runs on every rank of a gloo world: it measures each
layout for real (``measure``), then leaves the process group and dry-runs its share of
the layouts' stages. tests/test_dry_run.py asserts on the result; bench/dry_run.py
prints it as a table.
"""
VOCAB = 255  # NullTokenizer(254): 254 ids + end of document
WORLD_SIZE = 4

# name -> overrides, all on 4 ranks: every parallel feature (TP, SP, PP with a middle
# stage (1F1B), VP, DP), each recompute mode, both optimizers, fp32 and (tiny) bf16.
LAYOUTS = {
    "tp2_dp2": {"parallel.tensor_model_parallel_size": 2},
    "tp2_dp2_sp_selective": {"parallel.tensor_model_parallel_size": 2,
                             "parallel.sequence_parallel": True,
                             "training.recompute": "selective"},
    "pp2_vp2_dp2": {"parallel.pipeline_model_parallel_size": 2,
                    "parallel.virtual_pipeline_model_parallel_size": 2,
                    "training.global_batch_size": 8},
    "pp4_1f1b": {"parallel.pipeline_model_parallel_size": 4, "training.global_batch_size": 8},
    "dp4_full": {"training.recompute": "full"},
    "dp4_distopt": {"parallel.distributed_optimizer": True},
    "tp2_pp2_sp_full": {"parallel.tensor_model_parallel_size": 2,
                        "parallel.pipeline_model_parallel_size": 2,
                        "parallel.sequence_parallel": True, "training.recompute": "full",
                        "training.global_batch_size": 4},
    "pp2_dp2_distopt_bf16": {"parallel.pipeline_model_parallel_size": 2,
                             "parallel.distributed_optimizer": True,
                             "training.precision": "bf16", "model.hidden_size": 32,
                             "model.seq_length": 32, "training.global_batch_size": 8},
}


def small_overrides(**extra):
    """A 4-layer GPT (h=64, 4 heads, s=64, vocab 255 -> 256) with dropout, micro batch 2."""
    base = {"model.num_layers": 4, "model.hidden_size": 64, "model.num_attention_heads": 4,
            "model.seq_length": 64, "model.make_vocab_size_divisible_by": 64,
            "model.hidden_dropout": 0.1, "model.attention_dropout": 0.1,
            "tokenizer.type": "NullTokenizer", "tokenizer.vocab_size": VOCAB - 1,
            "training.micro_batch_size": 2, "training.train_iters": 10,
            "training.device": "cpu", "optimizer.clip_grad": 1.0}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def layout_cfg(name):
    """The finalized-able Config of validation layout ``name``."""
    from megatron.config import load_config
    return load_config(None, small_overrides(**LAYOUTS[name]))


def measure_then_predict(names):
    """On each rank of a gloo world: measure every layout for real (two steps each), then
    leave the process group and dry-run this rank's share of the layouts' stages (every
    pipeline stage x DP rank 0 or not, TP rank 0; each in a fake world of its own).
    Returns ``(measured, predicted)``: ``{name: report}`` for this rank, and
    ``{(name, rank): report}`` for the ranks it dry-ran (dicts)."""
    from megatron import mpu
    from megatron.config import finalize
    from megatron.dryrun import dry_run, global_rank, measure
    rank, world = mpu.get_global_rank(), mpu.get_global_world_size()
    measured = {}
    for name in names:
        measured[name] = measure(layout_cfg(name), steps=2).to_dict()
        mpu.destroy_model_parallel()
        mpu.barrier()
    mpu.destroy_process_group()
    jobs = []
    for name in names:
        p = finalize(layout_cfg(name), world).parallel
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        dp = world // (tp * pp)
        jobs += [(name, global_rank(0, stage, d, world, tp, pp))
                 for stage in range(pp) for d in sorted({0, dp - 1})]
    predicted = {(name, r): dry_run(layout_cfg(name), world, r, target="cpu").to_dict()
                 for name, r in jobs[rank::world]}
    return measured, predicted


def relative_error(predicted_bytes, measured_bytes):
    """(predicted - measured) / measured."""
    return (predicted_bytes - measured_bytes) / measured_bytes
