"""The dry run held against real steps: small layouts measured on gloo, predicted on fakes.

``LAYOUTS`` are the validation layouts (name -> overrides of ``small_overrides``);
``measured(overrides)`` runs on every rank of a gloo world (``run_distributed``) and
returns each rank's measured report; ``predicted(overrides, world_size)`` dry-runs every
rank in a fresh spawned process (no process group of its own). ``expected_collectives``
is what the model's code must issue per step, built from the per-layer counts of
``tests/test_model_collectives.py`` (``layer_collectives``).
"""
import concurrent.futures
import multiprocessing

VOCAB = 255  # NullTokenizer(254): 254 ids + end of document

# name -> (world size, overrides): every parallel feature, each recompute mode, both
# optimizers, fp32 and (tiny) bf16.
LAYOUTS = {
    "tp2": (2, {"parallel.tensor_model_parallel_size": 2}),
    "tp2_sp_selective": (2, {"parallel.tensor_model_parallel_size": 2,
                             "parallel.sequence_parallel": True,
                             "training.recompute": "selective"}),
    "pp2_1f1b": (2, {"parallel.pipeline_model_parallel_size": 2,
                     "training.global_batch_size": 8}),
    "pp2_vp2": (2, {"parallel.pipeline_model_parallel_size": 2,
                    "parallel.virtual_pipeline_model_parallel_size": 2,
                    "training.global_batch_size": 8}),
    "dp2_full": (2, {"training.recompute": "full", "training.global_batch_size": 8}),
    "dp2_distopt": (2, {"parallel.distributed_optimizer": True}),
    "tp2_dp2_sp": (4, {"parallel.tensor_model_parallel_size": 2,
                       "parallel.sequence_parallel": True}),
    "pp2_dp2_distopt_bf16": (4, {"parallel.pipeline_model_parallel_size": 2,
                                 "parallel.distributed_optimizer": True,
                                 "training.precision": "bf16", "model.hidden_size": 32,
                                 "model.seq_length": 32, "training.global_batch_size": 8}),
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


def _cfg(overrides):
    from megatron.config import load_config
    return load_config(None, small_overrides(**overrides))


def measured(overrides):
    """This gloo rank's measured report (a dict), two real steps."""
    from megatron.dryrun import measure
    return measure(_cfg(overrides), steps=2).to_dict()


def _predict_all(overrides, world_size):
    from megatron.dryrun import dry_run
    cfg = _cfg(overrides)
    return [dry_run(cfg, world_size, r, target="cpu").to_dict() for r in range(world_size)]


def predicted(overrides, world_size):
    """Every rank's dry-run report (dicts), computed in one fresh spawned process."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        return pool.submit(_predict_all, overrides, world_size).result(timeout=600)


def relative_error(predicted_bytes, measured_bytes):
    """(predicted - measured) / measured."""
    return (predicted_bytes - measured_bytes) / measured_bytes
