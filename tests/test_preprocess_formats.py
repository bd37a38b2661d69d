"""Corpora as they are shipped: JSONL (.zst too), Parquet and Hugging Face datasets
(save_to_disk) give byte-identical .bin/.idx for the same texts (megatron/data/corpus_readers.py)."""

import gzip
import itertools
import json
import os
import sys

import pytest

from megatron.data import preprocess as pp
from megatron.data.indexed_dataset import IndexedDataset
from megatron.tokenizer import build_tokenizer

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstandard = pytest.importorskip("zstandard")
datasets = pytest.importorskip("datasets")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPT2 = {"type": "GPT2BPETokenizer", "vocab_file": os.path.join(ROOT, "data", "kjv-vocab.json"),
        "merge_file": os.path.join(ROOT, "data", "kjv-merges.txt")}


def corpus(n=50):
    """Verses of the embedded corpus, with an empty text and non-ASCII ones."""
    with gzip.open(os.path.join(ROOT, "data", "kjv.jsonl.gz"), "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"][:300] for line in itertools.islice(f, n)]
    texts[3] = ""
    texts[7] = "x <|endoftext|> y 中文 🙂\n\ttabs"
    return texts


def jsonl_bytes(texts):
    return "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)).encode()


def write_parquet(path, texts, row_group_size=7):
    table = pa.table({"id": list(range(len(texts))), "text": texts})
    pq.write_table(table, path, row_group_size=row_group_size)
    return str(path)


def save_dataset(path, texts):
    ds = datasets.Dataset.from_dict({"text": texts, "id": list(range(len(texts)))})
    ds.save_to_disk(str(path))
    return str(path)


def output(prefix):
    return [open(f"{prefix}_text_document{ext}", "rb").read() for ext in (".bin", ".idx")]


def run(inputs, prefix, **kw):
    kw.setdefault("append_eod", True)
    return pp.preprocess(inputs, str(prefix), GPT2, progress=False, **kw)


def test_every_input_kind_gives_identical_files(tmp_path, monkeypatch):
    monkeypatch.setattr(pp, "CHUNK_LINES", 6)  # several chunks per file and per Parquet row group
    texts = corpus()
    raw = jsonl_bytes(texts)
    (tmp_path / "c.jsonl").write_bytes(raw)
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(raw))
    write_parquet(tmp_path / "c.parquet", texts)
    # Several Arrow files in one dataset: shards of a save_to_disk directory.
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "ds"), num_shards=3)
    reference = run(str(tmp_path / "c.jsonl"), tmp_path / "ref")
    assert reference.documents == len(texts) - 1 and reference.empty == 1
    want = output(tmp_path / "ref")
    tok = build_tokenizer(GPT2)
    ref_docs = IndexedDataset(str(tmp_path / "ref_text_document"))
    assert [ref_docs[i].tolist() for i in range(len(ref_docs))] == \
        [tok.tokenize(t) + [tok.eod] for t in texts if t]
    for name in ("c.jsonl.gz", "c.jsonl.zst", "c.parquet", "ds"):
        s = run(str(tmp_path / name), tmp_path / f"o_{name.replace('.', '_')}")
        assert (s.documents, s.tokens, s.empty) == (reference.documents, reference.tokens, 1), name
        assert output(tmp_path / f"o_{name.replace('.', '_')}") == want, name
    # Two workers over Parquet: the same bytes, whatever the worker count.
    run(str(tmp_path / "c.parquet"), tmp_path / "w2", workers=2)
    assert output(tmp_path / "w2") == want


def test_several_inputs_and_globs_keep_input_order(tmp_path):
    texts = corpus(40)
    (tmp_path / "all.jsonl").write_bytes(jsonl_bytes(texts))
    run(str(tmp_path / "all.jsonl"), tmp_path / "ref")
    want = output(tmp_path / "ref")
    parts = tmp_path / "parts"
    parts.mkdir()
    write_parquet(parts / "part-000.parquet", texts[:15])
    write_parquet(parts / "part-001.parquet", texts[15:31])
    write_parquet(parts / "part-002.parquet", texts[31:])
    run(str(parts / "part-*.parquet"), tmp_path / "glob")
    assert output(tmp_path / "glob") == want
    # Mixed kinds, in the order given: zstd JSONL, a dataset directory, Parquet.
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes(texts[:10])))
    save_dataset(tmp_path / "b_ds", texts[10:25])
    write_parquet(tmp_path / "c.parquet", texts[25:])
    from tools.preprocess_data import main
    prefix = str(tmp_path / "mixed")
    assert main(["--input", str(tmp_path / "a.jsonl.zst"), str(tmp_path / "b_ds"), str(tmp_path / "c.parquet"),
                 "--output-prefix", prefix, "--tokenizer-type", "GPT2BPETokenizer",
                 "--vocab-file", GPT2["vocab_file"], "--merge-file", GPT2["merge_file"],
                 "--append-eod", "--no-progress"]) == 0
    assert output(prefix) == want


def test_bad_inputs_say_one_line(tmp_path, capsys):
    texts = corpus(12)
    table = pa.table({"body": texts, "n": list(range(12))})
    pq.write_table(table, tmp_path / "body.parquet")
    with pytest.raises(pp.PreprocessError, match=r"no column 'text' \(columns: 'body', 'n'\); --json-keys"):
        run(str(tmp_path / "body.parquet"), tmp_path / "o")
    with pytest.raises(pp.PreprocessError, match="column 'n' holds int64, not strings"):
        run(str(tmp_path / "body.parquet"), tmp_path / "o", json_keys=["n"])
    # The column named by --json-keys is read.
    s = run(str(tmp_path / "body.parquet"), tmp_path / "o", json_keys=["body"])
    assert s.outputs == [str(tmp_path / "o_body_document")] and (s.documents, s.empty) == (11, 1)
    # A null text is a bad row, named by its row number, or skipped and listed.
    with_null = texts[:5] + [None] + texts[5:]
    pq.write_table(pa.table({"text": with_null}), tmp_path / "null.parquet")
    with pytest.raises(pp.PreprocessError, match=r"null.parquet: row 6: 'text' is null \(use --skip-bad-lines"):
        run(str(tmp_path / "null.parquet"), tmp_path / "n")
    assert not list(tmp_path.glob("n_*"))  # no partial output
    s = run(str(tmp_path / "null.parquet"), tmp_path / "n", skip_bad_lines=True)
    assert (s.bad_lines, s.documents, s.empty) == (1, 11, 1)
    assert (tmp_path / "n.skipped.txt").read_text() == f"{tmp_path / 'null.parquet'}: row 6: 'text' is null\n"
    # A DatasetDict directory: name a split.
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts}),
                          "test": datasets.Dataset.from_dict({"text": texts[:2]})}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(pp.PreprocessError, match=r"is a DatasetDict with splits train, test: pass one split's "
                                                 r"directory, e.g. .*dd/train"):
        run(str(tmp_path / "dd"), tmp_path / "d")
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(pp.PreprocessError, match="not a Hugging Face dataset saved with save_to_disk"):
        run(str(tmp_path / "plain_dir"), tmp_path / "d")
    (tmp_path / "broken.jsonl.zst").write_bytes(b"not zstd at all")
    with pytest.raises(pp.PreprocessError, match="broken.jsonl.zst: cannot read"):
        run(str(tmp_path / "broken.jsonl.zst"), tmp_path / "d")


@pytest.mark.parametrize("module,path", [("pyarrow", "x.parquet"), ("zstandard", "x.jsonl.zst")])
def test_missing_optional_package_names_the_extra(tmp_path, monkeypatch, module, path):
    (tmp_path / path).write_bytes(b"")
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    from megatron.optional_deps import MissingDependencyError
    with pytest.raises(MissingDependencyError, match=rf"needs the Python package '{module}', which is not "
                                                     r"installed \(pip install -e \.\[data\]\)"):
        run(str(tmp_path / path), tmp_path / "o")
