"""The runtime memory report: after a run's first iteration, its measured peak tensor memory
beside the dry run's prediction, one console line per rank role (from rank 0).

``MemoryReport.predict`` runs before the run's process group exists: the dry run of this
very rank (its role in a fake world of the run's size, with the run's own model and
forward step), on fake tensors. ``measure(run)`` wraps the first iteration: on CUDA the
allocator's peak (``torch.cuda.max_memory_allocated``), elsewhere a ``MemoryTracker``
for that iteration only, started from the run's state (no cost afterwards). ``log(run)``
gathers every rank's pair and prints them by role.
"""
import contextlib
import os

import torch

from megatron.dryrun.memory import MemoryTracker, state_bytes, state_storages

MIB = 2 ** 20


def format_bytes(n):
    """``n`` bytes in KiB, MiB or GiB (the largest unit that keeps it above 1; two decimals)."""
    for unit, size in (("GiB", 2 ** 30), ("MiB", MIB)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n / 1024:.2f} KiB"


class MemoryReport:
    """What the first iteration of this rank should take (``prediction``, a DryRunReport,
    or None with ``reason``) and, after ``measure``, what it took (``measured`` bytes)."""

    def __init__(self, prediction=None, reason=None):
        self.prediction = prediction
        self.reason = reason
        self.measured = None
        self.resumed = False

    @classmethod
    def predict(cls, cfg, world_size, model_provider, forward_step_func, device):
        """Dry-run this rank (``RANK``, default 0) of the run; never raises: a run must not
        fail for its report (the reason is logged instead)."""
        from megatron import mpu
        from megatron.dryrun.run import dry_run
        if mpu.is_distributed():
            return cls(reason="the process group existed before pretrain(), so no fake "
                              "world could be made for the dry run")
        try:
            return cls(dry_run(cfg, world_size, int(os.environ.get("RANK", "0")),
                               model_provider=model_provider,
                               forward_step_func=forward_step_func,
                               target="cuda" if device.type == "cuda" else "cpu"))
        except Exception as e:  # noqa: BLE001 (a report, not the run)
            return cls(reason=f"the dry run failed: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}")

    @contextlib.contextmanager
    def measure(self, run):
        """Measure the peak tensor memory of the iteration run inside this block."""
        self.resumed = state_bytes(run.model_chunks, run.optimizer)["optimizer_state"] > 0
        if run.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(run.device)
            yield
            self.measured = torch.cuda.max_memory_allocated(run.device)
            return
        tracker = MemoryTracker()
        tracker.add_all(t for ts in state_storages(run.model_chunks, run.optimizer).values()
                        for t in ts)
        tracker.mark()
        try:
            with tracker:
                yield
        finally:
            tracker.stop()
        self.measured = tracker.peak

    def predicted_bytes(self):
        """The prediction for the measured iteration: the first step's peak, or every later
        step's when the run resumed with optimizer state; None without a prediction."""
        if self.prediction is None:
            return None
        return self.prediction.peak_bytes if self.resumed else self.prediction.first_step_peak_bytes

    def log(self, run, iteration):
        """Gather every rank's (role, measured, predicted) and print one line per role on
        rank 0 (the largest measurement of the role's ranks). Collective."""
        from megatron import mpu
        from megatron.dryrun.run import role_name
        from megatron.logging import print_rank_0
        dp = mpu.get_data_parallel_world_size()
        role = role_name(mpu.get_pipeline_model_parallel_rank(),
                         mpu.get_pipeline_model_parallel_world_size(),
                         mpu.get_data_parallel_rank(), dp)
        rows = mpu.all_gather_object((role, mpu.get_global_rank(), self.measured,
                                      self.predicted_bytes()))
        by_role = {}
        for r_role, rank, measured, predicted in rows:
            entry = by_role.setdefault(r_role, [[], 0, None])
            entry[0].append(rank)
            if measured >= entry[1]:
                entry[1], entry[2] = measured, predicted
        source = "torch.cuda.max_memory_allocated" if run.device.type == "cuda" else \
            "live tensor storages"
        print_rank_0(f"memory at iteration {iteration} (peak tensor bytes, {source}; "
                     f"predicted by the dry run):")
        for r_role, (ranks, measured, predicted) in by_role.items():
            if predicted is None:
                guess = f"no prediction ({self.reason or 'see rank ' + str(ranks[0])})"
            else:
                guess = (f"predicted {format_bytes(predicted)} "
                         f"({(measured - predicted) / max(predicted, 1):+.1%} measured vs predicted)")
            print_rank_0(f"  {r_role} ({len(ranks)} rank{'s' if len(ranks) > 1 else ''}, "
                         f"e.g. {ranks[0]}): measured {format_bytes(measured)}, {guess}")
