"""Choosing the checkpoint to resume from: the newest one that every rank can read.

The latest file names the newest complete iteration. When one of its files is
missing, truncated, fails its checksum or does not unpickle on any rank, every
rank falls back together to the next older iteration (a warning names both),
and the run fails in one line only when none is left. The ranks agree through
one small `all_gather_object` per iteration tried, so all of them pick the same
one whatever each found.
"""
import os

from megatron.checkpoint.files import (LATEST, CheckpointError, existing_iteration_dir,
                                       list_checkpoints, read_latest_iteration)
from megatron.logging import print_rank_0
from megatron.mpu.collectives import all_gather_object, get_global_rank


class LayoutMismatch(CheckpointError):
    """The checkpoint is fine but was saved at another layout: no older one will do better."""


def _candidates(root):
    """`(iterations to try, newest first; None or the one-line error)`: the latest file's
    iteration, then every older one on disk. A latest file that is unreadable, or absent
    beside iteration folders, means: every iteration on disk."""
    on_disk = list_checkpoints(root)
    try:
        latest = read_latest_iteration(root)
    except CheckpointError as e:
        if not on_disk:
            return [], f"{e}, and {root} holds no checkpoint folder to fall back to"
        print_rank_0(f"warning: {e}: trying the checkpoints on disk, newest first")
        return sorted(on_disk, reverse=True), None
    if latest is None:
        if on_disk:
            print_rank_0(f"warning: {os.path.join(root, LATEST)} is missing beside "
                         f"{len(on_disk)} checkpoint folders: trying them, newest first")
        return sorted(on_disk, reverse=True), None
    return [latest] + sorted((i for i in on_disk if i < latest), reverse=True), None


def read_newest_good(root, read):
    """Return `(iteration, it_dir, read(it_dir))` for the newest iteration under `root`
    that `read` accepts on every rank; `(None, None, None)` when there is none to try.

    Collective. `read(it_dir)` reads and checks this rank's files; it raises
    CheckpointError for a bad checkpoint (the ranks then try the next older one
    together) and LayoutMismatch when the checkpoint does not fit this run (every
    rank raises it at once). Any other exception counts as a bad checkpoint too, so
    that no rank leaves the agreement early."""
    # Rank 0's view of the folder, so that every rank walks the same list.
    candidates, error = all_gather_object(_candidates(root) if get_global_rank() == 0 else None)[0]
    if error:
        raise CheckpointError(error)
    refused = []
    for iteration in candidates:
        it_dir = existing_iteration_dir(root, iteration)
        result, verdict = None, None
        try:
            result = read(it_dir)
        except LayoutMismatch as e:
            verdict = ("layout", str(e))
        except Exception as e:  # noqa: BLE001 - reported below, never swallowed
            msg = str(e).splitlines()[0] if str(e) else ""
            verdict = ("bad", msg if isinstance(e, CheckpointError)
                       else f"reading {it_dir} failed: {type(e).__name__}: {msg}")
        verdicts = [v for v in all_gather_object(verdict) if v is not None]
        layout = [msg for kind, msg in verdicts if kind == "layout"]
        if layout:
            raise LayoutMismatch(layout[0])
        if not verdicts:
            for it, reason in refused:
                print_rank_0(f"warning: refused the checkpoint of iteration {it} ({reason}); "
                             f"resuming from the older iteration {iteration} ({it_dir}) instead")
            return iteration, it_dir, result
        reasons = list(dict.fromkeys(msg for _, msg in verdicts))  # DP ranks share files
        others = f" (and {len(reasons) - 1} more on other ranks)" if len(reasons) > 1 else ""
        refused.append((iteration, reasons[0] + others))
    if refused:
        shown = "; ".join(f"iteration {it}: {reason}" for it, reason in refused[:3])
        more = f"; and {len(refused) - 3} older ones" if len(refused) > 3 else ""
        raise CheckpointError(f"no checkpoint under {root} can be loaded: {shown}{more}")
    return None, None, None
