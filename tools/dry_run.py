"""Dry-run any rank of a W-rank training job on this CPU: memory, collectives, FLOPs per step.

Examples:
    python tools/dry_run.py --config configs/gpt2_8.3b.yaml --world-size 512
    python tools/dry_run.py --config configs/gpt2_8.3b.yaml --world-size 512 --rank 300 \\
        parallel.pipeline_model_parallel_size=4 training.recompute=full

The real code of one rank (its model chunks, schedule, gradient sync, clipping and
optimizer step) runs on fake tensors in a fake world of --world-size ranks: nothing is
allocated or computed. Prints one report per rank (every distinct role without --rank),
then one key=value line. See docs/dry_run.md.
"""
import argparse
import sys

from megatron.cli import command


@command
def main(argv=None):
    """Parse arguments and dry-run; user errors (a layout that does not fit) exit with one line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML config file")
    from megatron.dryrun.console import add_arguments, run
    add_arguments(p)
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = p.parse_args(argv)
    from megatron.config import load_config
    run(load_config(args.config, args.overrides), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
