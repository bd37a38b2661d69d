"""Process-group setup: torchrun environment or a single process; device; seeds; mpu.

The one place where the device and backend are chosen: CUDA with nccl when
available (or asked), otherwise CPU with gloo.
"""
import os
import random
import socket

import numpy as np
import torch

from megatron.errors import UserError


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def select_device(device="auto"):
    """torch.device for `training.device` (auto|cpu|cuda), with the local rank's GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            from megatron.config import ConfigError
            raise ConfigError("training.device=cuda but CUDA is not available")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def world_size_from_env():
    """WORLD_SIZE as torchrun sets it (1 when run as plain python or before init)."""
    from megatron import mpu
    if mpu.is_distributed():
        return mpu.get_global_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


class CollectiveTimeoutError(UserError, RuntimeError):
    """A collective gave up waiting for another rank (hung, stopped or dead); one line
    naming the timeout and how to change it."""

    def __init__(self, timeout_minutes):
        from megatron import mpu
        super().__init__(
            f"a collective operation on rank {mpu.get_global_rank()} timed out after "
            f"{timeout_minutes:g} minute{'' if timeout_minutes == 1 else 's'} "
            f"(training.distributed_timeout_minutes="
            f"{timeout_minutes:g}): another rank stopped answering (hung, stopped or dead; "
            f"see its output); raise training.distributed_timeout_minutes if it is only slow")


class PeerLostError(UserError, RuntimeError):
    """A collective lost its connection to another rank (that process died); one line."""

    def __init__(self):
        from megatron import mpu
        super().__init__(
            f"rank {mpu.get_global_rank()} lost its connection to another rank in a collective "
            f"operation: that process died or was killed (its own error, if any, is in its "
            f"output)")


DEFAULT_TIMEOUT_MINUTES = 10  # training.distributed_timeout_minutes' default (Megatron's)


def init_distributed(device, timeout_minutes=DEFAULT_TIMEOUT_MINUTES):
    """Create the default process group from torchrun's env or as a world of one.

    A collective waits at most `timeout_minutes` for another rank. Under torchrun's
    shared agent store every launch round gets a store namespace of its own
    (`mpu.launch_round_store`), so a restart after a killed worker comes up in one
    round; otherwise (plain `python`, a launcher whose rank 0 hosts a fresh store)
    torch's env:// rendezvous. Reuses an existing default group (tests that launch
    their own processes).
    """
    from megatron import mpu
    if mpu.is_distributed():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        # Plain `python pretrain_gpt.py`: a one-process world on a free loopback port.
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ["RANK"], os.environ["WORLD_SIZE"] = "0", "1"
        os.environ.setdefault("LOCAL_RANK", "0")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = None
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # The same test torch's env:// handler makes before it connects as a client.
        store = mpu.launch_round_store(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                       rank, world_size, timeout_minutes)
    mpu.init_process_group(backend, rank, world_size, timeout_minutes, device, store=store)


def set_seeds(seed, device=None):
    """Seed python, numpy and torch identically on every rank; mpu's tracker per TP rank."""
    from megatron import mpu
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    mpu.model_parallel_seed(seed, device)


def initialize_megatron(cfg):
    """Set up device, process groups, model-parallel groups and seeds; return the device.

    `cfg` must already be finalized for the world size (config.finalize), so
    layout errors surface before any process group exists.
    """
    from megatron import mpu
    device = select_device(cfg.training.device)
    init_distributed(device, cfg.training.distributed_timeout_minutes)
    p = cfg.parallel
    if not mpu.model_parallel_is_initialized():
        try:
            mpu.initialize_model_parallel(p.tensor_model_parallel_size,
                                          p.pipeline_model_parallel_size,
                                          p.virtual_pipeline_model_parallel_size)
        except mpu.ModelParallelConfigError as e:  # mpu cannot import megatron's UserError
            from megatron.config import ConfigError
            raise ConfigError(str(e)) from None
    set_seeds(cfg.training.seed, device)
    return device


def destroy_megatron():
    """Tear down model-parallel groups and the default group (if this process made them)."""
    from megatron import mpu
    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    mpu.destroy_process_group()
