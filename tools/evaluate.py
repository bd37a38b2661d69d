"""Zero-shot evaluation of a checkpoint: WikiText perplexity or LAMBADA accuracy.

Example:
    python tools/evaluate.py --load checkpoints/gpt2_tiny --task wikitext --data wiki.test.raw
    python tools/evaluate.py --load CKPT --task lambada --data lambada_test.jsonl --strict

Prints progress, then one JSON object of results as the last line.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    """Parse arguments, evaluate, print the JSON line; user errors exit with one line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load", required=True, help="checkpoint directory")
    p.add_argument("--task", required=True, choices=["wikitext", "lambada"])
    p.add_argument("--data", required=True, help="raw text (wikitext) or JSONL with 'text' (lambada)")
    p.add_argument("--overlapping-eval", type=int, default=32,
                   help="wikitext: tokens each window slides by (only they are scored)")
    p.add_argument("--strict", action="store_true",
                   help="lambada: predict every subword token of the last word")
    p.add_argument("--no-detokenize", action="store_true",
                   help="wikitext: skip the WikiText detokenizer")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = p.parse_args(argv)

    import torch
    from tqdm import tqdm
    from megatron.checkpoint import CheckpointError
    from megatron.inference.evaluation import evaluate_lambada, evaluate_wikitext, read_lambada
    from megatron.inference.loader import init_inference_parallel, load_inference_model
    from megatron.initialize import select_device
    rank0 = int(os.environ.get("RANK", "0")) == 0
    progress = (lambda xs: tqdm(xs, file=sys.stderr)) if rank0 else None
    try:
        if not os.path.isfile(args.data):
            raise ValueError(f"--data {args.data} does not exist")
        device = select_device(args.device)
        init_inference_parallel(device)
        im = load_inference_model(args.load, device=device)
        if args.task == "wikitext":
            with open(args.data, encoding="utf-8") as f:
                text = f.read()
            result = evaluate_wikitext(im, text, args.overlapping_eval,
                                       detokenize=not args.no_detokenize, progress=progress)
        else:
            result = evaluate_lambada(im, read_lambada(args.data), strict=args.strict,
                                      progress=progress)
    except (CheckpointError, ValueError, OSError, RuntimeError) as e:
        print(f"error: {(str(e).splitlines() or [repr(e)])[0]}", file=sys.stderr)
        return 1
    finally:
        if torch.distributed.is_initialized():
            from megatron.initialize import destroy_megatron
            destroy_megatron()
    result["checkpoint"] = args.load
    result["iteration"] = im.iteration
    if rank0:
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
