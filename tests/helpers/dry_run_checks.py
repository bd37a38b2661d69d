"""The dry run held against real steps: small layouts measured on gloo, predicted on fakes.

``LAYOUTS`` are the validation layouts (name -> overrides of ``small_overrides``, all
on ``WORLD_SIZE`` ranks); ``measure_then_predict(names)`` runs on every rank of a gloo
world (``run_distributed``): it measures each layout for real, then dry-runs the same
rank of it. ``expected_collectives(report)`` is what the model's code must issue in
that rank's step (``tests/helpers/collectives.py``).
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


def pretrain_with_and_without_report(prefix):
    """In a fresh process: the tiny pretrain() with the memory report (its dry run runs
    before the process group exists), then again without it. Returns both histories'
    train losses and what the first run printed."""
    import contextlib
    import io
    from megatron.initialize import destroy_megatron
    from tests.helpers.training import make_corpus, run_pretrain, tiny_overrides
    make_corpus(prefix)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        on = run_pretrain(tiny_overrides(prefix, **{"training.train_iters": 3,
                                                    "logging.memory_report": True}))
    destroy_megatron()
    off = run_pretrain(tiny_overrides(prefix, **{"training.train_iters": 3,
                                                 "logging.memory_report": False}))
    destroy_megatron()
    return on["train_losses"], off["train_losses"], out.getvalue()


def in_fresh_process(fn, *args):
    """``fn(*args)`` in a spawned process (no process group, nothing imported yet)."""
    import concurrent.futures
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        return pool.submit(fn, *args).result(timeout=900)


def relative_error(predicted_bytes, measured_bytes):
    """(predicted - measured) / measured."""
    return (predicted_bytes - measured_bytes) / measured_bytes


def expected_collectives(report, cfg):
    """``{(group, kind): calls}`` the rank of ``report`` (a dict) must issue per step."""
    from tests.helpers.collectives import step_collectives
    lay = report["layout"]
    pp_rank = report["pipeline_model_parallel_rank"]
    return step_collectives(
        tp=lay["tp"], pp=lay["pp"], vp=lay["vp"], dp=lay["dp"],
        layers_on_rank=cfg.model.num_layers // lay["pp"], first_stage=pp_rank == 0,
        last_stage=pp_rank == lay["pp"] - 1, num_microbatches=lay["num_microbatches"],
        sequence_parallel=lay["sequence_parallel"], recompute=lay["recompute"],
        precision=lay["precision"], distributed_optimizer=lay["distributed_optimizer"],
        clip_grad=cfg.optimizer.clip_grad)


def collective_calls(report):
    """``{(group, kind): calls}`` from a report's collective rows."""
    return {(c["group"], c["kind"]): c["calls"] for c in report["collectives"]}
