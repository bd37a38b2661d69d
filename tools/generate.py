"""Generate text from a checkpoint of any layout.

Example:
    python tools/generate.py --load checkpoints/gpt2_tiny --prompt "In the beginning" \
        --max-new-tokens 32 --greedy
    torchrun --nproc-per-node 2 tools/generate.py --load ... (tensor parallel over the ranks)

Prints the continuation (rank 0 only under torchrun).
"""
import argparse
import os
import sys

from megatron.cli import command


@command
def main(argv=None):
    """Parse arguments, load the model, print the continuation; user errors exit with one line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load", required=True, help="checkpoint directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=0.0, help="0 = off")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context each step")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = p.parse_args(argv)

    from megatron.inference.generation import generate
    from megatron.inference.loader import init_inference_parallel, load_inference_model
    from megatron.initialize import select_device
    device = select_device(args.device)
    init_inference_parallel(device)
    im = load_inference_model(args.load, device=device)
    text, _ = generate(im, args.prompt, args.max_new_tokens, greedy=args.greedy,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       seed=args.seed, use_cache=not args.no_cache)
    if int(os.environ.get("RANK", "0")) == 0:
        print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
