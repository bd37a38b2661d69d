"""Reshard a checkpoint to another TP / PP layout offline (the logic of
tools/checkpoint_convert.py), and write rank files built from a full model state.

The result has the training checkpoints' format (same file names, rank dicts,
latest file) with the new parallel sizes in its config, so the training loop
loads it at the target layout.
"""
import copy
import os
import shutil

import torch

from megatron.checkpoint.files import (MODEL_FILE, CheckpointError, atomic_write, iteration_dir,
                                       rank_dir_name, replace_dir, write_latest_iteration)
from megatron.checkpoint.integrity import write_manifest
from megatron.checkpoint.rank_state import build_rank_state, fresh_rng_state, parallel_sizes
from megatron.checkpoint.reshard import (WORD_EMBEDDINGS_KEY, CheckpointShards,
                                         merge_model_state, merge_optimizer_state,
                                         resize_optimizer_vocab, resize_vocab_tensors,
                                         split_model_state, split_optimizer_state,
                                         target_padded_vocab)
from megatron.config import ModelConfig, TrainingConfig
# A new rank starts its dropout streams where mpu.model_parallel_seed would.
from megatron.mpu.random import rank_seeds


def tokenizer_of(config):
    """The tokenizer of a checkpoint config (a dict), None if it cannot be built here
    (e.g. its files are elsewhere)."""
    from megatron.tokenizer import build_tokenizer
    try:
        return build_tokenizer(config.get("tokenizer") or {})
    except Exception:
        return None


def true_vocab_size(config, fallback):
    """The tokenizer's vocabulary size from a checkpoint config, ``fallback`` if it cannot be built."""
    tokenizer = tokenizer_of(config)
    return tokenizer.vocab_size if tokenizer is not None else fallback


def _rng_for(source_states, seed, tp_rank, pp_rank):
    """RNG states of a target rank: the source's (fresh ones from ``seed`` when there
    are none), with the model-parallel tracker re-seeded for this TP rank (heads
    move between ranks, so the old stream has no meaning for a new layout)."""
    default_seed, tracker_seed = rank_seeds(int(seed), tp_rank, pp_rank)
    states = []
    for st in source_states or [fresh_rng_state(default_seed)]:
        st = dict(st)
        gen = torch.Generator(device="cpu").manual_seed(tracker_seed)
        st["tracker"] = {"model-parallel-rng": {"cpu": gen.get_state()}}
        states.append(st)
    return states


def write_checkpoint(save_dir, iteration, rank_files, pp):
    """Write ``rank_files[(tp, pp)]`` under ``save_dir/iter_N`` with its manifest
    (temporary dir, then rename) and point the latest file at it."""
    os.makedirs(save_dir, exist_ok=True)
    final = iteration_dir(save_dir, iteration)
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    entries = {}
    for (tp_rank, pp_rank), obj in rank_files.items():
        name = rank_dir_name(tp_rank, pp_rank, pp)
        os.makedirs(os.path.join(tmp, name), exist_ok=True)
        entries[f"{name}/{MODEL_FILE}"] = atomic_write(os.path.join(tmp, name, MODEL_FILE), obj)
    write_manifest(tmp, iteration, entries)
    replace_dir(tmp, final)
    write_latest_iteration(save_dir, iteration)
    return final


def build_rank_files(config, iteration, consumed_samples, full_model, tp, pp, vp=1,
                     optimizer=None, scheduler_state=None, rng_states=None, extra=None):
    """Checkpoint dicts ``{(tp_rank, pp_rank): dict}`` of a full model state at a layout.

    ``full_model`` must carry the target's vocabulary padding; ``optimizer`` is a
    merged optimizer state (``reshard.merge_optimizer_state``) or None.
    """
    num_layers = int(config["model"]["num_layers"])
    if num_layers % (pp * vp) != 0:
        raise CheckpointError(f"num_layers={num_layers} is not divisible by target "
                              f"pipeline_model_parallel_size={pp} x virtual size {vp}")
    heads = int(config["model"]["num_attention_heads"])
    if heads % tp != 0:
        raise CheckpointError(f"num_attention_heads={heads} is not divisible by target "
                              f"tensor_model_parallel_size={tp}")
    groups = config["model"].get("num_query_groups")
    if groups and int(groups) % tp != 0:
        raise CheckpointError(f"num_query_groups={groups} is not divisible by target "
                              f"tensor_model_parallel_size={tp}")
    cfg = copy.deepcopy(config)
    par = cfg.setdefault("parallel", {})
    par["tensor_model_parallel_size"] = tp
    par["pipeline_model_parallel_size"] = pp
    par["virtual_pipeline_model_parallel_size"] = vp if vp > 1 else None
    if optimizer is not None:
        par["distributed_optimizer"] = False  # the resharded state is the plain optimizer's
    seed = int((cfg.get("training") or {}).get("seed", TrainingConfig().seed))
    shards = split_model_state(full_model, num_layers, tp, pp, vp, config=config)
    out = {}
    for (tp_rank, pp_rank), chunk_states in shards.items():
        out[(tp_rank, pp_rank)] = build_rank_state(
            iteration=iteration, consumed_samples=consumed_samples, config=cfg,
            parallel=parallel_sizes(tp, pp, vp, 1),
            rng_state=_rng_for(rng_states, seed, tp_rank, pp_rank),
            scheduler_state=scheduler_state, model_states=chunk_states,
            optimizer_state=(split_optimizer_state(optimizer, chunk_states, tp, tp_rank, config)
                             if optimizer is not None else None),
            extra=extra)
    return out


def convert_checkpoint(load_dir, save_dir, tp, pp, vp=1, include_optimizer=False,
                       iteration=None, vocab_size=None, log=print):
    """Reshard the checkpoint under ``load_dir`` to TP=tp x PP=pp (x VP=vp) under ``save_dir``.

    Returns the written iteration directory.
    """
    if tp < 1 or pp < 1 or vp < 1:
        raise CheckpointError(f"target sizes must be >= 1, got TP={tp} PP={pp} VP={vp}")
    if os.path.abspath(load_dir) == os.path.abspath(save_dir):
        raise CheckpointError(f"--save-dir {save_dir} must differ from --load-dir {load_dir}")
    shards = CheckpointShards(load_dir, iteration)
    log(f"loaded {load_dir} iteration {shards.iteration}: TP={shards.tp} PP={shards.pp} "
        f"VP={shards.vp}")
    full = merge_model_state(shards)
    model_cfg = shards.config.get("model") or {}
    src_rows = full[WORD_EMBEDDINGS_KEY].shape[0]
    # A tokenizer larger than the embedding cannot be right; never drop real rows.
    true_vocab = vocab_size or min(true_vocab_size(shards.config, src_rows), src_rows)
    divisible_by = model_cfg.get("make_vocab_size_divisible_by",
                                 ModelConfig().make_vocab_size_divisible_by)
    rows = target_padded_vocab(true_vocab, divisible_by, tp)
    resize_vocab_tensors(full, rows)
    optimizer = None
    if include_optimizer:
        optimizer = merge_optimizer_state(shards, full)
        resize_optimizer_vocab(optimizer, rows)
    head = shards.head
    rank_files = build_rank_files(shards.config, shards.iteration, head.get("consumed_samples", 0),
                                  full, tp, pp, vp, optimizer=optimizer,
                                  scheduler_state=head.get("opt_param_scheduler"),
                                  rng_states=head.get("rng_state"), extra=head.get("extra"))
    out = write_checkpoint(save_dir, shards.iteration, rank_files, pp)
    log(f"wrote {out}: TP={tp} PP={pp} VP={vp}, vocabulary padded {src_rows} -> {rows} "
        f"(tokenizer vocabulary {true_vocab}), optimizer state "
        f"{'resharded' if optimizer is not None else 'dropped'}")
    return out
