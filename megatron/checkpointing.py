"""Per-rank checkpoints with atomic writes and exact resume.

Layout: `{save}/iter_{N:07d}/mp_rank_{tp:02d}[_{pp:03d}]/model_optim_rng.pt` plus
`{save}/latest_checkpointed_iteration.txt`. Every rank writes into
`iter_{N:07d}.tmp`; after a barrier global rank 0 renames it into place and then
rewrites the latest file (temporary name, then rename), so a crash while saving
leaves the previous checkpoint and its latest file untouched. Everything stored
is made of tensors, numbers, strings, lists and dicts so that
`torch.load(weights_only=True)` reads it.
"""
import os
import random
import shutil

import numpy as np
import torch

from megatron.errors import UserError
from megatron.logging import print_rank_0
from megatron.mpu.collectives import fail_together
from megatron.utils import unwrap_model

LATEST = "latest_checkpointed_iteration.txt"
MODEL_FILE = "model_optim_rng.pt"
CHECKPOINT_VERSION = 1


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used with this configuration (one-line message)."""


def iteration_dir(root, iteration):
    """`{root}/iter_{N:07d}`."""
    return os.path.join(root, f"iter_{iteration:07d}")


def existing_iteration_dir(root, iteration):
    """The folder holding `iteration`'s checkpoint: `iter_N`, or `iter_N.old` when only
    that exists (a crash between the two renames of an iteration saved a second time:
    the earlier save of the same iteration is then complete under `.old`)."""
    path = iteration_dir(root, iteration)
    old = path + ".old"
    if not os.path.isdir(path) and os.path.isdir(old):
        print_rank_0(f"warning: {path} is missing but {old} exists (a save of iteration "
                     f"{iteration} was interrupted while replacing it): loading {old}")
        return old
    return path


def _remove_stale_tmp_dirs(root, iteration):
    """Remove `iter_*.tmp` folders left by crashed saves of iterations other than `iteration`."""
    keep = os.path.basename(iteration_dir(root, iteration)) + ".tmp"
    for name in os.listdir(root):
        if (name.startswith("iter_") and name.endswith(".tmp") and name != keep
                and os.path.isdir(os.path.join(root, name))):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def rank_dir_name(tp_rank, pp_rank, pp_size):
    """`mp_rank_XX` without pipelining, `mp_rank_XX_YYY` with it (Megatron's names)."""
    if pp_size == 1:
        return f"mp_rank_{tp_rank:02d}"
    return f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def _my_rank_dir_name():
    from megatron import mpu
    return rank_dir_name(mpu.get_tensor_model_parallel_rank(),
                         mpu.get_pipeline_model_parallel_rank(),
                         mpu.get_pipeline_model_parallel_world_size())


def read_latest_iteration(root):
    """The iteration named by the latest file under `root`, or None when there is none."""
    path = os.path.join(root, LATEST)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"{path} holds {text!r}, not an iteration number") from None


def _atomic_torch_save(obj, path):
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    # On disk before the latest file (fsynced) can name this checkpoint.
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _atomic_write_text(path, text):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------- RNG states
def get_rng_state():
    """Every RNG state of this process as tensors/lists (weights_only-loadable)."""
    from megatron import mpu
    version, mt, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64),
                   "gauss": gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch_cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "tracker": mpu.get_rng_tracker().get_states(),
    }
    return state


def set_rng_state(state):
    """Restore what get_rng_state() returned."""
    from megatron import mpu
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["gauss"]))
    torch.set_rng_state(state["torch_cpu"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    mpu.get_rng_tracker().set_states(state["tracker"])


def _gather_rng_states_over_dp():
    """RNG states of every DP rank (rank-ordered), so that DP rank 0 can store them all."""
    from megatron import mpu
    state = get_rng_state()
    if mpu.get_data_parallel_world_size() == 1:
        return [state]
    return mpu.all_gather_object(state, group=mpu.get_data_parallel_group())


# ---------------------------------------------------------------- save
def _model_state(model_chunks):
    if len(model_chunks) == 1:
        return {"model": unwrap_model(model_chunks[0]).state_dict()}
    return {f"model{i}": unwrap_model(c).state_dict() for i, c in enumerate(model_chunks)}


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
            _remove_stale_tmp_dirs(root, iteration)
    rank_dir = os.path.join(tmp_dir, _my_rank_dir_name())
    rng_states = _gather_rng_states_over_dp()
    dp_rank = mpu.get_data_parallel_rank()
    sharded = bool(getattr(optimizer, "is_sharded", False))
    with fail_together(what):
        if dp_rank == 0:
            os.makedirs(rank_dir, exist_ok=True)
            state = {
                "checkpoint_version": CHECKPOINT_VERSION,
                "iteration": iteration,
                "consumed_samples": consumed_samples,
                "config": cfg.to_dict(),
                "parallel": {
                    "tensor_model_parallel_size": mpu.get_tensor_model_parallel_world_size(),
                    "pipeline_model_parallel_size": mpu.get_pipeline_model_parallel_world_size(),
                    "virtual_pipeline_model_parallel_size": len(model_chunks),
                    "data_parallel_size": mpu.get_data_parallel_world_size(),
                },
                "rng_state": rng_states,
                "opt_param_scheduler": scheduler.state_dict() if scheduler is not None else None,
            }
            state.update(_model_state(model_chunks))
            if optimizer is not None and not sharded:
                state["optimizer"] = optimizer.state_dict()
            if extra:
                state["extra"] = extra
            _atomic_torch_save(state, os.path.join(rank_dir, MODEL_FILE))
    if sharded:
        # After the block above: the directory exists once DP rank 0 has made it.
        with fail_together(what):
            os.makedirs(rank_dir, exist_ok=True)
            _atomic_torch_save(optimizer.state_dict(),
                               os.path.join(rank_dir, f"distrib_optim_dp_{dp_rank:03d}.pt"))
    with fail_together(what):
        if rank == 0:
            if os.path.isdir(final_dir):
                # Saving an iteration again (e.g. SIGTERM right after a periodic save).
                old = final_dir + ".old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final_dir, old)
                os.replace(tmp_dir, final_dir)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp_dir, final_dir)
            _atomic_write_text(os.path.join(root, LATEST), f"{iteration}\n")
            if cfg.checkpoint.keep_last_n:
                prune_checkpoints(root, cfg.checkpoint.keep_last_n, keep=iteration)
    print_rank_0(f"saved checkpoint at iteration {iteration} to {final_dir}")


def list_checkpoints(root):
    """Iterations with a complete (renamed) checkpoint directory under `root`, ascending."""
    if not os.path.isdir(root):
        return []
    its = []
    for name in os.listdir(root):
        if name.startswith("iter_") and name[5:].isdigit() and os.path.isdir(os.path.join(root, name)):
            its.append(int(name[5:]))
    return sorted(its)


def prune_checkpoints(root, keep_last_n, keep=None):
    """Remove all but the newest `keep_last_n` checkpoints (never `keep`)."""
    its = list_checkpoints(root)
    for it in its[:-keep_last_n] if keep_last_n > 0 else its:
        if it != keep:
            shutil.rmtree(iteration_dir(root, it), ignore_errors=True)


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
                "max_position_embeddings"):
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


def shard_files(rank_dir):
    """The distributed optimizer's per-DP-rank files in `rank_dir`, by DP rank."""
    files = {}
    for name in os.listdir(rank_dir):
        if name.startswith("distrib_optim_dp_") and name.endswith(".pt"):
            num = name[len("distrib_optim_dp_"):-len(".pt")]
            if num.isdigit():
                files[int(num)] = os.path.join(rank_dir, name)
    return files


def _torch_load(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise CheckpointError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None


def _load_optimizer_state(path, rank_dir, saved, optimizer):
    """Load the checkpoint's optimizer state into `optimizer`; False when it holds none.

    A distributed optimizer takes its own shard at the same DP size, or the
    list of every old DP rank's shard to re-shard at another DP size. State of
    the other optimizer kind (plain <-> distributed) is converted.
    """
    from megatron import mpu
    from megatron.optimizer.state_conversion import distributed_to_plain, plain_to_distributed
    sharded = bool(getattr(optimizer, "is_sharded", False))
    shards = shard_files(rank_dir)
    saved_dp = saved.get("parallel", {}).get("data_parallel_size")
    if not shards and "optimizer" not in saved:
        return False
    if shards and sorted(shards) != list(range(saved_dp or 0)):
        raise CheckpointError(f"checkpoint {rank_dir} is incomplete: it was saved at data-parallel "
                              f"size {saved_dp} but holds distributed-optimizer shards of DP ranks "
                              f"{sorted(shards)}")
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
                distributed_to_plain(optimizer, [_torch_load(shards[r]) for r in range(saved_dp)])
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
            optimizer.load_state_dict(_torch_load(shards[dp_rank]))
        else:
            print_rank_0(f"re-sharding the distributed optimizer state of {rank_dir} from "
                         f"data-parallel size {saved_dp} to {dp}")
            optimizer.load_state_dict([_torch_load(shards[r]) for r in range(saved_dp)])
    except ValueError as e:  # the optimizer's one-line mismatch messages (e.g. fp32 masters)
        raise CheckpointError(f"checkpoint {where}: {e}") from None
    return True


def load_checkpoint(cfg, model_chunks, optimizer, scheduler, root=None, load_optimizer=True,
                    load_rng=True):
    """Resume from the latest checkpoint under `root` (default `cfg.checkpoint.load`).

    Returns (iteration, consumed_samples), (0, 0) when there is nothing to load.
    A checkpoint without optimizer state (or `load_optimizer=False`) resumes with
    a fresh optimizer built from the loaded weights; the scheduler, iteration
    and data position are restored either way. A distributed optimizer's state
    saved at another data-parallel size is re-sharded, and state written by the
    other optimizer kind (plain <-> distributed) is converted. Raises
    CheckpointError when the checkpoint does not fit the model or layout, or
    its optimizer state cannot be converted (e.g. fp32 state into a bf16 run).
    """
    from megatron import mpu
    root = root or cfg.checkpoint.load
    if root is None:
        return 0, 0
    iteration = read_latest_iteration(root)
    if iteration is None:
        print_rank_0(f"no checkpoint under {root} ({LATEST} absent): starting from scratch")
        return 0, 0
    it_dir = existing_iteration_dir(root, iteration)
    rank_dir = os.path.join(it_dir, _my_rank_dir_name())
    path = os.path.join(rank_dir, MODEL_FILE)
    if not os.path.isfile(path):
        present = []
        if os.path.isdir(it_dir):
            present = sorted(os.listdir(it_dir))
        raise CheckpointError(
            f"checkpoint file {path} is missing (this rank's layout is TP="
            f"{mpu.get_tensor_model_parallel_world_size()}, PP={mpu.get_pipeline_model_parallel_world_size()}; "
            f"the checkpoint holds {present or 'nothing'})")
    saved = _torch_load(path)
    _check_layout(path, saved, cfg, model_chunks)
    if len(model_chunks) == 1:
        _load_model_state(path, model_chunks[0], saved["model"])
    else:
        for i, chunk in enumerate(model_chunks):
            _load_model_state(path, chunk, saved[f"model{i}"])
    if optimizer is not None:
        loaded = load_optimizer and _load_optimizer_state(path, rank_dir, saved, optimizer)
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
