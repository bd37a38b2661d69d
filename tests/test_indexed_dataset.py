"""The indexed dataset against files written by Megatron-Core, both ways, and bad files."""
import filecmp
import json
import os
import shutil

import numpy as np
import pytest

from megatron.data.indexed_dataset import (IndexedDataset, IndexedDatasetBuilder, IndexedDatasetError,
                                           best_dtype, write_index)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "megatron_core_indexed")
with open(os.path.join(FIXTURES, "expected.json")) as _f:
    EXPECTED = json.load(_f)
PREFIXES = sorted(EXPECTED)


def _write(prefix, documents, dtype):
    """Write documents (lists of sequences) the way Megatron-Core's fixtures were made."""
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in documents:
        if len(doc) == 1:
            builder.add_item(np.array(doc[0]))
            builder.end_document()
        else:
            builder.add_document(np.concatenate([np.array(s) for s in doc]), [len(s) for s in doc])
    builder.finalize(prefix + ".idx")


@pytest.mark.parametrize("name", PREFIXES)
def test_reader_reads_megatron_core_files_exactly(name):
    exp = EXPECTED[name]
    ds = IndexedDataset(os.path.join(FIXTURES, name))
    assert ds.dtype == np.dtype(exp["dtype"])
    assert ds.sequence_lengths.tolist() == exp["sequence_lengths"]
    assert ds.document_indices.tolist() == exp["document_indices"]
    sequences = [s for doc in exp["documents"] for s in doc]
    assert len(ds) == len(sequences)
    for i, seq in enumerate(sequences):
        assert ds[i].dtype == ds.dtype
        assert ds[i].tolist() == seq
        assert ds.get(i, offset=1, length=2).tolist() == seq[1:3]
        assert ds.get(i, offset=2).tolist() == seq[2:]
    assert ds[-1].tolist() == sequences[-1]
    assert [a.tolist() for a in ds[2:5]] == sequences[2:5]
    # Documents through the document index.
    d = ds.document_indices
    for k, doc in enumerate(exp["documents"]):
        assert [ds[j].tolist() for j in range(d[k], d[k + 1])] == doc


@pytest.mark.parametrize("name", PREFIXES)
def test_writer_is_byte_identical_to_megatron_core(tmp_path, name):
    exp = EXPECTED[name]
    prefix = str(tmp_path / name)
    _write(prefix, exp["documents"], np.dtype(exp["dtype"]))
    for ext in (".bin", ".idx"):
        assert filecmp.cmp(prefix + ext, os.path.join(FIXTURES, name + ext), shallow=False), ext


def test_add_index_merges_like_concatenation(tmp_path):
    exp = EXPECTED["mcore_uint16"]
    docs = exp["documents"]
    a, b, whole, merged = (str(tmp_path / n) for n in ("a", "b", "whole", "merged"))
    _write(a, docs[:3], np.uint16)
    _write(b, docs[3:], np.uint16)
    _write(whole, docs, np.uint16)
    builder = IndexedDatasetBuilder(merged + ".bin", dtype=np.uint16)
    builder.add_index(a)
    builder.add_index(b)
    builder.finalize(merged + ".idx")
    for ext in (".bin", ".idx"):
        assert filecmp.cmp(merged + ext, whole + ext, shallow=False), ext
    assert filecmp.cmp(merged + ".idx", os.path.join(FIXTURES, "mcore_uint16.idx"), shallow=False)
    # Items added around a merged index keep their offsets.
    mixed = str(tmp_path / "mixed")
    builder = IndexedDatasetBuilder(mixed + ".bin", dtype=np.uint16)
    builder.add_item([7, 8, 9])
    builder.end_document()
    builder.add_index(b)
    builder.add_item([1])
    builder.end_document()
    builder.finalize(mixed + ".idx")
    ds, ref = IndexedDataset(mixed), IndexedDataset(b)
    assert ds[0].tolist() == [7, 8, 9] and ds[-1].tolist() == [1]
    assert [ds[i + 1].tolist() for i in range(len(ref))] == [ref[i].tolist() for i in range(len(ref))]
    assert ds.document_indices.tolist() == [0, 1] + [x + 1 for x in ref.document_indices[1:].tolist()] + [len(ref) + 2]


def test_merge_of_different_dtypes_is_refused(tmp_path):
    builder = IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=np.uint16)
    with pytest.raises(ValueError, match="dtypes differ"):
        builder.add_index(os.path.join(FIXTURES, "mcore_int32"))
    builder.finalize(str(tmp_path / "m.idx"))


def test_best_dtype_and_overflow():
    assert best_dtype(50257) == np.uint16
    assert best_dtype(65499) == np.uint16
    assert best_dtype(65500) == np.int32
    assert best_dtype(128000) == np.int32


def test_token_overflow_is_refused(tmp_path):
    builder = IndexedDatasetBuilder(str(tmp_path / "o.bin"), dtype=np.uint16)
    with pytest.raises(ValueError, match="do not fit"):
        builder.add_item(np.array([1, 70000]))
    builder.finalize(str(tmp_path / "o.idx"))


def test_empty_dataset_round_trip(tmp_path):
    prefix = str(tmp_path / "empty")
    IndexedDatasetBuilder(prefix + ".bin").finalize(prefix + ".idx")
    ds = IndexedDataset(prefix)
    assert len(ds) == 0 and ds.document_indices.tolist() == [0]


def _corrupt_copy(tmp_path, name, mutate_idx=None, bin_bytes=None):
    src = os.path.join(FIXTURES, name)
    dst = str(tmp_path / name)
    shutil.copyfile(src + ".bin", dst + ".bin")
    data = bytearray(open(src + ".idx", "rb").read())
    if mutate_idx is not None:
        data = mutate_idx(data)
    with open(dst + ".idx", "wb") as f:
        f.write(bytes(data))
    if bin_bytes is not None:
        with open(dst + ".bin", "r+b") as f:
            f.truncate(bin_bytes)
    return dst


def _set(pos, value):
    def mutate(data):
        data[pos] = value
        return data
    return mutate


@pytest.mark.parametrize("case,mutate,bin_bytes,message", [
    ("magic", _set(0, ord("X")), None, "bad magic"),
    ("version", _set(9, 2), None, "unsupported index version 2"),
    ("dtype", _set(17, 42), None, "unknown dtype code 42"),
    ("truncated idx", lambda d: d[:-5], None, "does not match its header"),
    ("tiny idx", lambda d: d[:20], None, "truncated index file"),
    ("extra idx", lambda d: d + b"\0" * 8, None, "does not match its header"),
    ("sequence count", _set(18, 10), None, "does not match its header"),
    ("truncated bin", None, 400, "describes 414 bytes"),
    ("document index", lambda d: d[:-8] + (3).to_bytes(8, "little"), None, "document index"),
])
def test_corrupt_files_raise_clear_errors(tmp_path, case, mutate, bin_bytes, message):
    prefix = _corrupt_copy(tmp_path, "mcore_uint16", mutate, bin_bytes)
    with pytest.raises(IndexedDatasetError, match=message) as info:
        IndexedDataset(prefix)
    assert prefix in str(info.value)  # the message names the file


def test_missing_files_are_named(tmp_path):
    with pytest.raises(IndexedDatasetError, match="missing .*nothing.bin"):
        IndexedDataset(str(tmp_path / "nothing"))


def test_write_index_matches_builder_and_pickles(tmp_path):
    import pickle
    exp = EXPECTED["mcore_int32"]
    prefix = str(tmp_path / "direct")
    shutil.copyfile(os.path.join(FIXTURES, "mcore_int32.bin"), prefix + ".bin")
    write_index(prefix + ".idx", np.int32, exp["sequence_lengths"], exp["document_indices"])
    assert filecmp.cmp(prefix + ".idx", os.path.join(FIXTURES, "mcore_int32.idx"), shallow=False)
    ds = pickle.loads(pickle.dumps(IndexedDataset(prefix)))
    assert ds[3].tolist() == exp["documents"][3][0]
