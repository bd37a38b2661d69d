"""Verify every checkpoint of a directory against its manifest (sizes and checksums).

Example:
    python tools/checkpoint_verify.py checkpoints/gpt2_tiny

Prints one line per iteration, oldest first: `iteration N: OK (...)`, or the
reason a resume would refuse it (missing, truncated, failing its checksum, not
unpickling). The exit code is 1 when the latest checkpoint (the one a resume
tries first) does not verify or the latest file is unreadable, else 0. A
checkpoint saved before manifests existed is reported "not verified" and counts
as good when all its files unpickle.
"""
import argparse
import os
import sys

from megatron.cli import command


@command
def main(argv=None):
    """Verify each checkpoint under DIR, one line each; non-zero when the latest fails."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir", help="checkpoint directory (holding iter_*/ and the latest file)")
    args = p.parse_args(argv)
    from megatron.checkpoint import (LATEST, CheckpointError, existing_iteration_dir,
                                     list_checkpoints, read_latest_iteration, verify_iteration)
    if not os.path.isdir(args.dir):
        raise CheckpointError(f"checkpoint directory {args.dir} does not exist")
    on_disk = list_checkpoints(args.dir)
    try:
        latest = read_latest_iteration(args.dir)
        latest_readable = True
    except CheckpointError as e:
        print(f"{LATEST}: {e}")
        latest, latest_readable = None, False
    if latest is None and on_disk:
        latest = on_disk[-1]
    if latest is None:
        raise CheckpointError(f"no checkpoint under {args.dir}")
    latest_ok = False
    for it in sorted(set(on_disk) | {latest}):
        tag = " (latest)" if it == latest else ""
        try:
            line = verify_iteration(existing_iteration_dir(args.dir, it))
            latest_ok = latest_ok or it == latest
        except CheckpointError as e:
            line = f"FAILED: {e}"
        print(f"iteration {it}{tag}: {line}", flush=True)
    return 0 if latest_ok and latest_readable else 1


if __name__ == "__main__":
    sys.exit(main())
