"""Convert between our checkpoints and Hugging Face transformers (GPT2LMHeadModel, LlamaForCausalLM).

Examples:
    python tools/convert_hf.py export --load-dir checkpoints/gpt2_tiny --save-dir hf/gpt2_tiny
    python tools/convert_hf.py export --load-dir checkpoints/llama_tiny --save-dir hf/llama_tiny
    python tools/convert_hf.py import --hf-dir hf/llama_tiny --save-dir checkpoints/from_hf \
        [--target-tensor-parallel-size 2] [--target-pipeline-parallel-size 2]

Export reads a checkpoint of any TP / PP layout and writes config.json,
model.safetensors and the tokenizer files (GPT-2 BPE, tokenizer.json or a SentencePiece
tokenizer.model); the model's block picks the class: GPT-2's block gives GPT2LMHeadModel,
Llama's (RoPE, RMSNorm, SwiGLU; any query groups, biases, tying) LlamaForCausalLM. Import
reads a gpt2 or llama directory and writes a checkpoint at iteration 0 (local directories
only, no hub access).
"""
import argparse
import sys

from megatron.cli import command
from megatron.errors import UserError


@command
def main(argv=None):
    """Parse arguments and convert; user errors exit with one line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="checkpoint -> Hugging Face directory")
    e.add_argument("--load-dir", required=True)
    e.add_argument("--save-dir", required=True)
    e.add_argument("--vocab-size", type=int, default=None,
                   help="unpadded vocabulary size (default: the checkpoint's tokenizer's)")
    i = sub.add_parser("import", help="Hugging Face directory -> checkpoint")
    i.add_argument("--hf-dir", required=True)
    i.add_argument("--save-dir", required=True)
    i.add_argument("--target-tensor-parallel-size", type=int, default=1)
    i.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    i.add_argument("--make-vocab-size-divisible-by", type=int, default=None,
                   help="default: the config's model.make_vocab_size_divisible_by")
    args = p.parse_args(argv)
    from megatron.checkpoint import export_to_hf, import_from_hf
    try:
        if args.command == "export":
            export_to_hf(args.load_dir, args.save_dir, vocab_size=args.vocab_size)
        else:
            import_from_hf(args.hf_dir, args.save_dir, args.target_tensor_parallel_size,
                           args.target_pipeline_parallel_size, args.make_vocab_size_divisible_by)
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in ("transformers", "safetensors"):
            raise  # one of our own modules: a bug
        raise UserError(f"{err}; the Hugging Face conversion needs transformers and safetensors "
                        "(pip install -e .[hf])") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
