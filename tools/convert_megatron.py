"""Convert between Megatron-LM checkpoints (per-rank torch format) and ours.

Examples:
    python tools/convert_megatron.py import --load-dir megatron_ckpt --save-dir checkpoints/from_mlm \
        [--target-tensor-parallel-size 2] [--target-pipeline-parallel-size 2]
    python tools/convert_megatron.py export --load-dir checkpoints/gpt --save-dir megatron_ckpt \
        [--transformer-impl local]

Import reads Megatron-Core (local or Transformer Engine layer spec) or legacy
Megatron-LM names at any TP / PP / VP; the model comes from the saved args,
and `SAVE_DIR/config.yaml` holds the resulting config (pass it to
pretrain_gpt.py with --config). Optimizer and RNG states start fresh. Export
writes Megatron-Core names with the args Megatron-LM checks on load (resume
there with --no-load-optim --no-load-rng). docs/checkpoints.md has the details.
"""
import argparse
import sys

from megatron.cli import command


@command
def main(argv=None):
    """Parse arguments and convert; user errors exit with one line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("import", help="Megatron-LM checkpoint -> ours")
    e = sub.add_parser("export", help="ours -> Megatron-LM checkpoint (Megatron-Core names)")
    for q in (i, e):
        q.add_argument("--load-dir", required=True)
        q.add_argument("--save-dir", required=True)
        q.add_argument("--iteration", type=int, default=None,
                       help="iteration to convert (default: the latest)")
    i.add_argument("--target-tensor-parallel-size", type=int, default=1)
    i.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    i.add_argument("--target-virtual-pipeline-parallel-size", type=int, default=1)
    i.add_argument("--vocab-size", type=int, default=None,
                   help="the tokenizer's vocabulary size when its files are not on this machine")
    e.add_argument("--target-tensor-parallel-size", type=int, default=None,
                   help="default: the checkpoint's")
    e.add_argument("--target-pipeline-parallel-size", type=int, default=None,
                   help="default: the checkpoint's")
    e.add_argument("--target-virtual-pipeline-parallel-size", type=int, default=None,
                   help="default: the checkpoint's")
    e.add_argument("--transformer-impl", default="transformer_engine",
                   choices=("transformer_engine", "local"),
                   help="the layer spec the Megatron-LM run uses (its --transformer-impl): "
                        "transformer_engine fuses the layer norms into linear_qkv / linear_fc1")
    args = p.parse_args(argv)
    from megatron.checkpoint.megatron_lm import export_to_megatron, import_from_megatron
    sizes = (args.target_tensor_parallel_size, args.target_pipeline_parallel_size,
             args.target_virtual_pipeline_parallel_size)
    if args.command == "import":
        import_from_megatron(args.load_dir, args.save_dir, *sizes, iteration=args.iteration,
                             vocab_size=args.vocab_size)
    else:
        export_to_megatron(args.load_dir, args.save_dir, *sizes, iteration=args.iteration,
                           transformer_impl=args.transformer_impl)
    return 0


if __name__ == "__main__":
    sys.exit(main())
