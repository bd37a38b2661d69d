"""Reshard a checkpoint to another tensor / pipeline parallel layout.

Example:
    python tools/checkpoint_convert.py --load-dir checkpoints/a --save-dir checkpoints/b \
        --target-tensor-parallel-size 4 --target-pipeline-parallel-size 1 [--include-optimizer]

Runs as one plain process on a checkpoint of any layout (every shard is merged
in memory). Without --include-optimizer the result holds no optimizer state
(resume it with a fresh optimizer).
"""
import argparse
import sys

from megatron.cli import command


@command
def main(argv=None):
    """Parse arguments and convert; user errors exit with one line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load-dir", required=True, help="checkpoint to read (its latest iteration)")
    p.add_argument("--save-dir", required=True, help="where to write the converted checkpoint")
    p.add_argument("--target-tensor-parallel-size", type=int, required=True)
    p.add_argument("--target-pipeline-parallel-size", type=int, required=True)
    p.add_argument("--target-virtual-pipeline-parallel-size", type=int, default=1)
    p.add_argument("--include-optimizer", action="store_true",
                   help="reshard the optimizer state (Adam moments, fp32 master weights) too; "
                        "a distributed-optimizer checkpoint's per-DP-rank shards are merged, and "
                        "the result is written in the plain optimizer's format")
    p.add_argument("--iteration", type=int, default=None, help="iteration to convert (default: latest)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="the tokenizer's vocabulary size (default: built from the checkpoint's config)")
    args = p.parse_args(argv)
    from megatron.checkpoint import convert_checkpoint
    convert_checkpoint(args.load_dir, args.save_dir, args.target_tensor_parallel_size,
                       args.target_pipeline_parallel_size,
                       args.target_virtual_pipeline_parallel_size,
                       include_optimizer=args.include_optimizer, iteration=args.iteration,
                       vocab_size=args.vocab_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
