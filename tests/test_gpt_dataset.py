"""GPTDataset: coverage of the split, contiguity, determinism, cache reuse, splits, errors."""
import os
from types import SimpleNamespace

import numpy as np
import pytest

from megatron.data import index_builders
from megatron.data.gpt_dataset import (DataConfigError, GPTDataset, build_train_valid_test_datasets,
                                       parse_split, position_ids, split_document_ranges)
from megatron.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from tests.helpers.data import make_dataset

EOD = 0


def document_tokens(indexed, begin, end):
    return [indexed.get_document(d).astype(np.int64) for d in range(begin, end)]


def stream_of(ds):
    """The token stream the dataset's document index describes."""
    return np.concatenate([ds.indexed.get_document(ds.doc_begin + int(d)).astype(np.int64)
                           for d in ds.document_index])


@pytest.mark.parametrize("multi_sequence", [False, True])
def test_one_epoch_covers_every_token_once_and_samples_are_contiguous(tmp_path, multi_sequence):
    indexed = make_dataset(str(tmp_path / "d"), multi_sequence=multi_sequence)
    begin, end = 10, 110
    seq = 16
    ds = GPTDataset(indexed, (begin, end), seq, None, seed=5, cache_dir=str(tmp_path / "cache"))
    docs = document_tokens(indexed, begin, end)
    total = sum(len(d) for d in docs)
    assert len(ds) == (total - 1) // seq
    # The document index of one epoch is a permutation of the split's documents.
    assert sorted(ds.document_index.tolist()) == list(range(end - begin))
    stream = stream_of(ds)
    seen = np.zeros(total + 2 + int(stream.max()), dtype=np.int64)
    starts = set()
    for i in range(len(ds)):
        s = ds[i]
        text = np.concatenate([s["tokens"], s["labels"][-1:]])
        assert s["tokens"].dtype == np.int64 and s["labels"].dtype == np.int64
        assert s["loss_mask"].dtype == np.float32 and s["position_ids"].dtype == np.int64
        assert len(s["tokens"]) == seq and np.array_equal(s["labels"][:-1], s["tokens"][1:])
        # A contiguous slice of the shuffled stream, starting at a multiple of seq_length.
        start = int(np.nonzero(stream == text[0])[0][0])
        assert start % seq == 0
        assert np.array_equal(stream[start:start + seq + 1], text)
        starts.add(start)
        np.add.at(seen, s["tokens"], 1)
    assert len(starts) == len(ds)  # every sample distinct; together they tile the stream
    covered = stream[:len(ds) * seq]
    assert np.all(seen[covered] == 1)
    assert seen.sum() == len(ds) * seq
    # Only the final partial sample's tokens are left out of the epoch.
    assert total - len(ds) * seq <= seq


def test_several_epochs_repeat_every_document(tmp_path):
    indexed = make_dataset(str(tmp_path / "d"), num_docs=30)
    seq = 8
    docs = document_tokens(indexed, 0, 30)
    total = sum(len(d) for d in docs)
    per_epoch = (total - 1) // seq
    for want, separate in ((int(per_epoch * 2.9), False), (int(per_epoch * 2.2), True)):
        ds = GPTDataset(indexed, (0, 30), seq, want, seed=3, cache_dir=str(tmp_path / f"c{want}"))
        epochs = 3
        assert len(ds) >= want
        assert np.array_equal(np.bincount(np.asarray(ds.document_index), minlength=30), np.full(30, epochs))
        if separate:  # the partial last epoch comes whole after the full epochs
            assert sorted(ds.document_index[60:].tolist()) == list(range(30))
            head = ((epochs - 1) * total - 1) // seq
            assert sorted(ds.shuffle_index[:head].tolist()) == list(range(head))
        assert sorted(ds.shuffle_index.tolist()) == list(range(len(ds)))
        stream = stream_of(ds)
        for i in range(0, len(ds), 7):
            j = int(ds.shuffle_index[i])
            assert np.array_equal(ds.sample_tokens(i), stream[j * seq:j * seq + seq + 1])


def test_two_builds_identical_and_cache_reused(tmp_path, monkeypatch):
    indexed = make_dataset(str(tmp_path / "d"))
    cache = str(tmp_path / "cache")
    a = GPTDataset(indexed, (0, 100), 16, 300, seed=9, cache_dir=cache)
    assert a.built
    files = sorted(os.listdir(cache))
    assert len(files) == 3 and all(f.endswith(".npy") for f in files)
    # A fresh build in another directory gives the same arrays.
    b = GPTDataset(indexed, (0, 100), 16, 300, seed=9, cache_dir=str(tmp_path / "other"))
    for key in ("document_index", "sample_index", "shuffle_index"):
        assert np.array_equal(getattr(a, key), getattr(b, key))
    # Reusing the cache must not run any builder.
    def refuse(*args, **kwargs):
        raise AssertionError("index rebuilt although cached")
    for fn in ("build_document_index", "build_sample_index", "build_shuffle_index"):
        monkeypatch.setattr(index_builders, fn, refuse)
    c = GPTDataset(indexed, (0, 100), 16, 300, seed=9, cache_dir=cache)
    assert not c.built and sorted(os.listdir(cache)) == files
    assert all(np.array_equal(a[i]["tokens"], c[i]["tokens"]) for i in range(len(a)))
    monkeypatch.undo()
    # Another seed or length is another cache entry.
    d = GPTDataset(indexed, (0, 100), 16, 300, seed=10, cache_dir=cache)
    assert d.built and len(os.listdir(cache)) == 6
    assert not np.array_equal(d.shuffle_index, a.shuffle_index)


def test_split_parsing_and_ranges():
    assert parse_split("969,30,1") == pytest.approx([0.969, 0.030, 0.001])
    assert parse_split("8/1/1") == pytest.approx([0.8, 0.1, 0.1])
    assert parse_split("1") == [1.0, 0.0, 0.0]
    for bad in ("a,b", "-1,2,3", "0,0,0", "1,1,1,1"):
        with pytest.raises(DataConfigError, match="split"):
            parse_split(bad)
    ranges = split_document_ranges(parse_split("969,30,1"), 1000)
    assert ranges == [(0, 969), (969, 999), (999, 1000)]
    ranges = split_document_ranges(parse_split("2,1,1"), 7)
    assert ranges[0][0] == 0 and ranges[-1][1] == 7
    assert all(ranges[k][1] == ranges[k + 1][0] for k in range(2))


def test_build_train_valid_test_uses_contiguous_split_ranges(tmp_path):
    prefix = str(tmp_path / "d")
    indexed = make_dataset(prefix, num_docs=100)
    cfg = SimpleNamespace(data_path=[prefix], split="80,15,5", data_cache_path=str(tmp_path / "c"),
                          reset_position_ids=False, eod_mask_loss=False)
    train, valid, test = build_train_valid_test_datasets(cfg, 8, 1234, [50, 20, None], EOD)
    assert (train.doc_begin, train.doc_end) == (0, 80)
    assert (valid.doc_begin, valid.doc_end) == (80, 95)
    assert (test.doc_begin, test.doc_end) == (95, 100)
    for ds in (train, valid, test):
        allowed = set(np.concatenate(document_tokens(indexed, ds.doc_begin, ds.doc_end)).tolist())
        for i in range(len(ds)):
            assert set(ds.sample_tokens(i).tolist()) <= allowed
    assert len(train) >= 50 and len(valid) >= 20
    # Zero samples or a zero-weight split give None.
    cfg.split = "1,1,0"
    train, valid, test = build_train_valid_test_datasets(cfg, 8, 1234, [50, 0, 5], EOD)
    assert train is not None and valid is None and test is None


def test_clear_errors(tmp_path):
    prefix = str(tmp_path / "d")
    make_dataset(prefix, num_docs=10)
    cfg = SimpleNamespace(data_path=[str(tmp_path / "absent")], split="1", data_cache_path=None)
    with pytest.raises(DataConfigError, match="absent.*missing"):
        build_train_valid_test_datasets(cfg, 8, 1, [10, 0, 0], EOD)
    cfg = SimpleNamespace(data_path=[prefix], split="969,30,1", data_cache_path=str(tmp_path / "c"))
    with pytest.raises(DataConfigError, match="valid split .* holds no documents.*969,30,1.* 10 documents"):
        build_train_valid_test_datasets(cfg, 8, 1, [10, 10, 10], EOD)
    cfg.data_path = [0.5, prefix, prefix]
    with pytest.raises(DataConfigError, match="weight, prefix pairs"):
        build_train_valid_test_datasets(cfg, 8, 1, [10, 0, 0], EOD)


def test_eod_masking_and_position_reset(tmp_path):
    prefix = str(tmp_path / "e")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    rng = np.random.default_rng(1)
    for _ in range(40):
        n = int(rng.integers(2, 12))
        builder.add_item(np.append(rng.integers(1, 1000, n - 1), EOD))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    cfg = SimpleNamespace(data_path=[prefix], split="1", data_cache_path=str(tmp_path / "c"),
                          reset_position_ids=True, eod_mask_loss=True)
    train, _, _ = build_train_valid_test_datasets(cfg, 32, 7, [None, 0, 0], EOD)
    found_eod = False
    for i in range(len(train)):
        s = train[i]
        eod_at = np.nonzero(s["tokens"] == EOD)[0]
        found_eod |= len(eod_at) > 0
        assert np.all(s["loss_mask"][eod_at] == 0) and s["loss_mask"].sum() == len(s["tokens"]) - len(eod_at)
        # Positions count up from 0 and restart right after each EOD.
        expect, p = [], 0
        for t in s["tokens"]:
            expect.append(p)
            p = 0 if t == EOD else p + 1
        assert s["position_ids"].tolist() == expect
    assert found_eod
    assert position_ids(np.array([5, 6, 7]), EOD, True).tolist() == [0, 1, 2]


def _build_on_every_rank(prefix, cache):
    import torch.distributed as dist
    ds = GPTDataset(IndexedDataset(prefix), (0, 100), 16, 200, seed=4, cache_dir=cache)
    return {"rank": dist.get_rank(), "built": ds.built,
            "samples": [ds[i]["tokens"].tolist() for i in range(0, len(ds), 11)]}


def test_rank0_builds_others_load(tmp_path):
    from tests.dist_harness import run_distributed
    prefix = str(tmp_path / "d")
    make_dataset(prefix)
    results = run_distributed(_build_on_every_rank, 2, prefix, str(tmp_path / "cache"))
    assert [r["built"] for r in results] == [True, False]
    assert results[0]["samples"] == results[1]["samples"]
    assert len(os.listdir(str(tmp_path / "cache"))) == 3


def test_bucketed_shuffle_is_a_uniform_deterministic_permutation():
    from itertools import permutations
    rng = np.random.Generator(np.random.PCG64(0))
    trials = 4800
    counts = {p: 0 for p in permutations(range(4))}
    for _ in range(trials):
        a = np.arange(4, dtype=np.int32)
        index_builders.shuffle_in_place(a, rng, bucket_threshold=0)
        counts[tuple(a.tolist())] += 1
    expected = trials / 24  # 200, standard deviation about 14
    assert all(abs(c - expected) < 75 for c in counts.values()), counts
    big = [np.arange(100_000, dtype=np.int32) for _ in range(2)]
    for a in big:
        index_builders.shuffle_in_place(a, np.random.Generator(np.random.PCG64(7)), bucket_threshold=0)
    assert np.array_equal(big[0], big[1]) and sorted(big[0].tolist()) == list(range(100_000))
    assert not np.array_equal(big[0], np.arange(100_000))


def test_sample_index_matches_a_binary_search_with_empty_documents():
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(300):
        n = int(rng.integers(1, 40))
        lengths = rng.integers(0, 30, n).astype(np.int32)  # zeros: empty documents
        order = rng.permutation(n).astype(np.int32)
        seq = int(rng.integers(1, 20))
        samples = (int(lengths.sum()) - 1) // seq
        if samples < 1:
            continue
        got = index_builders.build_sample_index(lengths, order, seq, samples)
        cumulative = np.concatenate([[0], np.cumsum(lengths[order])])
        starts = np.arange(samples + 1) * seq
        position = np.searchsorted(cumulative, starts, side="right") - 1
        assert np.array_equal(got[:, 0], position)
        assert np.array_equal(got[:, 1], starts - cumulative[position])
        assert np.all(lengths[order[got[:, 0]]] > got[:, 1])  # never an empty document
        checked += 1
    assert checked > 100
