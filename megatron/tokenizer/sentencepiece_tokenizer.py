"""SentencePiece tokenizer from a ``.model`` file."""

import os

from .build import TokenizerFileError

EOD_TOKEN = "<|endoftext|>"


class SentencePieceTokenizer:
    """A SentencePiece model; EOD is the ``<|endoftext|>`` piece if the model has
    one (``tools/train_tokenizer.py`` adds it as a control symbol), else ``</s>``."""

    def __init__(self, model_file):
        import sentencepiece as spm

        if not model_file or not os.path.isfile(model_file):
            raise FileNotFoundError(f"SentencePieceTokenizer: model file not found: {model_file!r}")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=model_file)
        except RuntimeError as e:  # the C++ side's parse failure
            raise TokenizerFileError(f"{model_file}: not a SentencePiece model ({e})") from None
        eod = self._sp.piece_to_id(EOD_TOKEN)
        if eod == self._sp.unk_id() or eod < 0:
            eod = self._sp.eos_id()
        if eod < 0:
            raise TokenizerFileError(f"{model_file}: has neither a {EOD_TOKEN} piece nor an end-of-sentence id")
        self._eod = eod

    @property
    def vocab_size(self):
        """Number of pieces."""
        return self._sp.get_piece_size()

    @property
    def eod(self):
        """End-of-document id."""
        return self._eod

    def tokenize(self, text):
        """Ids of ``text``."""
        return self._sp.encode(text)

    def encode_batch(self, texts, num_threads=1):
        """Ids of each text (SentencePiece's own batch encoder)."""
        return self._sp.encode(list(texts), num_threads=num_threads)

    def detokenize(self, ids):
        """Text of ``ids``."""
        return self._sp.decode([int(i) for i in ids])
