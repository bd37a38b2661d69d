"""tools/merge_datasets.py: concatenation in sorted order, dtype check, clear errors."""

import os
import subprocess
import sys

import numpy as np

from megatron.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "merge_datasets.py")


def build(prefix, docs, dtype=np.uint16):
    """Write a dataset of documents, each a list of sequences."""
    b = IndexedDatasetBuilder(prefix + ".bin", dtype)
    for doc in docs:
        for seq in doc:
            b.add_item(seq)
        b.end_document()
    b.finalize(prefix + ".idx")


def run(*args):
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True)


def test_merge_sorted_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    shards = tmp_path / "shards"
    shards.mkdir()
    expected_docs = []
    # Created out of order: the merge must follow sorted names, not creation order.
    contents = {}
    for name in ("s2", "s0", "s1"):
        docs = [[rng.integers(0, 60000, rng.integers(0, 9)).tolist() for _ in range(rng.integers(1, 4))]
                for _ in range(rng.integers(1, 6))]
        build(str(shards / name), docs)
        contents[name] = docs
    for name in sorted(contents):
        expected_docs.extend(contents[name])
    out = tmp_path / "merged"
    r = run("--input", str(shards), "--output-prefix", str(out))
    assert r.returncode == 0, r.stderr
    ds = IndexedDataset(str(out))
    seqs = [s for d in expected_docs for s in d]
    assert [ds[i].tolist() for i in range(len(ds))] == seqs
    bounds = np.cumsum([0] + [len(d) for d in expected_docs]).tolist()
    assert ds.document_indices.tolist() == bounds
    assert ds.dtype == np.uint16
    # Merging is the same as writing everything at once, byte for byte.
    build(str(tmp_path / "direct"), expected_docs)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"direct{ext}").read_bytes() == (tmp_path / f"merged{ext}").read_bytes()
    assert sorted(os.listdir(tmp_path)) == sorted(["shards", "merged.bin", "merged.idx", "direct.bin", "direct.idx"])

    # Different dtypes: one clear line naming both files, no output.
    build(str(shards / "s3"), [[[70000, 1]]], np.int32)
    r = run("--input", str(shards), "--output-prefix", str(tmp_path / "bad"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "s0" in r.stderr and "s3" in r.stderr and "uint16" in r.stderr and "int32" in r.stderr
    assert not any(n.startswith("bad") for n in os.listdir(tmp_path))
    os.remove(shards / "s3.idx")
    r = run("--input", str(shards), "--output-prefix", str(tmp_path / "bad"))
    assert r.returncode == 1 and "s3.bin has no matching .idx" in r.stderr
    r = run("--input", str(tmp_path / "nowhere"), "--output-prefix", str(tmp_path / "bad"))
    assert r.returncode == 1 and "nowhere" in r.stderr and "Traceback" not in r.stderr
