"""The dry run held against real steps (the layouts and the check live in
``megatron.dryrun.validate``), the collectives a step must issue, and the runtime
memory report's run.

``expected_collectives(report, cfg)`` is what the model's code must issue in that
rank's step (``tests/helpers/collectives.py``); ``pretrain_with_and_without_report``
trains the tiny GPT with and without the report.
"""
from megatron.dryrun.validate import (LAYOUTS, WORLD_SIZE, layout_cfg,  # noqa: F401
                                      measure_then_predict, relative_error)


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
