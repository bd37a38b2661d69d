"""Checkpoint files on disk: names and paths, the atomic writer, the loader.

Layout: `{root}/iter_{N:07d}/mp_rank_{tp:02d}[_{pp:03d}]/model_optim_rng.pt`
(plus `distrib_optim_dp_{dp:03d}.pt` per DP rank of a distributed optimizer)
and `{root}/latest_checkpointed_iteration.txt` naming the newest complete
iteration. Every file is written by `atomic_write` and read by `load_file`.
"""
import os
import shutil

import torch

from megatron.checkpoint.checksum import HashingFile, bytes_entry
from megatron.errors import UserError
from megatron.logging import print_rank_0

LATEST = "latest_checkpointed_iteration.txt"
MODEL_FILE = "model_optim_rng.pt"
_SHARD_PREFIX = "distrib_optim_dp_"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used with this configuration (one-line message)."""


# ---------------------------------------------------------------- names and paths
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


def rank_dir_name(tp_rank, pp_rank, pp_size):
    """`mp_rank_XX` without pipelining, `mp_rank_XX_YYY` with it (Megatron's names)."""
    if pp_size == 1:
        return f"mp_rank_{tp_rank:02d}"
    return f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def shard_file_name(dp_rank):
    """The distributed optimizer's file of DP rank `dp_rank`: `distrib_optim_dp_{dp:03d}.pt`."""
    return f"{_SHARD_PREFIX}{dp_rank:03d}.pt"


def shard_rank(name):
    """The DP rank of a distributed-optimizer file name, None for any other name."""
    if name.startswith(_SHARD_PREFIX) and name.endswith(".pt"):
        num = name[len(_SHARD_PREFIX):-len(".pt")]
        if num.isdigit():
            return int(num)
    return None


def shard_files(rank_dir):
    """The distributed optimizer's per-DP-rank files in `rank_dir`, by DP rank."""
    return {shard_rank(name): os.path.join(rank_dir, name)
            for name in os.listdir(rank_dir) if shard_rank(name) is not None}


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


def write_latest_iteration(root, iteration):
    """Point the latest file under `root` at `iteration` (atomically)."""
    atomic_write(os.path.join(root, LATEST), f"{iteration}\n")


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


def remove_stale_tmp_dirs(root, iteration):
    """Remove `iter_*.tmp` folders left by crashed saves of iterations other than `iteration`."""
    keep = os.path.basename(iteration_dir(root, iteration)) + ".tmp"
    for name in os.listdir(root):
        if (name.startswith("iter_") and name.endswith(".tmp") and name != keep
                and os.path.isdir(os.path.join(root, name))):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def replace_dir(tmp_dir, final_dir):
    """Rename the finished `tmp_dir` to `final_dir`, replacing an earlier `final_dir`
    (an iteration saved again, e.g. SIGTERM right after a periodic save, or a
    converted checkpoint written again) by way of `final_dir.old`, which
    `existing_iteration_dir` falls back to after a crash between the renames."""
    if os.path.isdir(final_dir):
        old = final_dir + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)


# ---------------------------------------------------------------- write and read
def atomic_write(path, obj):
    """Write `obj` to `path`: a str as text, anything else with torch.save; return the
    file's manifest entry `{"size": bytes, "checksum": hex}` (checksum.py), computed
    from the bytes as they are written.

    The data goes to a temporary name, is fsynced, then renamed over `path`, so a
    reader (or a crash) sees the old file or the whole new one, and a latest file
    written afterwards never names data that is not on disk yet.
    """
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            if isinstance(obj, str):
                data = obj.encode()
                f.write(data)
                entry = bytes_entry(data)
            else:
                out = HashingFile(f)
                torch.save(obj, out)
                entry = out.entry()
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if os.path.exists(tmp):  # a full disk: leave no torn temporary behind
            os.remove(tmp)
        raise
    os.replace(tmp, path)
    return entry


def load_file(path):
    """torch.load a checkpoint file (weights only, on the CPU) or raise CheckpointError
    in one line naming the file: missing, or unreadable (truncated, foreign)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None
