"""``build_tokenizer`` from the config's tokenizer section, and vocabulary padding."""

import os

from megatron.errors import UserError

TOKENIZER_TYPES = ("GPT2BPETokenizer", "SentencePieceTokenizer", "HuggingFaceTokenizer", "NullTokenizer")


class TokenizerConfigError(UserError, ValueError):
    """A tokenizer section that names a missing file or an unknown type."""


class TokenizerFileError(UserError, ValueError):
    """A tokenizer file that is missing or malformed (one clear line)."""


def _get(cfg, name):
    if isinstance(cfg, dict):
        return cfg.get(name)
    return getattr(cfg, name, None)


def _need_file(kind, field, path):
    if not path:
        raise TokenizerConfigError(f"{kind} needs tokenizer.{field} (a file path), none given")
    if not os.path.isfile(path):
        raise TokenizerConfigError(f"{kind}: tokenizer.{field} {path!r} does not exist")
    return path


def build_tokenizer(tokenizer_cfg):
    """Build the tokenizer named by ``tokenizer_cfg.type`` (a dataclass or a dict with
    ``type``, ``vocab_file``, ``merge_file``, ``tokenizer_model``, ``vocab_size``)."""
    kind = _get(tokenizer_cfg, "type") or "GPT2BPETokenizer"
    # Each engine is imported only when chosen: preprocessing start-up time counts.
    if kind == "GPT2BPETokenizer":
        from .gpt2_bpe import GPT2BPETokenizer

        return GPT2BPETokenizer(_need_file(kind, "vocab_file", _get(tokenizer_cfg, "vocab_file")),
                                _need_file(kind, "merge_file", _get(tokenizer_cfg, "merge_file")))
    if kind == "SentencePieceTokenizer":
        from .sentencepiece_tokenizer import SentencePieceTokenizer

        return SentencePieceTokenizer(_need_file(kind, "tokenizer_model", _get(tokenizer_cfg, "tokenizer_model")))
    if kind == "HuggingFaceTokenizer":
        from .huggingface_tokenizer import HuggingFaceTokenizer

        return HuggingFaceTokenizer(_need_file(kind, "tokenizer_model", _get(tokenizer_cfg, "tokenizer_model")))
    if kind == "NullTokenizer":
        from .null_tokenizer import NullTokenizer

        vocab_size = _get(tokenizer_cfg, "vocab_size")
        if vocab_size is None:
            raise TokenizerConfigError("NullTokenizer needs tokenizer.vocab_size, none given")
        return NullTokenizer(vocab_size)
    raise TokenizerConfigError(f"unknown tokenizer.type {kind!r}; choose one of {', '.join(TOKENIZER_TYPES)}")


def padded_vocab_size(vocab_size, make_vocab_size_divisible_by=128, tensor_model_parallel_size=1):
    """Round ``vocab_size`` up to a multiple of ``make_vocab_size_divisible_by`` x TP,
    so each tensor-parallel shard of the embedding has the same, aligned size."""
    multiple = int(make_vocab_size_divisible_by) * int(tensor_model_parallel_size)
    if multiple < 1:
        raise ValueError(f"make_vocab_size_divisible_by x tensor_model_parallel_size must be positive, "
                         f"got {make_vocab_size_divisible_by} x {tensor_model_parallel_size}")
    return -(-int(vocab_size) // multiple) * multiple
