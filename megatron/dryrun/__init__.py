"""The dry run: one rank of a W-rank training job, run on one CPU with fake tensors.

Public API (see docs/dry_run.md):

- ``dry_run(cfg, world_size, rank=0, *, model_provider=None, forward_step_func=None,
  vocab_size=None, target=None) -> DryRunReport``: the real training step of global
  rank ``rank`` (its model chunks, schedule, gradient sync, clipping, optimizer step)
  in a fake world of ``world_size`` ranks; memory in bytes, collectives, FLOPs.
- ``dry_run_roles(cfg, world_size, **kwargs) -> list[DryRunReport]``: one per distinct
  rank role (first / middle / last pipeline stage x DP rank 0 or not).
- ``distinct_roles(cfg, world_size) -> [(rank, role), ...]``.
- ``measure(cfg, steps=2, ...) -> DryRunReport``: the same figures measured on real
  tensors in an initialized process group (what validates the dry run).
- ``MemoryTracker``: the storage tracker behind the memory figures, also used on the
  first real iteration of a run (``megatron.dryrun.runtime``).

Names are imported on first use, so that ``megatron.dryrun.console`` (argument parsing)
does not import torch.
"""
import importlib

_EXPORTS = {
    "DryRunReport": "report", "GIB": "report",
    "MemoryTracker": "memory", "state_bytes": "memory", "state_storages": "memory",
    "DryRunError": "run", "distinct_roles": "run", "dry_run": "run", "dry_run_roles": "run",
    "measure": "run", "fake_batches": "run", "random_batches": "run", "formula_flops": "run",
    "global_rank": "run", "rank_coordinates": "run", "role_name": "run",
    "vocab_size_of": "run", "default_target": "run",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'megatron.dryrun' has no attribute {name!r}")
    return getattr(importlib.import_module(f"megatron.dryrun.{_EXPORTS[name]}"), name)
