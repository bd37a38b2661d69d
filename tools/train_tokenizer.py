"""Train a tokenizer on a JSONL(.gz) corpus.

Byte-level BPE (GPT-2 style, with Hugging Face `tokenizers`' native trainer)
writes `{prefix}-vocab.json` and `{prefix}-merges.txt` in GPT-2's format;
SentencePiece writes `{prefix}.model` and `{prefix}.vocab`. `<|endoftext|>` is
a special token in both (a control symbol for SentencePiece, so plain text
never produces it).

Example (the tokenizer in data/):
    python tools/train_tokenizer.py --input data/kjv.jsonl.gz --type bpe \
        --vocab-size 8192 --output-prefix data/kjv
"""

import argparse
import glob
import gzip
import json
import os
import shutil
import sys
import tempfile

from megatron.cli import command
from megatron.errors import UserError

EOD = "<|endoftext|>"


class TrainTokenizerError(UserError):
    """A user-caused problem (paths, corpus); printed as one line by the CLI."""


def iter_texts(pattern, key):
    """Yield the string `key` of every JSON line of the files matching `pattern`."""
    paths = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
    if not paths or not all(os.path.isfile(p) for p in paths):
        raise TrainTokenizerError(f"input not found: {pattern}")
    for path in paths:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[key]
                except (ValueError, KeyError, TypeError) as e:
                    raise TrainTokenizerError(f"{path}:{lineno}: not a JSON object with a string {key!r} ({e})")
                if not isinstance(text, str):
                    raise TrainTokenizerError(f"{path}:{lineno}: {key!r} is not a string")
                yield text


def train_bpe(texts, vocab_size, output_prefix, min_frequency=2):
    """Train a GPT-2-style byte-level BPE; write {prefix}-vocab.json and {prefix}-merges.txt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    name = os.path.basename(output_prefix)
    # Save into a temporary directory beside the target, then rename, so an
    # interrupted run never leaves half a tokenizer under the final names.
    tmp = tempfile.mkdtemp(dir=out_dir, prefix=".train_tokenizer-")
    try:
        files = tok.model.save(tmp, name)
        written = []
        for f in files:
            dst = os.path.join(out_dir, os.path.basename(f))
            os.replace(f, dst)
            written.append(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written


def train_sentencepiece(texts, vocab_size, output_prefix, model_type="bpe"):
    """Train a SentencePiece model; write {prefix}.model and {prefix}.vocab."""
    import sentencepiece as spm

    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    name = os.path.basename(output_prefix)
    tmp = tempfile.mkdtemp(dir=out_dir, prefix=".train_tokenizer-")
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_prefix=os.path.join(tmp, name),
            vocab_size=vocab_size,
            model_type=model_type,
            control_symbols=[EOD],
            byte_fallback=True,
            character_coverage=1.0,
            # Keep text as written (no NFKC, no whitespace folding) so that
            # detokenize(tokenize(text)) gives the text back.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            minloglevel=2,
        )
        written = []
        for ext in (".model", ".vocab"):
            dst = os.path.join(out_dir, name + ext)
            os.replace(os.path.join(tmp, name + ext), dst)
            written.append(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written


@command
def main(argv=None):
    """Parse arguments and train; user errors print one line and exit 1."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help=".jsonl, .jsonl.gz or a glob of them")
    p.add_argument("--json-key", default="text")
    p.add_argument("--type", choices=["bpe", "sentencepiece"], default="bpe")
    p.add_argument("--vocab-size", type=int, default=8192, help="total, special tokens included")
    p.add_argument("--min-frequency", type=int, default=2, help="bpe: least count of a merged pair")
    p.add_argument("--output-prefix", required=True)
    args = p.parse_args(argv)
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    if not os.path.isdir(out_dir):
        raise TrainTokenizerError(f"output directory does not exist: {out_dir}")
    texts = iter_texts(args.input, args.json_key)
    if args.type == "bpe":
        files = train_bpe(texts, args.vocab_size, args.output_prefix, args.min_frequency)
    else:
        # SentencePiece's trainer consumes a list more reliably than a generator.
        files = train_sentencepiece(list(texts), args.vocab_size, args.output_prefix)
    for f in files:
        print(f"wrote {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
