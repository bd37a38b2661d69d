"""Tokenize a corpus into Megatron ``.bin``/``.idx`` files (Megatron-LM's flags).

Inputs: JSONL (.jsonl, .jsonl.gz, .jsonl.zst), Parquet (.parquet; --json-keys names the
text columns) and Hugging Face datasets saved with save_to_disk (a directory); several
paths or globs in one run, documents in the order given (a glob's matches sorted).

Example:
    python tools/preprocess_data.py --input data/kjv.jsonl.gz --output-prefix data/kjv \
        --tokenizer-type GPT2BPETokenizer --vocab-file data/kjv-vocab.json \
        --merge-file data/kjv-merges.txt --append-eod --workers 2
writes data/kjv_text_document.bin and .idx;
    python tools/preprocess_data.py --input 'fineweb/*.parquet' --output-prefix data/fw ...
"""

import argparse
import sys

from megatron.cli import command
from megatron.data.preprocess import preprocess
from megatron.tokenizer import TOKENIZER_TYPES


def parse_args(argv=None):
    """The command line, with Megatron-LM's flag names."""
    p = argparse.ArgumentParser(description="Tokenize a corpus into Megatron .bin/.idx files.")
    g = p.add_argument_group("input")
    g.add_argument("--input", required=True, nargs="+",
                   help=".jsonl, .jsonl.gz, .jsonl.zst, .parquet, a save_to_disk directory, or globs of "
                        "them (quote them); several are read in the order given")
    g.add_argument("--json-keys", nargs="+", default=["text"],
                   help="JSON keys, or Parquet / dataset columns, to extract (default: text)")
    g.add_argument("--skip-bad-lines", action="store_true",
                   help="skip lines that are not JSON objects with string keys, listing them in PREFIX.skipped.txt")
    g.add_argument("--keep-empty", action="store_true", help="keep documents with no tokens")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    g.add_argument("--vocab-file", help="GPT2BPETokenizer: vocab.json")
    g.add_argument("--merge-file", help="GPT2BPETokenizer: merges.txt")
    g.add_argument("--tokenizer-model", help="SentencePiece .model or Hugging Face tokenizer.json")
    g.add_argument("--vocab-size", type=int, help="NullTokenizer: number of ids (EOD is this id)")
    g.add_argument("--append-eod", action="store_true", help="append the end-of-document id to each document")
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True, help="writes PREFIX_{key}_document.bin/.idx")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    g.add_argument("--log-interval", type=int, default=1000, help="documents between progress updates")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


@command(interrupted="interrupted: no output written")
def main(argv=None):
    """Run preprocessing; user errors (and OSError, e.g. a full disk) print one line and exit 1,
    leaving no partial output."""
    args = parse_args(argv)
    tokenizer_cfg = {"type": args.tokenizer_type, "vocab_file": args.vocab_file, "merge_file": args.merge_file,
                     "tokenizer_model": args.tokenizer_model, "vocab_size": args.vocab_size}
    summary = preprocess(args.input, args.output_prefix, tokenizer_cfg, json_keys=args.json_keys,
                         append_eod=args.append_eod, workers=args.workers, log_interval=args.log_interval,
                         skip_bad_lines=args.skip_bad_lines, keep_empty=args.keep_empty,
                         progress=not args.no_progress)
    for out in summary.outputs:
        print(f"wrote {out}.bin and {out}.idx")
    if args.skip_bad_lines and summary.bad_lines:
        print(f"skipped lines listed in {args.output_prefix}.skipped.txt")
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
