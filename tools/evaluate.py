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

from megatron.cli import command
from megatron.errors import UserError


def read_text(path):
    """The text of ``--data``; a missing or non-UTF-8 file is the user's to fix."""
    if not os.path.isfile(path):
        raise UserError(f"--data {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"--data {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None


@command
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

    from tqdm import tqdm
    from megatron.inference.evaluation import evaluate_lambada, evaluate_wikitext, read_lambada
    from megatron.inference.loader import init_inference_parallel, load_inference_model
    from megatron.initialize import select_device
    rank0 = int(os.environ.get("RANK", "0")) == 0
    progress = (lambda xs: tqdm(xs, file=sys.stderr)) if rank0 else None
    text = read_text(args.data)
    device = select_device(args.device)
    init_inference_parallel(device)
    im = load_inference_model(args.load, device=device)
    if args.task == "wikitext":
        result = evaluate_wikitext(im, text, args.overlapping_eval,
                                   detokenize=not args.no_detokenize, progress=progress)
    else:
        result = evaluate_lambada(im, read_lambada(args.data), strict=args.strict,
                                  progress=progress)
    result["checkpoint"] = args.load
    result["iteration"] = im.iteration
    if rank0:
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
