"""Rank-aware printing, simple wall-clock timers and a TensorBoard writer."""
import os
import time

from megatron.mpu.collectives import get_global_rank as _rank
from megatron.mpu.collectives import get_global_world_size as _world_size


def print_rank_0(*args, **kwargs):
    """Print on global rank 0 only (flushed, so logs interleave sensibly)."""
    if _rank() == 0:
        print(*args, **kwargs, flush=True)


def print_rank_last(*args, **kwargs):
    """Print on the last global rank only: it holds the loss when pipelining."""
    if _rank() == _world_size() - 1:
        print(*args, **kwargs, flush=True)


def is_last_rank():
    """True on the last global rank."""
    return _rank() == _world_size() - 1


class Timer:
    """Accumulates elapsed wall time between start() and stop()."""

    def __init__(self, name, synchronize=None):
        self.name = name
        self._synchronize = synchronize
        self._elapsed = 0.0
        self._start = None

    def start(self):
        """Start timing (synchronizing the device first when asked)."""
        if self._synchronize:
            self._synchronize()
        self._start = time.perf_counter()

    def stop(self):
        """Stop timing and add the interval."""
        if self._synchronize:
            self._synchronize()
        self._elapsed += time.perf_counter() - self._start
        self._start = None

    def elapsed(self, reset=True):
        """Seconds accumulated so far (including a running interval)."""
        total = self._elapsed
        if self._start is not None:
            total += time.perf_counter() - self._start
        if reset:
            self._elapsed = 0.0
            if self._start is not None:
                self._start = time.perf_counter()
        return total


class Timers:
    """A named collection of timers: `timers("forward").start()`."""

    def __init__(self, synchronize=None):
        self._timers = {}
        self._synchronize = synchronize

    def __call__(self, name):
        if name not in self._timers:
            self._timers[name] = Timer(name, self._synchronize)
        return self._timers[name]


class TensorBoardWriter:
    """Writes scalars on one rank, each also as `<tag> vs samples`; a no-op without a directory."""

    def __init__(self, log_dir, enabled=True):
        self._writer = None
        if log_dir and enabled:
            from torch.utils.tensorboard import SummaryWriter
            os.makedirs(log_dir, exist_ok=True)
            self._writer = SummaryWriter(log_dir=log_dir, max_queue=1000)

    @property
    def enabled(self):
        """True when events are written."""
        return self._writer is not None

    def add_scalar(self, tag, value, iteration, consumed_samples=None):
        """Log `tag` against the iteration and, when given, against consumed samples."""
        if self._writer is None:
            return
        value = float(value)
        self._writer.add_scalar(tag, value, iteration)
        if consumed_samples is not None:
            self._writer.add_scalar(f"{tag} vs samples", value, consumed_samples)

    def flush(self):
        """Flush pending events to disk."""
        if self._writer is not None:
            self._writer.flush()

    def close(self):
        """Flush and close the event file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
