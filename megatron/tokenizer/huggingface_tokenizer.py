"""Hugging Face tokenizer from a ``tokenizer.json`` file (the ``tokenizers`` library)."""

import os

from .build import TokenizerFileError

EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>")


class HuggingFaceTokenizer:
    """A ``tokenizers.Tokenizer``; encodes without adding special tokens.

    EOD is the first of ``EOD_CANDIDATES`` present in the vocabulary.
    """

    def __init__(self, tokenizer_file):
        from tokenizers import Tokenizer

        if not tokenizer_file or not os.path.isfile(tokenizer_file):
            raise FileNotFoundError(f"HuggingFaceTokenizer: tokenizer.json not found: {tokenizer_file!r}")
        try:
            self._tok = Tokenizer.from_file(tokenizer_file)
        except Exception as e:  # the Rust side raises a plain Exception
            raise TokenizerFileError(f"{tokenizer_file}: not a tokenizer.json ({e})") from None
        for name in EOD_CANDIDATES:
            i = self._tok.token_to_id(name)
            if i is not None:
                self._eod = i
                break
        else:
            raise TokenizerFileError(f"{tokenizer_file}: no end-of-document token (looked for {', '.join(EOD_CANDIDATES)})")

    @property
    def vocab_size(self):
        """Number of ids, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eod(self):
        """End-of-document id."""
        return self._eod

    def tokenize(self, text):
        """Ids of ``text``."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        """Ids of each text (the library's parallel batch encoder)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def detokenize(self, ids):
        """Text of ``ids``."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)
