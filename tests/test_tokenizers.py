"""Tokenizers: GPT-2 BPE ids equal the Hugging Face reference, round trips, padding, errors."""

import gzip
import itertools
import json
import os
import random
import subprocess
import sys
import types

import pytest

from megatron.tokenizer import TokenizerConfigError, build_tokenizer, padded_vocab_size

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "data")
KJV_VOCAB = os.path.join(DATA, "kjv-vocab.json")
KJV_MERGES = os.path.join(DATA, "kjv-merges.txt")

VARIED = [
    "Hello world! It's a test: don't, won't, they'll, we've, I'm, she'd, you're.",
    "Ünïcödé àccents — naïve café, Größe, ĉu, Ærø, ﬁ ligature",
    "中文字符测试，日本語のテキスト、한국어 텍스트",
    "emoji 🙂🚀👩‍👩‍👧‍👦 flags 🇫🇷 and ✓ marks",
    "    leading spaces, trailing spaces    ",
    "whitespace   runs\t\ttabs\n\nnewlines\r\n\r\nCRLF \n \n  \t",
    "digits 0123456789 3.14159 1,000,000 2026-11-28 12:34:56 0x1F",
    "punctuation !@#$%^&*()_+-=[]{}|;':\",./<>?`~ ... --- ***",
    "literal <|endoftext|> inside text<|endoftext|>and again",
    "'s 'S 'll 'LL ''' '' ' mixed'Case'd",
    "",
    " ",
    "\n",
    "a",
    "\u00a0non-breaking\u2009thin\u200bzero-width\ufeffbom",
    "mixed scripts: αβγ δεζ абв где עברית العربية हिन्दी",
]


def kjv_texts(n):
    with gzip.open(os.path.join(DATA, "kjv.jsonl.gz"), "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in itertools.islice(f, n)]


def hf_reference(vocab_file, merge_file):
    """GPT-2's reference encoding: a byte-level BPE in Hugging Face tokenizers."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.BPE.from_file(vocab_file, merge_file))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return tok


def random_texts(seed, n):
    """Random strings drawn from an alphabet of awkward characters."""
    rng = random.Random(seed)
    alphabet = list("abcXYZ 019'.,!?-\t\n\r") + ["  ", "   ", "é", "ß", "中", "🙂", "\u0301", "'s", "'ll"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(n)]


@pytest.fixture(scope="module")
def permuted_vocab(tmp_path_factory):
    """The KJV vocabulary with its ids shuffled: ranks and ids then differ everywhere."""
    d = tmp_path_factory.mktemp("perm")
    with open(KJV_VOCAB, encoding="utf-8") as f:
        vocab = json.load(f)
    ids = list(vocab.values())
    random.Random(0).shuffle(ids)
    path = d / "vocab.json"
    path.write_text(json.dumps(dict(zip(vocab, ids))), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("which", ["kjv", "permuted"])
def test_gpt2_ids_equal_reference(which, permuted_vocab):
    vocab = KJV_VOCAB if which == "kjv" else permuted_vocab
    tok = build_tokenizer({"type": "GPT2BPETokenizer", "vocab_file": vocab, "merge_file": KJV_MERGES})
    ref = hf_reference(vocab, KJV_MERGES)
    texts = VARIED + kjv_texts(60) + random_texts(1, 300)
    for text in texts:
        expected = ref.encode(text, add_special_tokens=False).ids
        assert tok.tokenize(text) == expected, text
    batch = tok.encode_batch(texts)
    assert batch == [ref.encode(t, add_special_tokens=False).ids for t in texts]
    assert tok.encode_batch(texts, num_threads=2) == batch
    flat, lengths = tok.encode_batch_flat(texts)
    assert lengths.tolist() == [len(b) for b in batch]
    assert flat.tolist() == [i for b in batch for i in b]
    for text in texts:
        assert tok.detokenize(tok.tokenize(text)) == text


def test_gpt2_eod_and_literal_special_text():
    tok = build_tokenizer({"type": "GPT2BPETokenizer", "vocab_file": KJV_VOCAB, "merge_file": KJV_MERGES})
    with open(KJV_VOCAB, encoding="utf-8") as f:
        vocab = json.load(f)
    assert tok.eod == vocab["<|endoftext|>"]
    assert tok.vocab_size == len(vocab) == 8192
    ids = tok.tokenize("a <|endoftext|> b")
    assert tok.eod not in ids and len(ids) > 3
    assert tok.detokenize(ids + [tok.eod]) == "a <|endoftext|> b<|endoftext|>"


def test_train_bpe_cli_matches_reference(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in kjv_texts(40) + VARIED), encoding="utf-8")
    out = tmp_path / "tiny"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train_tokenizer.py"), "--input", str(corpus),
                        "--vocab-size", "600", "--output-prefix", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    vocab_file, merge_file = f"{out}-vocab.json", f"{out}-merges.txt"
    tok = build_tokenizer(types.SimpleNamespace(type="GPT2BPETokenizer", vocab_file=vocab_file,
                                                merge_file=merge_file, tokenizer_model=None, vocab_size=None))
    assert tok.vocab_size == 600
    ref = hf_reference(vocab_file, merge_file)
    for text in VARIED + kjv_texts(50)[40:] + random_texts(2, 100):
        assert tok.tokenize(text) == ref.encode(text, add_special_tokens=False).ids
        assert tok.detokenize(tok.tokenize(text)) == text
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train_tokenizer.py"), "--input",
                        str(tmp_path / "nope.jsonl"), "--output-prefix", str(out)], capture_output=True, text=True)
    assert r.returncode == 1 and "input not found" in r.stderr and "Traceback" not in r.stderr


def test_sentencepiece_round_trip(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        from train_tokenizer import train_sentencepiece
    finally:
        sys.path.pop(0)
    texts = kjv_texts(30)
    (model,) = [f for f in train_sentencepiece(texts, 400, str(tmp_path / "sp")) if f.endswith(".model")]
    tok = build_tokenizer({"type": "SentencePieceTokenizer", "tokenizer_model": model})
    assert tok.vocab_size == 400
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model)
    assert tok.eod == sp.piece_to_id("<|endoftext|>") and tok.eod != sp.unk_id()
    for text in texts[:5] + VARIED:
        ids = tok.tokenize(text)
        assert all(0 <= i < tok.vocab_size for i in ids) and tok.eod not in ids
        assert tok.detokenize(ids) == text
    assert tok.encode_batch(VARIED) == [tok.tokenize(t) for t in VARIED]


def test_huggingface_round_trip(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(kjv_texts(30), trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    path = str(tmp_path / "tokenizer.json")
    hf.save(path)
    tok = build_tokenizer({"type": "HuggingFaceTokenizer", "tokenizer_model": path})
    assert tok.vocab_size == 500 and tok.eod == hf.token_to_id("<|endoftext|>")
    for text in VARIED:
        assert tok.detokenize(tok.tokenize(text)) == text
    assert tok.encode_batch(VARIED) == [tok.tokenize(t) for t in VARIED]


def test_null_tokenizer():
    tok = build_tokenizer({"type": "NullTokenizer", "vocab_size": 1000})
    assert tok.eod == 1000 and tok.vocab_size == 1001
    ids = [5, 0, 999, 17]
    assert tok.tokenize(tok.detokenize(ids)) == ids
    assert tok.tokenize(" 1\t2\n3 ") == [1, 2, 3]
    assert tok.encode_batch(["1 2", "", "3"]) == [[1, 2], [], [3]]
    with pytest.raises(ValueError, match="abc"):
        tok.tokenize("1 abc")
    with pytest.raises(ValueError, match="1001"):
        tok.tokenize("1001")


def test_padded_vocab_size():
    assert padded_vocab_size(50257, 128, 8) == 51200  # the paper's figure
    for v in (1, 127, 128, 129, 8192, 50257, 65535):
        for tp in (1, 2, 4, 8):
            p = padded_vocab_size(v, 128, tp)
            assert p % (128 * tp) == 0 and v <= p < v + 128 * tp
    assert padded_vocab_size(100, 1, 1) == 100


def test_build_tokenizer_errors(tmp_path):
    missing = str(tmp_path / "missing-vocab.json")
    with pytest.raises(TokenizerConfigError, match="missing-vocab.json"):
        build_tokenizer({"type": "GPT2BPETokenizer", "vocab_file": missing, "merge_file": KJV_MERGES})
    with pytest.raises(TokenizerConfigError, match="merge_file"):
        build_tokenizer({"type": "GPT2BPETokenizer", "vocab_file": KJV_VOCAB})
    with pytest.raises(TokenizerConfigError, match="tokenizer_model"):
        build_tokenizer({"type": "SentencePieceTokenizer"})
    with pytest.raises(TokenizerConfigError, match="vocab_size"):
        build_tokenizer({"type": "NullTokenizer"})
    with pytest.raises(TokenizerConfigError, match="'Bert'"):
        build_tokenizer({"type": "Bert"})
