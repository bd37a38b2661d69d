"""GPT pretraining samples from indexed datasets: splits, cached indices, blends.

A sample is ``seq_length + 1`` consecutive tokens of a stream made of the split's
documents, repeated over as many epochs as the requested samples need and shuffled.
Three index arrays describe the stream (built once, cached as ``.npy``):

- document index: the split's document ids for every epoch, shuffled;
- sample index: per sample, (position in the document index, offset) of its start;
- shuffle index: the order in which samples are served.
"""
import math
import os

import numpy as np

from megatron.data import index_builders
from megatron.data.blended_dataset import BlendedDataset
from megatron.data.indexed_dataset import IndexedDataset, IndexedDatasetError, exists
from megatron.errors import UserError

SPLIT_NAMES = ("train", "valid", "test")
_INDEX_VERSION = 1  # bump when the construction of the arrays changes
# Megatron's margin: each blended dataset is built a little larger than its share.
BLEND_MARGIN = 1.005


class DataConfigError(UserError, ValueError):
    """A data setting (path, split, weights) that cannot be used."""


def parse_split(split):
    """``"969,30,1"`` (or ``"969/30/1"``, or a list) -> three fractions that sum to 1."""
    if isinstance(split, str):
        parts = [p for p in split.replace("/", ",").split(",") if p.strip()]
    else:
        parts = list(split)
    try:
        values = [float(p) for p in parts]
    except (TypeError, ValueError):
        raise DataConfigError(f"split {split!r}: expected up to three numbers like '969,30,1'") from None
    if not 1 <= len(values) <= 3 or any(v < 0 or not math.isfinite(v) for v in values) or sum(values) <= 0:
        raise DataConfigError(f"split {split!r}: expected one to three non-negative numbers with a positive sum")
    values += [0.0] * (3 - len(values))
    total = sum(values)
    return [v / total for v in values]


def split_document_ranges(fractions, num_documents):
    """Contiguous document ranges ``[round(b * N), round(e * N))`` of each split."""
    bounds = [0]
    cumulative = 0.0
    for f in fractions:
        cumulative += f
        bounds.append(int(round(cumulative * num_documents)))
    bounds[-1] = num_documents
    return [(bounds[k], bounds[k + 1]) for k in range(len(fractions))]


def _file_signature(path):
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


class GPTDataset:
    """Samples of ``seq_length`` tokens (plus the shifted labels) over one split of one dataset.

    ``indexed``: an IndexedDataset; ``documents``: the split's ``(begin, end)`` document
    range; ``num_samples``: samples wanted (None: one epoch); ``seed`` shapes the
    shuffles. ``ds[i]`` is a dict of numpy arrays of length ``seq_length``: ``tokens``,
    ``labels`` (int64), ``loss_mask`` (float32) and ``position_ids`` (int64).
    """

    def __init__(self, indexed, documents, seq_length, num_samples, seed, *, name="train",
                 cache_dir=None, eod=None, reset_position_ids=False, eod_mask_loss=False):
        self.indexed = indexed
        self.name = name
        self.doc_begin, self.doc_end = int(documents[0]), int(documents[1])
        self.seq_length = int(seq_length)
        self.seed = int(seed)
        self.eod = eod
        self.reset_position_ids = bool(reset_position_ids)
        self.eod_mask_loss = bool(eod_mask_loss)
        if self.seq_length < 1:
            raise DataConfigError(f"seq_length must be positive, got {seq_length}")
        if (reset_position_ids or eod_mask_loss) and eod is None:
            raise DataConfigError("reset_position_ids / eod_mask_loss need the tokenizer's eod id")
        num_docs = self.doc_end - self.doc_begin
        if num_docs <= 0:
            raise DataConfigError(f"{name} split of {indexed.prefix} holds no documents "
                                  f"(range {self.doc_begin}..{self.doc_end})")
        # When there are as many documents as sequences (one JSON line, one sequence: the
        # common case), documents are read straight from the sequence arrays without paging
        # in the document index. (A pathological index with an empty document and a
        # two-sequence one would then be sampled per sequence: same tokens, other grouping.)
        self._one_sequence_per_document = indexed.num_documents() == len(indexed)
        prefix = os.path.realpath(indexed.prefix)
        self.description = {
            "class": "GPTDataset", "version": _INDEX_VERSION, "prefix": prefix,
            "idx": _file_signature(prefix + ".idx"), "documents": [self.doc_begin, self.doc_end],
            "seq_length": self.seq_length, "num_samples": num_samples, "seed": self.seed,
        }
        self.hash = index_builders.description_hash(self.description)
        if cache_dir is None:
            cache_dir = os.path.join(os.path.dirname(prefix), "index-cache")
        self.cache_dir = cache_dir
        names = {key: f"{self.hash}-{name}-{key}.npy" for key in ("document_index", "sample_index", "shuffle_index")}
        arrays, self.built = index_builders.cached_arrays(
            cache_dir, names, lambda: self._build_indices(num_samples))
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]

    def _document_lengths(self):
        """Tokens in each document of the split (int32)."""
        ds = self.indexed
        if self._one_sequence_per_document:
            return np.asarray(ds.sequence_lengths[self.doc_begin:self.doc_end])
        first = ds.document_indices[self.doc_begin:self.doc_end + 1]
        cumulative = np.zeros(len(ds) + 1, dtype=np.int64)
        np.cumsum(ds.sequence_lengths, out=cumulative[1:])
        return (cumulative[first[1:]] - cumulative[first[:-1]]).astype(np.int64)

    def _build_indices(self, num_samples):
        lengths = self._document_lengths()
        tokens_per_epoch = int(lengths.sum(dtype=np.int64))
        if tokens_per_epoch < 2:
            raise DataConfigError(f"{self.name} split of {self.indexed.prefix} holds {tokens_per_epoch} "
                                  f"tokens: too few for any sample")
        samples_per_epoch = (tokens_per_epoch - 1) // self.seq_length
        if num_samples is None:
            num_epochs = 1
        else:
            num_epochs = index_builders.num_epochs_needed(tokens_per_epoch, self.seq_length, num_samples)
        separate_last_epoch = False
        samples_before_last = 0
        if num_epochs > 1:
            samples_before_last = ((num_epochs - 1) * tokens_per_epoch - 1) // self.seq_length
            last_epoch_samples = num_samples - samples_before_last
            separate_last_epoch = last_epoch_samples < int(
                index_builders.SEPARATE_LAST_EPOCH_THRESHOLD * samples_per_epoch)
        rng = np.random.Generator(np.random.PCG64(self.seed))
        doc_idx = index_builders.build_document_index(len(lengths), num_epochs, rng, separate_last_epoch)
        total_samples = (num_epochs * tokens_per_epoch - 1) // self.seq_length
        if total_samples < 1:
            raise DataConfigError(f"{self.name} split of {self.indexed.prefix}: {tokens_per_epoch} tokens "
                                  f"cannot fill one sample of {self.seq_length} + 1 tokens")
        sample_idx = index_builders.build_sample_index(lengths, doc_idx, self.seq_length, total_samples)
        del lengths
        first_shuffled = samples_before_last if separate_last_epoch else total_samples
        shuffle_idx = index_builders.build_shuffle_index(first_shuffled, total_samples, rng)
        return {"document_index": doc_idx, "sample_index": sample_idx, "shuffle_index": shuffle_idx}

    def __len__(self):
        return len(self.shuffle_index)

    def _document(self, position, offset, length=None):
        doc = self.doc_begin + int(self.document_index[position])
        if self._one_sequence_per_document:
            return self.indexed.get(doc, offset, length)
        return self.indexed.get_document(doc, offset, length)

    def sample_tokens(self, idx):
        """The ``seq_length + 1`` tokens of sample ``idx`` (after shuffling), as int64."""
        i = int(self.shuffle_index[idx])
        pos_first, off_first = (int(v) for v in self.sample_index[i])
        pos_last, off_last = (int(v) for v in self.sample_index[i + 1])
        if pos_first == pos_last:
            return self._document(pos_first, off_first, off_last - off_first + 1).astype(np.int64)
        pieces = [self._document(pos_first, off_first)]
        pieces += [self._document(p, 0) for p in range(pos_first + 1, pos_last)]
        pieces.append(self._document(pos_last, 0, off_last + 1))
        return np.concatenate(pieces).astype(np.int64)

    def __getitem__(self, idx):
        n = len(self)
        if not -n <= idx < n:
            raise IndexError(f"sample {idx} out of range for {n} samples")
        text = self.sample_tokens(idx % n)
        tokens, labels = text[:-1], text[1:]
        return {"tokens": tokens, "labels": labels,
                "loss_mask": loss_mask(tokens, self.eod, self.eod_mask_loss),
                "position_ids": position_ids(tokens, self.eod, self.reset_position_ids)}


def loss_mask(tokens, eod, eod_mask_loss):
    """Ones, with zeros where the input token is EOD (Megatron's rule) when ``eod_mask_loss``."""
    mask = np.ones(len(tokens), dtype=np.float32)
    if eod_mask_loss:
        mask[tokens == eod] = 0.0
    return mask


def position_ids(tokens, eod, reset_position_ids):
    """0..s-1, restarting at 0 after every EOD token when ``reset_position_ids``."""
    positions = np.arange(len(tokens), dtype=np.int64)
    if reset_position_ids:
        # Each position's segment starts just past the last EOD before it.
        segment_start = np.zeros(len(tokens), dtype=np.int64)
        after_eod = np.nonzero(tokens[:-1] == eod)[0] + 1
        segment_start[after_eod] = after_eod
        np.maximum.accumulate(segment_start, out=segment_start)
        positions -= segment_start
    return positions


def parse_data_path(data_path):
    """``[prefix]`` or ``[w1, p1, w2, p2, ...]`` -> (prefixes, normalized weights or None)."""
    if isinstance(data_path, str):
        data_path = data_path.split()
    items = list(data_path or [])
    if not items:
        raise DataConfigError("data_path is empty: give [prefix] or [weight1, prefix1, weight2, prefix2, ...]")
    if len(items) == 1:
        return [str(items[0])], None
    if len(items) % 2:
        raise DataConfigError(f"data_path {items!r}: a blend needs weight, prefix pairs")
    try:
        weights = [float(w) for w in items[0::2]]
    except (TypeError, ValueError):
        raise DataConfigError(f"data_path {items!r}: the even entries must be weights") from None
    prefixes = [str(p) for p in items[1::2]]
    if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise DataConfigError(f"data_path weights {weights}: must be non-negative with a positive sum")
    total = sum(weights)
    return prefixes, [w / total for w in weights]


def _open_indexed(prefix):
    if not exists(prefix):
        missing = [p for p in (prefix + ".bin", prefix + ".idx") if not os.path.isfile(p)]
        raise DataConfigError(f"data prefix {prefix!r}: missing {', '.join(missing)}")
    try:
        return IndexedDataset(prefix)
    except IndexedDatasetError as e:
        raise DataConfigError(str(e)) from None


def _build_split_datasets(prefix, indexed, fractions, split_text, seq_length, seed, num_samples, data_cfg, eod):
    ranges = split_document_ranges(fractions, indexed.num_documents())
    out = []
    for k, name in enumerate(SPLIT_NAMES):
        want = num_samples[k]
        begin, end = ranges[k]
        if fractions[k] == 0 or want == 0:
            out.append(None)
            continue
        if end <= begin:
            raise DataConfigError(f"{name} split of {prefix!r} holds no documents: split {split_text!r} "
                                  f"of {indexed.num_documents()} documents gives range {begin}..{end}")
        out.append(GPTDataset(indexed, (begin, end), seq_length, want, seed, name=name,
                              cache_dir=getattr(data_cfg, "data_cache_path", None), eod=eod,
                              reset_position_ids=getattr(data_cfg, "reset_position_ids", False),
                              eod_mask_loss=getattr(data_cfg, "eod_mask_loss", False)))
    return out


def build_train_valid_test_datasets(data_cfg, seq_length, seed, train_valid_test_num_samples, eod):
    """Train, valid and test datasets (None for an empty split) from the data config section.

    ``train_valid_test_num_samples``: samples wanted per split (None: one epoch; 0: none).
    With a blended ``data_path`` every prefix is split the same way and each split is a
    BlendedDataset of the prefixes' splits, each built with a small margin over its share.
    """
    prefixes, weights = parse_data_path(getattr(data_cfg, "data_path", None))
    split_text = getattr(data_cfg, "split", "969,30,1")
    fractions = parse_split(split_text)
    num_samples = list(train_valid_test_num_samples)
    if len(num_samples) != 3:
        raise DataConfigError(f"train_valid_test_num_samples must have three entries, got {num_samples}")
    if weights is None:
        indexed = _open_indexed(prefixes[0])
        return tuple(_build_split_datasets(prefixes[0], indexed, fractions, split_text, seq_length, seed,
                                           num_samples, data_cfg, eod))
    per_prefix = []
    for prefix, w in zip(prefixes, weights):
        wanted = [None if n is None else (0 if n == 0 or w == 0 else int(math.ceil(n * w * BLEND_MARGIN)))
                  for n in num_samples]
        if w == 0:
            per_prefix.append([None, None, None])
            continue
        per_prefix.append(_build_split_datasets(prefix, _open_indexed(prefix), fractions, split_text,
                                                seq_length, seed, wanted, data_cfg, eod))
    result = []
    for k in range(3):
        parts = [(ds[k], w) for ds, w in zip(per_prefix, weights) if ds[k] is not None]
        if not parts:
            result.append(None)
            continue
        datasets, part_weights = [p[0] for p in parts], [p[1] for p in parts]
        total = sum(part_weights)
        part_weights = [w / total for w in part_weights]
        size = num_samples[k]
        if size is None:
            # One epoch of the blend: as many samples as no dataset runs out.
            size = min(int(len(d) / w) for d, w in zip(datasets, part_weights))
        result.append(BlendedDataset(datasets, part_weights, size,
                                     cache_dir=getattr(data_cfg, "data_cache_path", None)))
    return tuple(result)
