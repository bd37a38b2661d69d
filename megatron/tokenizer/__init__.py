"""Tokenizers: GPT-2 BPE (tiktoken), SentencePiece, Hugging Face tokenizer.json, null."""

from .build import (TOKENIZER_TYPES, TokenizerConfigError, TokenizerFileError, build_tokenizer,
                    padded_vocab_size)

__all__ = ["TOKENIZER_TYPES", "TokenizerConfigError", "TokenizerFileError", "build_tokenizer",
           "padded_vocab_size"]
