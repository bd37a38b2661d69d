"""Training checkpoints: per-rank save and exact resume.

Every rank writes into `iter_{N:07d}.tmp`, checksumming its files as they are
written; the ranks' entries reach global rank 0, which writes the iteration's
`manifest.json` (integrity.py), renames the folder into place and then rewrites
the latest file (temporary name, then rename), so a crash while saving leaves the
previous checkpoint and its latest file untouched. Loading verifies each rank's
files and falls back, on every rank together, to the newest older checkpoint that
reads (fallback.py).
"""
import os
import shutil

from megatron.checkpoint import files
from megatron.checkpoint.fallback import LayoutMismatch, read_newest_good
from megatron.checkpoint.files import (LATEST, MODEL_FILE, CheckpointError, iteration_dir,
                                       prune_checkpoints, rank_dir_name, remove_stale_tmp_dirs,
                                       replace_dir, shard_file_name, shard_files, shard_rank,
                                       write_latest_iteration)
from megatron.checkpoint.rank_state import (build_rank_state, gather_rng_states_over_dp,
                                            model_states, parallel_sizes, set_rng_state)
from megatron.checkpoint.integrity import (MANIFEST, Manifest, load_verified, read_manifest,
                                           write_manifest)
from megatron.logging import print_rank_0
from megatron.mpu.collectives import all_gather_object, fail_together
from megatron.utils import unwrap_model


def _my_rank_dir_name():
    from megatron import mpu
    return rank_dir_name(mpu.get_tensor_model_parallel_rank(),
                         mpu.get_pipeline_model_parallel_rank(),
                         mpu.get_pipeline_model_parallel_world_size())


# ---------------------------------------------------------------- save
def save_checkpoint(cfg, iteration, consumed_samples, model_chunks, optimizer, scheduler,
                    extra=None):
    """Save everything needed to resume at `iteration` under `cfg.checkpoint.save`.

    Collective: every rank calls it. Only DP rank 0 of each model-parallel rank
    writes the model file; a sharded optimizer's state goes into one file per
    DP rank beside it.
    """
    from megatron import mpu
    root = cfg.checkpoint.save
    rank = mpu.get_global_rank()
    final_dir = iteration_dir(root, iteration)
    tmp_dir = final_dir + ".tmp"
    # Each step that may fail on some ranks only (a full disk, a permission) is left by
    # every rank together, so a failed save raises everywhere instead of hanging the
    # other ranks; the previous checkpoint stays the loadable one.
    what = f"saving the checkpoint of iteration {iteration} to {root}"
    with fail_together(what):
        if rank == 0:
            os.makedirs(root, exist_ok=True)
            # A leftover from a crash while saving this iteration before.
            shutil.rmtree(tmp_dir, ignore_errors=True)
            # ...and those of other iterations, which nothing would ever remove.
            remove_stale_tmp_dirs(root, iteration)
    rank_dir = os.path.join(tmp_dir, _my_rank_dir_name())
    rng_states = gather_rng_states_over_dp()
    dp_rank = mpu.get_data_parallel_rank()
    sharded = bool(getattr(optimizer, "is_sharded", False))
    written = {}  # this rank's files: relative path -> manifest entry
    with fail_together(what):
        if dp_rank == 0:
            os.makedirs(rank_dir, exist_ok=True)
            state = build_rank_state(
                iteration=iteration, consumed_samples=consumed_samples, config=cfg.to_dict(),
                parallel=parallel_sizes(mpu.get_tensor_model_parallel_world_size(),
                                        mpu.get_pipeline_model_parallel_world_size(),
                                        len(model_chunks), mpu.get_data_parallel_world_size()),
                rng_state=rng_states,
                scheduler_state=scheduler.state_dict() if scheduler is not None else None,
                model_states=[unwrap_model(c).state_dict() for c in model_chunks],
                optimizer_state=(optimizer.state_dict()
                                 if optimizer is not None and not sharded else None),
                extra=extra)
            written[f"{_my_rank_dir_name()}/{MODEL_FILE}"] = files.atomic_write(
                os.path.join(rank_dir, MODEL_FILE), state)
    if sharded:
        # After the block above: the directory exists once DP rank 0 has made it.
        with fail_together(what):
            os.makedirs(rank_dir, exist_ok=True)
            written[f"{_my_rank_dir_name()}/{shard_file_name(dp_rank)}"] = files.atomic_write(
                os.path.join(rank_dir, shard_file_name(dp_rank)), optimizer.state_dict())
    # Pruning must never remove the newest checkpoint that verifies: with keep_last_n
    # each rank reads back what it wrote, and a save that does not verify prunes nothing.
    readback = None
    if cfg.checkpoint.keep_last_n:
        try:
            manifest = Manifest(tmp_dir, written)
            for rel in written:
                manifest.verify(rel)
        except (CheckpointError, OSError) as e:  # OSError: an I/O error reading it back
            readback = str(e)
    # Every rank's entries reach rank 0, which writes the manifest before the rename.
    gathered = all_gather_object((written, readback))
    with fail_together(what):
        if rank == 0:
            write_manifest(tmp_dir, iteration, {k: v for w, _ in gathered for k, v in w.items()})
            replace_dir(tmp_dir, final_dir)
            write_latest_iteration(root, iteration)
            bad = [r for _, r in gathered if r]
            if bad:
                print_rank_0(f"warning: the checkpoint of iteration {iteration} does not verify "
                             f"after saving ({bad[0]}): keeping every older checkpoint "
                             f"(checkpoint.keep_last_n={cfg.checkpoint.keep_last_n} not applied)")
            elif cfg.checkpoint.keep_last_n:
                prune_checkpoints(root, cfg.checkpoint.keep_last_n, keep=iteration)
    print_rank_0(f"saved checkpoint at iteration {iteration} to {final_dir}")


# ---------------------------------------------------------------- load
def _check_layout(path, saved, cfg, model_chunks):
    from megatron import mpu
    p = saved.get("parallel", {})
    ours = {
        "tensor_model_parallel_size": mpu.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": mpu.get_pipeline_model_parallel_world_size(),
        "virtual_pipeline_model_parallel_size": len(model_chunks),
    }
    for key, value in ours.items():
        if p.get(key, value) != value:
            raise CheckpointError(
                f"checkpoint {path} was saved with {key}={p.get(key)} but the config has {key}={value} "
                f"(convert it with tools/checkpoint_convert.py)")
    saved_model = saved.get("config", {}).get("model", {})
    for key in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "seq_length",
                "max_position_embeddings", "position_embedding_type", "normalization",
                "activation", "num_query_groups", "add_bias_linear",
                "untie_embeddings_and_output_weights"):
        mine = getattr(cfg.model, key)
        if key in saved_model and saved_model[key] != mine:
            raise CheckpointError(f"checkpoint {path} has model.{key}={saved_model[key]} but the "
                                  f"config has model.{key}={mine}")


def _load_model_state(path, chunk, state):
    model = unwrap_model(chunk)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not match the model: missing "
                              f"{missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected "
                              f"{unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(f"checkpoint {path} has {k} of shape {tuple(v.shape)} but the "
                                  f"model's is {tuple(own[k].shape)}")
    model.load_state_dict(state)


def _load_optimizer_state(path, rank_dir, saved, optimizer, shards):
    """Load the checkpoint's optimizer state into `optimizer`; False when it holds none.

    `shards`: the distributed-optimizer files of the rank folder, {DP rank: the loaded
    state}, loaded by `_read_rank_files` for the DP ranks this rank needs (None for
    the others).

    A distributed optimizer takes its own shard at the same DP size, or the
    list of every old DP rank's shard to re-shard at another DP size. State of
    the other optimizer kind (plain <-> distributed) is converted.
    """
    from megatron import mpu
    from megatron.optimizer.state_conversion import distributed_to_plain, plain_to_distributed
    sharded = bool(getattr(optimizer, "is_sharded", False))
    saved_dp = saved.get("parallel", {}).get("data_parallel_size")
    if not shards and "optimizer" not in saved:
        return False
    dp, dp_rank = mpu.get_data_parallel_world_size(), mpu.get_data_parallel_rank()
    where = rank_dir if shards else path
    if sharded != bool(shards):
        if shards:
            writer = (f"the distributed optimizer (parallel.distributed_optimizer=true, "
                      f"{len(shards)} distrib_optim_dp_*.pt shards, data-parallel size {saved_dp})")
            target = "the plain optimizer"
        else:
            writer = "the plain optimizer (parallel.distributed_optimizer=false)"
            target = f"the distributed optimizer at data-parallel size {dp}"
        print_rank_0(f"converting the optimizer state of {where}, written by {writer}, "
                     f"into {target}")
        try:
            if shards:
                distributed_to_plain(optimizer, [shards[r] for r in range(saved_dp)])
            else:
                plain_to_distributed(optimizer, saved["optimizer"])
        except ValueError as e:  # what still cannot be converted, with the values involved
            raise CheckpointError(
                f"checkpoint {where} holds optimizer state written by {writer} that cannot be "
                f"loaded into this run's parallel.distributed_optimizer={str(sharded).lower()}: "
                f"{e}; resume with the settings it was saved with, or convert the checkpoint "
                f"with tools/checkpoint_convert.py without --include-optimizer to start a fresh "
                f"optimizer") from None
        return True
    try:
        if not sharded:
            optimizer.load_state_dict(saved["optimizer"])
        elif saved_dp == dp:  # exact resume: this rank's own shard
            optimizer.load_state_dict(shards[dp_rank])
        else:
            print_rank_0(f"re-sharding the distributed optimizer state of {rank_dir} from "
                         f"data-parallel size {saved_dp} to {dp}")
            optimizer.load_state_dict([shards[r] for r in range(saved_dp)])
    except ValueError as e:  # the optimizer's one-line mismatch messages (e.g. fp32 masters)
        raise CheckpointError(f"checkpoint {where}: {e}") from None
    return True


def _read_rank_files(it_dir, cfg, optimizer, load_optimizer):
    """This rank's files of the checkpoint folder `it_dir`, verified against its manifest
    (unless checkpoint.verify is false) and unpickled: `(path, rank_dir, saved, shards)`.

    Raises CheckpointError for a missing, truncated, corrupt or unreadable file (the
    ranks then fall back to an older checkpoint together) and LayoutMismatch when the
    checkpoint holds no file for this rank's place in the layout."""
    from megatron import mpu
    name = _my_rank_dir_name()
    rank_dir = os.path.join(it_dir, name)
    rel = f"{name}/{MODEL_FILE}"
    path = os.path.join(rank_dir, MODEL_FILE)
    verify = cfg.checkpoint.verify
    manifest = read_manifest(it_dir, verify)
    if manifest is None and verify:
        print_rank_0(f"warning: checkpoint {it_dir} has no {MANIFEST} (saved before checksums): "
                     f"loading it unverified")
    layout = (f"this rank's layout is TP={mpu.get_tensor_model_parallel_world_size()}, "
              f"PP={mpu.get_pipeline_model_parallel_world_size()}")
    if manifest is not None and rel not in manifest:
        held = sorted({r.split("/")[0] for r in manifest.files})
        raise LayoutMismatch(f"checkpoint {it_dir} holds no {rel} ({layout}; the checkpoint "
                             f"holds {held}; convert it with tools/checkpoint_convert.py)")
    if manifest is None and not os.path.isfile(path):
        present = sorted(os.listdir(it_dir)) if os.path.isdir(it_dir) else []
        raise CheckpointError(f"checkpoint file {path} is missing ({layout}; the checkpoint "
                              f"holds {present or 'nothing'})")
    saved = load_verified(it_dir, rel, manifest, verify)
    shards = {}
    if optimizer is not None and load_optimizer:
        if manifest is not None:
            ranks = [shard_rank(r.split("/")[1]) for r in manifest.files if r.startswith(name + "/")]
            ranks = sorted(r for r in ranks if r is not None)
        else:
            ranks = sorted(shard_files(rank_dir)) if os.path.isdir(rank_dir) else []
        saved_dp = saved.get("parallel", {}).get("data_parallel_size")
        if ranks and ranks != list(range(saved_dp or 0)):
            raise CheckpointError(f"checkpoint {rank_dir} is incomplete: it was saved at "
                                  f"data-parallel size {saved_dp} but holds distributed-optimizer "
                                  f"shards of DP ranks {ranks}")
        # Exact resume of a distributed optimizer reads this rank's own shard only;
        # re-sharding or converting to the plain optimizer reads all of them.
        own = (bool(getattr(optimizer, "is_sharded", False))
               and saved_dp == mpu.get_data_parallel_world_size())
        need = [mpu.get_data_parallel_rank()] if own and ranks else ranks
        shards = {r: None for r in ranks}
        for r in need:
            shards[r] = load_verified(it_dir, f"{name}/{shard_file_name(r)}", manifest, verify)
    return path, rank_dir, saved, shards


def load_checkpoint(cfg, model_chunks, optimizer, scheduler, root=None, load_optimizer=True,
                    load_rng=True):
    """Resume from the latest checkpoint under `root` (default `cfg.checkpoint.load`).

    Returns (iteration, consumed_samples), (0, 0) when there is nothing to load.
    Each rank verifies and reads its files first; when they are missing, truncated,
    corrupt or unreadable on any rank, every rank falls back to the newest older
    checkpoint that reads everywhere (fallback.py), and CheckpointError says why
    when none does. A checkpoint without optimizer state (or `load_optimizer=False`)
    resumes with a fresh optimizer built from the loaded weights; the scheduler,
    iteration and data position are restored either way. A distributed optimizer's
    state saved at another data-parallel size is re-sharded, and state written by
    the other optimizer kind (plain <-> distributed) is converted. Raises
    CheckpointError when the checkpoint does not fit the model or layout, or its
    optimizer state cannot be converted (e.g. fp32 state into a bf16 run).
    """
    from megatron import mpu
    root = root or cfg.checkpoint.load
    if root is None:
        return 0, 0
    iteration, it_dir, read = read_newest_good(
        root, lambda d: _read_rank_files(d, cfg, optimizer, load_optimizer))
    if iteration is None:
        print_rank_0(f"no checkpoint under {root} ({LATEST} absent): starting from scratch")
        return 0, 0
    path, rank_dir, saved, shards = read
    _check_layout(path, saved, cfg, model_chunks)
    for chunk, state in zip(model_chunks, model_states(saved, len(model_chunks))):
        _load_model_state(path, chunk, state)
    if optimizer is not None:
        loaded = load_optimizer and _load_optimizer_state(path, rank_dir, saved, optimizer, shards)
        if not loaded:
            # The fp32 masters (and the distributed optimizer's shards of them)
            # were copied from the model at construction, before the weights
            # above were loaded: refresh them or the first step would undo the load.
            optimizer.reload_model_params()
            print_rank_0(f"checkpoint {path}: "
                         f"{'no optimizer state in it' if load_optimizer else 'optimizer state not loaded'}"
                         f"; starting a fresh optimizer from the loaded weights")
    if scheduler is not None and saved.get("opt_param_scheduler") is not None:
        scheduler.load_state_dict(saved["opt_param_scheduler"])
    if load_rng:
        states = saved["rng_state"]
        dp_rank = mpu.get_data_parallel_rank()
        set_rng_state(states[dp_rank] if dp_rank < len(states) else states[0])
    print_rank_0(f"loaded checkpoint {it_dir} (iteration {iteration}, "
                 f"consumed samples {saved['consumed_samples']})")
    return saved["iteration"], saved["consumed_samples"]
