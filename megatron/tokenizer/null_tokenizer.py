"""The null tokenizer: text is already whitespace-separated integer ids."""

from .build import TokenizerConfigError


class NullTokenizer:
    """Ids written as text (``"12 7 401"``), for tests and benchmarks.

    As in Megatron-LM, ``vocab_size`` given is the number of ordinary ids; the
    end-of-document id is ``vocab_size`` itself, so the tokenizer's
    ``vocab_size`` property is one more than the number given.
    """

    def __init__(self, vocab_size):
        vocab_size = int(vocab_size)
        if vocab_size < 1:
            raise TokenizerConfigError(f"NullTokenizer: vocab_size must be positive, got {vocab_size}")
        self._n = vocab_size

    @property
    def vocab_size(self):
        """Ordinary ids plus the end-of-document id."""
        return self._n + 1

    @property
    def eod(self):
        """The end-of-document id (the ``vocab_size`` given)."""
        return self._n

    def tokenize(self, text):
        """Parse whitespace-separated integers; each must lie in [0, vocab_size)."""
        try:
            ids = [int(t) for t in text.split()]
        except ValueError as e:
            raise ValueError(f"NullTokenizer: {e}") from None
        for i in ids:
            if not 0 <= i <= self._n:
                raise ValueError(f"NullTokenizer: id {i} outside [0, {self._n}]")
        return ids

    def encode_batch(self, texts):
        """Ids of each text."""
        return [self.tokenize(t) for t in texts]

    def detokenize(self, ids):
        """Ids joined by single spaces."""
        return " ".join(str(int(i)) for i in ids)
