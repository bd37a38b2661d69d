"""The dry run: one rank of a W-rank training job, run on one CPU with fake tensors.

Public API (see docs/dry_run.md):

- ``dry_run(cfg, world_size, rank=0, *, model_provider=None, forward_step_func=None,
  vocab_size=None) -> DryRunReport``: the real training step of global rank ``rank``
  (its model chunks, schedule, gradient sync, clipping, optimizer step) in a fake world
  of ``world_size`` ranks; memory in bytes, collectives, FLOPs.
- ``dry_run_roles(cfg, world_size, **kwargs) -> list[DryRunReport]``: one per distinct
  rank role (first / middle / last pipeline stage x DP rank 0 or not).
- ``distinct_roles(cfg, world_size) -> [(rank, role), ...]``.
- ``MemoryTracker``: the storage tracker behind the memory figures, also used on real
  steps (the runtime memory report after the first iteration).
"""
from megatron.dryrun.memory import MemoryTracker, state_bytes, state_storages
from megatron.dryrun.report import DryRunReport
from megatron.dryrun.run import (DryRunError, distinct_roles, dry_run, dry_run_roles, measure,
                                 fake_batches, formula_flops, global_rank, rank_coordinates,
                                 role_name, vocab_size_of)

__all__ = ["DryRunReport", "DryRunError", "MemoryTracker", "distinct_roles", "dry_run", "measure",
           "dry_run_roles", "fake_batches", "formula_flops", "global_rank", "rank_coordinates",
           "role_name", "state_bytes", "state_storages", "vocab_size_of"]
