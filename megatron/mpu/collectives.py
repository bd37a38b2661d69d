"""The process group itself and the collectives of the rest of the framework.

Everything outside ``mpu`` that needs to talk to other ranks (the loop's
per-step scalars, checkpoint RNG states, a shared sampling seed, failing
together) calls these helpers instead of ``torch.distributed``; the model's
own communication lives in ``mappings`` (autograd operators), ``distributed``
(gradient buffers) and ``p2p_communication`` (pipeline stages).

Every helper works without a process group (a plain single process): ranks
are 0, the world is 1 and a collective over a group of one does nothing.
"""
import contextlib
import datetime

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def is_distributed():
    """True when a default process group exists (even a world of one)."""
    return dist.is_available() and dist.is_initialized()


def get_global_rank():
    """This process's rank in the default group; 0 without one."""
    return dist.get_rank() if is_distributed() else 0


def get_global_world_size():
    """Number of processes in the default group; 1 without one."""
    return dist.get_world_size() if is_distributed() else 1


def get_group_world_size(group=None):
    """Number of ranks in ``group`` (default: all); 1 without a process group."""
    return dist.get_world_size(group) if is_distributed() else 1


def get_backend(group=None):
    """The backend name of ``group`` ("gloo", "nccl", ...); None without a process group."""
    return dist.get_backend(group) if is_distributed() else None


def collective_device(group=None):
    """The device a small tensor must live on to be reduced over ``group``."""
    if get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_TIMEOUT = None  # the default group's collective timeout, when init_process_group made it


def init_process_group(backend, rank, world_size, timeout_minutes, device=None, store=None):
    """Create the default process group (``store`` None: from MASTER_ADDR / MASTER_PORT).

    A collective that waits longer than ``timeout_minutes`` for another rank raises
    (``is_collective_timeout``); the model-parallel subgroups get the same timeout.
    ``backend="fake"`` makes a world of ``world_size`` ranks in which this process plays
    ``rank`` and no other rank exists: every collective and point-to-point op returns at
    once without moving data (torch's fake process group; the dry run uses it)."""
    global _TIMEOUT
    kwargs = {}
    if backend == "fake":
        # Importing fake_pg registers the "fake" backend; its store needs no peers.
        from torch.testing._internal.distributed.fake_pg import FakeStore
        store = FakeStore() if store is None else store
    if device is not None and device.type == "cuda":
        kwargs["device_id"] = device
    if store is not None:
        kwargs["store"] = store
    timeout = datetime.timedelta(minutes=timeout_minutes)
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                            timeout=timeout, **kwargs)
    _TIMEOUT = timeout


def default_timeout():
    """The timeout ``init_process_group`` gave the default group (a timedelta), or None
    when the group was made elsewhere; ``new_group`` would otherwise fall back to
    torch's backend default (30 minutes for gloo, 10 for nccl), not the default group's."""
    return _TIMEOUT if is_distributed() else None


# What gloo ("Timed out waiting 60000ms for recv operation to complete") and nccl's
# watchdog ("Watchdog caught collective operation timeout") say when a peer never came.
_TIMEOUT_MESSAGES = ("Timed out waiting", "collective operation timeout")


def is_collective_timeout(error):
    """True when ``error`` is a collective that gave up waiting for another rank."""
    return isinstance(error, RuntimeError) and any(m in str(error) for m in _TIMEOUT_MESSAGES)


# What gloo says when the process at the other end of a connection died (killed, crashed).
_PEER_LOST_MESSAGES = ("Connection reset by peer", "Connection closed by peer")


def is_peer_lost(error):
    """True when ``error`` is a collective whose connection to another rank broke."""
    return isinstance(error, RuntimeError) and any(m in str(error) for m in _PEER_LOST_MESSAGES)


def destroy_process_group():
    """Destroy the default process group if there is one."""
    global _TIMEOUT
    if is_distributed():
        dist.destroy_process_group()
    _TIMEOUT = None


def all_reduce(tensor, op="sum", group=None):
    """In-place all-reduce of ``tensor`` over ``group`` ("sum", "max" or "min");
    nothing to do over a group of one. Returns ``tensor``."""
    if get_group_world_size(group) > 1:
        dist.all_reduce(tensor, op=_OPS[op], group=group)
    return tensor


def broadcast(tensor, src, group=None):
    """In-place broadcast of ``tensor`` from global rank ``src`` to ``group``. Returns it."""
    if get_group_world_size(group) > 1:
        dist.broadcast(tensor, src=src, group=group)
    return tensor


def all_gather_object(obj, group=None):
    """Every rank's ``obj`` (picklable), in rank order of ``group``."""
    size = get_group_world_size(group)
    if size == 1:
        return [obj]
    gathered = [None] * size
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def barrier(group=None):
    """Wait for every rank of ``group``."""
    if get_group_world_size(group) > 1:
        dist.barrier(group=group)


class RanksFailedError(RuntimeError):
    """Raised by ``fail_together`` on the ranks whose block succeeded: another rank failed.

    Its one-line message names the failed ranks, whose own error (and traceback, if it
    is a bug) is in their output; ``megatron.cli`` prints it as one line."""


def _failed_ranks(failed, group):
    """Global ranks of ``group`` that report ``failed`` (one small all-reduce)."""
    flags = torch.zeros(dist.get_world_size(group), dtype=torch.int32,
                        device=collective_device(group))
    if failed:
        flags[dist.get_rank(group)] = 1
    dist.all_reduce(flags, group=group)
    bad = flags.nonzero().flatten().tolist()
    return [dist.get_global_rank(group, r) if group is not None else r for r in bad]


@contextlib.contextmanager
def fail_together(what, group=None):
    """A block that may fail on some ranks only (rank 0 building index files, one rank's
    disk full while saving), left by every rank of ``group`` (default: all) together.

    A rank whose block raised re-raises its own error; the others raise a one-line
    ``RanksFailedError`` (a RuntimeError) naming the failed ranks, instead of waiting
    at their next collective until the timeout. Every rank of the group must enter the
    block; its exit is one small all-reduce, which also serves as the barrier after the
    block. Blocks may nest or be entered in different places on different ranks (rank 0
    first), since every exit is the same collective. Without torch.distributed it is a
    plain block.
    """
    if not is_distributed():
        yield
        return
    try:
        yield
    except Exception as e:
        # After a timed-out or broken collective the other ranks cannot be told: trying
        # would only wait out the timeout a second time.
        if not (is_collective_timeout(e) or is_peer_lost(e)):
            _failed_ranks(True, group)
        raise
    bad = _failed_ranks(False, group)
    if bad:
        raise RanksFailedError(f"{what} failed on rank{'s' if len(bad) > 1 else ''} "
                               f"{', '.join(map(str, bad))} (its error is in that rank's output)")
