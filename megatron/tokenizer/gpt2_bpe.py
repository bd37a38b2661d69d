"""GPT-2 byte-level BPE from ``vocab.json`` + ``merges.txt``, encoded by tiktoken.

tiktoken (a native engine, measured about 4x faster than Hugging Face
``tokenizers`` on one thread) takes "mergeable ranks": bytes -> rank, where a
lower rank merges first. GPT-2's merges list gives exactly that order: the 256
single bytes first, then merge i has rank 256 + i. A vocabulary's ids need not
equal those ranks (GPT-2 orders its byte tokens by printability; a trained
vocabulary may put special tokens first), so encoded ranks are mapped to ids
through a numpy lookup table.
"""

import json
import os

import numpy as np

from .build import TokenizerFileError

EOD_TOKEN = "<|endoftext|>"

# GPT-2's pre-tokenizer regex (contractions, letters, digits, other, spaces).
GPT2_SPLIT_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)


def bytes_to_unicode():
    """GPT-2's reversible map from the 256 byte values to printable characters."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def _load_vocab_and_merges(vocab_file, merge_file):
    for path in (vocab_file, merge_file):
        if not path or not os.path.isfile(path):
            raise TokenizerFileError(f"GPT2BPETokenizer: file not found: {path!r}")
    # str.translate maps GPT-2's printable stand-ins back to code points 0..255
    # in one C call; latin-1 then turns those into the bytes (fast for 50k tokens).
    table = {ord(c): b for b, c in bytes_to_unicode().items()}

    def to_bytes(token, path):
        try:
            return token.translate(table).encode("latin-1")
        except UnicodeEncodeError as e:
            raise TokenizerFileError(f"{path}: token {token!r} has character {token[e.start]!r} "
                                     "outside GPT-2's byte alphabet")

    try:
        with open(vocab_file, encoding="utf-8") as f:
            vocab = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise TokenizerFileError(f"{vocab_file}: not a JSON vocabulary ({e})")
    if not isinstance(vocab, dict):
        raise TokenizerFileError(f"{vocab_file}: expected a JSON object token -> id")
    merges = []
    with open(merge_file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line or (lineno == 1 and line.startswith("#version")):
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise TokenizerFileError(f"{merge_file}:{lineno}: expected two tokens, got {line!r}")
            merges.append((to_bytes(parts[0], merge_file), to_bytes(parts[1], merge_file)))
    return vocab, merges, to_bytes


class GPT2BPETokenizer:
    """Byte-level BPE identical to GPT-2's encoding, on tiktoken's native engine.

    ``tokenize`` treats the literal text ``<|endoftext|>`` as plain text; the
    end-of-document id (``eod``) is appended by id, never parsed from text.
    """

    def __init__(self, vocab_file, merge_file):
        import tiktoken

        vocab, merges, to_bytes = _load_vocab_and_merges(vocab_file, merge_file)
        if EOD_TOKEN not in vocab:
            raise TokenizerFileError(f"{vocab_file}: no {EOD_TOKEN} token")
        self._eod = int(vocab[EOD_TOKEN])
        self._vocab_size = max(int(i) for i in vocab.values()) + 1
        # Special tokens (EOD and any other added token) are never produced by
        # BPE; every other vocabulary entry is a byte string.
        id_of_bytes = {}
        id_to_bytes = [b""] * self._vocab_size
        for token, i in vocab.items():
            if token == EOD_TOKEN:
                continue
            try:
                b = to_bytes(token, vocab_file)
            except TokenizerFileError:
                continue  # an added special token outside the byte alphabet
            id_of_bytes.setdefault(b, int(i))
            id_to_bytes[int(i)] = b
        id_to_bytes[self._eod] = EOD_TOKEN.encode()
        ranks = {}
        for b in range(256):
            if bytes([b]) not in id_of_bytes:
                raise TokenizerFileError(f"{vocab_file}: byte {b} has no token: not a byte-level BPE vocabulary")
            ranks[bytes([b])] = b
        for a, b in merges:
            merged = a + b
            if merged in id_of_bytes and merged not in ranks:
                ranks[merged] = len(ranks)
        rank_to_id = np.empty(len(ranks), dtype=np.int64)
        for b, r in ranks.items():
            rank_to_id[r] = id_of_bytes[b]
        self._rank_to_id = rank_to_id
        self._identity = bool(np.array_equal(rank_to_id, np.arange(len(ranks))))
        self._id_to_bytes = id_to_bytes
        self._enc = tiktoken.Encoding(
            name=f"gpt2bpe:{os.path.basename(vocab_file)}",
            pat_str=GPT2_SPLIT_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={},
        )

    @property
    def vocab_size(self):
        """Number of ids (largest id + 1), before padding."""
        return self._vocab_size

    @property
    def eod(self):
        """Id of ``<|endoftext|>``."""
        return self._eod

    def _to_ids(self, ranks):
        if self._identity:
            return ranks
        return self._rank_to_id[np.asarray(ranks, dtype=np.int64)].tolist()

    def tokenize_array(self, text):
        """Ids of ``text`` as a numpy int64 array (the preprocessing fast path)."""
        ranks = np.asarray(self._enc.encode_ordinary(text), dtype=np.int64)
        return ranks if self._identity else self._rank_to_id[ranks]

    def tokenize(self, text):
        """Ids of ``text`` (a list of int)."""
        return self._to_ids(self._enc.encode_ordinary(text))

    def encode_batch_flat(self, texts):
        """All ids of ``texts`` concatenated (int64 array) and each text's length."""
        # encode_to_numpy skips building a Python int per token; with no special
        # tokens registered it encodes exactly like encode_ordinary.
        encode = self._enc.encode_to_numpy
        encoded = [encode(t, disallowed_special=()) for t in texts]
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        flat = np.concatenate(encoded) if encoded else np.zeros(0, np.uint32)
        return (flat.astype(np.int64) if self._identity else self._rank_to_id[flat]), lengths

    def encode_batch(self, texts, num_threads=1):
        """Ids of each text; ``num_threads`` > 1 encodes in tiktoken's thread pool."""
        if num_threads <= 1:
            return [self.tokenize(t) for t in texts]
        return [self._to_ids(r) for r in self._enc.encode_ordinary_batch(list(texts), num_threads=num_threads)]

    def detokenize(self, ids):
        """Text of ``ids``; bytes that are not valid UTF-8 become U+FFFD."""
        table = self._id_to_bytes
        return b"".join(table[int(i)] for i in ids).decode("utf-8", errors="replace")
