"""tools/preprocess_data.py and megatron/data/preprocess.py: content, order, bad input, ensure_preprocessed."""

import gzip
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron.data import preprocess as pp
from megatron.data.indexed_dataset import IndexedDataset
from megatron.tokenizer import build_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "preprocess_data.py")
GPT2 = {"type": "GPT2BPETokenizer", "vocab_file": os.path.join(ROOT, "data", "kjv-vocab.json"),
        "merge_file": os.path.join(ROOT, "data", "kjv-merges.txt")}
GPT2_FLAGS = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", GPT2["vocab_file"],
              "--merge-file", GPT2["merge_file"]]


def kjv_texts(n):
    with gzip.open(os.path.join(ROOT, "data", "kjv.jsonl.gz"), "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in itertools.islice(f, n)]


def write_jsonl(path, records):
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    (gzip.open if str(path).endswith(".gz") else open)(path, "wb").write(data)
    return str(path)


def documents(prefix):
    ds = IndexedDataset(prefix)
    assert ds.document_indices.tolist() == list(range(len(ds) + 1))  # one sequence per document
    return [ds[i].tolist() for i in range(len(ds))]


def run_tool(*args):
    return subprocess.run([sys.executable, TOOL, "--no-progress", *args], capture_output=True, text=True)


def test_content_and_workers_byte_identical(tmp_path):
    # Short verses so that 2 workers get several chunks (CHUNK_LINES lines each).
    verses = [v for t in kjv_texts(40) for v in t.split(". ")]
    texts = (verses * (2 * pp.CHUNK_LINES // len(verses) + 2))[: 2 * pp.CHUNK_LINES + 123]
    texts[5] = "x <|endoftext|> y 中文 🙂"
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t, "id": i} for i, t in enumerate(texts)])
    outs = {}
    for w in (1, 2):
        r = run_tool("--input", src, "--output-prefix", str(tmp_path / f"w{w}"), *GPT2_FLAGS,
                     "--append-eod", "--workers", str(w))
        assert r.returncode == 0, r.stderr
        assert f"documents={len(texts)}" in r.stdout.splitlines()[-1]
        outs[w] = [(tmp_path / f"w{w}_text_document{ext}").read_bytes() for ext in (".bin", ".idx")]
    assert outs[1] == outs[2]
    tok = build_tokenizer(GPT2)
    docs = documents(str(tmp_path / "w2_text_document"))
    assert docs == [tok.tokenize(t) + [tok.eod] for t in texts]
    assert IndexedDataset(str(tmp_path / "w1_text_document")).dtype == np.uint16
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"] + [f"w{w}_text_document{e}" for w in (1, 2)
                                                           for e in (".bin", ".idx")]


def test_gz_glob_keys_empty_and_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(pp, "CHUNK_LINES", 7)  # many chunks in-process too
    texts = kjv_texts(30)
    a = write_jsonl(tmp_path / "a.jsonl.gz", [{"text": t, "title": t[:20]} for t in texts[:17]])
    write_jsonl(tmp_path / "b.jsonl", [{"text": t, "title": t[-9:]} for t in texts[17:]] + [{"text": "", "title": "e"}])
    (tmp_path / "b.jsonl").open("a").write("\n")  # a blank line holds no document
    out = tmp_path / "out"
    out.mkdir()
    s = pp.preprocess(str(tmp_path / "*.jsonl*"), str(out / "c"), GPT2, json_keys=["text", "title"],
                      progress=False)
    tok = build_tokenizer(GPT2)
    assert documents(str(out / "c_text_document")) == [tok.tokenize(t) for t in texts]  # a.jsonl.gz first
    assert documents(str(out / "c_title_document")) == [tok.tokenize(t) for t in
                                                        [t[:20] for t in texts[:17]] + [t[-9:] for t in texts[17:]] + ["e"]]
    assert s.empty == 1 and s.bad_lines == 0
    assert s.input_bytes == len(gzip.open(a, "rb").read()) + (tmp_path / "b.jsonl").stat().st_size
    s = pp.preprocess(str(tmp_path / "b.jsonl"), str(out / "k"), GPT2, keep_empty=True, append_eod=True,
                      progress=False)
    assert documents(str(out / "k_text_document"))[-1] == [tok.eod] and s.empty == 0


BAD_CASES = [
    ("invalid JSON", b'{"text": "ok"\n', "invalid JSON"),
    ("missing key", b'{"body": "no text key"}\n', "no key 'text'"),
    ("non-string", b'{"text": 42}\n', "'text' holds a int, not a string"),
    ("not an object", b'["text"]\n', "not a JSON object"),
    ("not UTF-8", b'{"text": "caf\xe9"}\n', "not valid UTF-8"),
]


@pytest.mark.parametrize("name,bad,message", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_line_stops_without_output(tmp_path, name, bad, message):
    good = "".join(json.dumps({"text": t}) + "\n" for t in kjv_texts(6)).encode()
    src = tmp_path / "in.jsonl"
    src.write_bytes(good + bad + good)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(pp.PreprocessError) as e:
        pp.preprocess(str(src), str(out / "c"), GPT2, progress=False)
    assert f"{src}:7: {message}" in str(e.value)
    assert os.listdir(out) == []


def test_bad_line_cli_one_line_error_and_skip(tmp_path):
    texts = kjv_texts(8)
    lines = [json.dumps({"text": t}).encode() + b"\n" for t in texts]
    lines.insert(3, b'{"text": 1}\n')
    lines.insert(6, b"not json\n")
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(lines))
    out = tmp_path / "out"
    out.mkdir()
    r = run_tool("--input", str(src), "--output-prefix", str(out / "c"), *GPT2_FLAGS, "--workers", "2")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"error: {src}:4: 'text' holds a int, not a string "
                                             "(use --skip-bad-lines to skip such lines)"]
    assert os.listdir(out) == []
    r = run_tool("--input", str(src), "--output-prefix", str(out / "c"), *GPT2_FLAGS, "--skip-bad-lines",
                 "--append-eod")
    assert r.returncode == 0, r.stderr
    assert "skipped_bad_lines=2" in r.stdout and f"documents={len(texts)}" in r.stdout
    skipped = (out / "c.skipped.txt").read_text().splitlines()
    assert [s.split(": ")[0] for s in skipped] == [f"{src}:4", f"{src}:7"]
    tok = build_tokenizer(GPT2)
    assert documents(str(out / "c_text_document")) == [tok.tokenize(t) + [tok.eod] for t in texts]
    r = run_tool("--input", str(tmp_path / "missing.jsonl"), "--output-prefix", str(out / "m"), *GPT2_FLAGS)
    assert r.returncode == 1 and "missing.jsonl" in r.stderr and "Traceback" not in r.stderr
    r = run_tool("--input", str(src), "--output-prefix", str(out / "m"), "--tokenizer-type", "GPT2BPETokenizer",
                 "--vocab-file", str(tmp_path / "nope.json"), "--merge-file", GPT2["merge_file"])
    assert r.returncode == 1 and "nope.json" in r.stderr and "Traceback" not in r.stderr


def test_ensure_preprocessed(tmp_path):
    texts = kjv_texts(12)
    src = write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in texts])
    prefix = str(tmp_path / "sub" / "kjv_text_document")
    built = pp.ensure_preprocessed({"data_path": [prefix], "preprocess_input": src}, GPT2, progress=False)
    assert built == [prefix]
    tok = build_tokenizer(GPT2)
    assert documents(prefix) == [tok.tokenize(t) + [tok.eod] for t in texts]
    mtime = os.path.getmtime(prefix + ".bin")
    assert pp.ensure_preprocessed({"data_path": [prefix], "preprocess_input": src}, GPT2) == []
    assert os.path.getmtime(prefix + ".bin") == mtime
    # Blending: weights and prefixes alternate; only the absent one is built.
    other = str(tmp_path / "b_text_document")
    cfg = {"data_path": [0.3, prefix, 0.7, other], "preprocess_input": src}
    assert pp.ensure_preprocessed(cfg, GPT2, progress=False) == [other]
    with pytest.raises(pp.PreprocessError, match="absent_text_document.*preprocess_input"):
        pp.ensure_preprocessed({"data_path": [str(tmp_path / "absent_text_document")]}, GPT2)
    with pytest.raises(pp.PreprocessError, match="_<json key>_document"):
        pp.ensure_preprocessed({"data_path": [str(tmp_path / "oddname")], "preprocess_input": src}, GPT2)


def test_null_tokenizer_rejected_text_is_a_bad_line(tmp_path):
    null = {"type": "NullTokenizer", "vocab_size": 70000}
    src = write_jsonl(tmp_path / "ids.jsonl", [{"text": "1 2 3"}, {"text": "4 five 6"}, {"text": "69999 0"}])
    with pytest.raises(pp.PreprocessError, match=r"ids.jsonl:2: tokenizer rejected 'text'.*five"):
        pp.preprocess(src, str(tmp_path / "n"), null, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["ids.jsonl"]
    s = pp.preprocess(src, str(tmp_path / "n"), null, append_eod=True, skip_bad_lines=True, progress=False)
    assert documents(str(tmp_path / "n_text_document")) == [[1, 2, 3, 70000], [69999, 0, 70000]]
    assert IndexedDataset(str(tmp_path / "n_text_document")).dtype == np.int32  # 70001 ids
    assert s.bad_lines == 1 and (tmp_path / "n.skipped.txt").read_text().startswith(f"{src}:2: ")
