"""Vectorized numpy construction of the GPT and blending index arrays, and their cache.

No C++ extension: every array is built with whole-array numpy operations, except
the blending greedy, which is sequential by nature and runs as a tight loop.
"""
import contextlib
import hashlib
import json
import math
import os
import sys
import tempfile

import numpy as np

# Megatron's rule: when the last epoch is needed for less than this fraction of its
# samples, its documents and samples are shuffled apart from the full epochs, so that
# the partial epoch does not over-represent some documents within the mixed stream.
SEPARATE_LAST_EPOCH_THRESHOLD = 0.80


def num_epochs_needed(tokens_per_epoch, seq_length, num_samples):
    """Fewest epochs whose tokens give ``num_samples`` samples of ``seq_length + 1`` tokens."""
    if tokens_per_epoch <= 0:
        raise ValueError("cannot build samples from a split with no tokens")
    # Samples overlap by one token, so E epochs yield (E * tokens - 1) // seq_length samples.
    return max(1, math.ceil((num_samples * seq_length + 1) / tokens_per_epoch))


def shuffle_in_place(array, rng, bucket_threshold=1 << 20):
    """Uniformly shuffle the 1-D ``array`` with the generator ``rng``.

    Large int32 arrays are shuffled in two cache-friendly passes (Sanders' algorithm):
    each element goes to a random bucket, then each bucket, small enough for the CPU
    cache, is shuffled on its own; the result is a uniform permutation. Grouping by
    bucket is one sort of 64-bit words ``bucket << 32 | value`` (numpy's SIMD sort),
    several times faster than one Fisher-Yates pass over an array far larger than the
    cache, whose every swap misses it.
    """
    n = len(array)
    if n < max(bucket_threshold, 2) or array.dtype != np.int32:
        rng.shuffle(array)
        return
    num_buckets = int(min(max(2, n // 32768), 1 << 30))
    keyed = rng.integers(0, num_buckets, n, dtype=np.int64)
    keyed <<= 32
    keyed |= array.view(np.uint32)  # the value's 32 bits, whatever its sign
    keyed.sort()
    bounds = np.searchsorted(keyed, np.arange(num_buckets + 1, dtype=np.int64) << 32).tolist()
    array[:] = keyed.astype(np.uint32).view(np.int32)  # the low 32 bits: the values, grouped
    del keyed
    for start, end in zip(bounds[:-1], bounds[1:]):
        rng.shuffle(array[start:end])


def build_document_index(num_documents, num_epochs, rng, separate_last_epoch):
    """Document ids ``0..num_documents-1`` repeated ``num_epochs`` times, shuffled.

    With ``separate_last_epoch`` the full epochs are shuffled together and the last
    one on its own, after them.
    """
    dtype = np.int32 if num_documents < 2 ** 31 else np.int64
    doc_idx = np.empty(num_documents * num_epochs, dtype=dtype)
    one = np.arange(num_documents, dtype=dtype)
    for e in range(num_epochs):
        doc_idx[e * num_documents:(e + 1) * num_documents] = one
    del one
    if separate_last_epoch and num_epochs > 1:
        head = (num_epochs - 1) * num_documents
        shuffle_in_place(doc_idx[:head], rng)
        shuffle_in_place(doc_idx[head:], rng)
    else:
        shuffle_in_place(doc_idx, rng)
    return doc_idx


def build_sample_index(document_lengths, document_index, seq_length, num_samples):
    """Start of every sample in the document index: ``[num_samples + 1, 2]`` (position, offset).

    Sample i spans the ``seq_length + 1`` tokens of the shuffled document stream that
    start at token ``i * seq_length``: row i is the position in ``document_index`` of
    the document holding that token and the token's offset inside it. Row i + 1 marks
    the sample's last token (consecutive samples share one token, as in Megatron).
    """
    cumulative = np.empty(len(document_index) + 1, dtype=np.int64)
    cumulative[0] = 0
    # Copy, then accumulate in place: cumsum with a casting output is several times slower.
    cumulative[1:] = document_lengths[document_index]
    np.cumsum(cumulative[1:], out=cumulative[1:])
    if (int(cumulative[-1]) - 1) // seq_length < num_samples:
        raise ValueError(f"{int(cumulative[-1])} tokens give fewer than {num_samples} samples "
                         f"of {seq_length} + 1 tokens")
    # Sample i starts at stream token i * seq_length; its document is the last k with
    # C[k] <= i * seq_length, i.e. with ceil(C[k] / seq_length) <= i. Counting documents
    # by that first sample index (a bincount) and accumulating gives every sample's
    # document in two sequential passes, with no binary search per sample; empty
    # documents are skipped as they should be.
    first_sample = cumulative[1:] + (seq_length - 1)
    first_sample //= seq_length
    position = np.bincount(first_sample, minlength=num_samples + 1)[:num_samples + 1]
    del first_sample
    np.cumsum(position, out=position)
    starts = np.arange(num_samples + 1, dtype=np.int64)
    starts *= seq_length
    starts -= cumulative[position]  # now the offset inside the document
    del cumulative
    pos_dtype = np.int32 if len(document_index) < 2 ** 31 else np.int64
    off_dtype = np.int32 if len(starts) == 0 or int(starts.max()) < 2 ** 31 else np.int64
    dtype = np.promote_types(pos_dtype, off_dtype)
    sample_idx = np.empty((num_samples + 1, 2), dtype=dtype)
    sample_idx[:, 0] = position
    sample_idx[:, 1] = starts
    return sample_idx


def build_shuffle_index(num_samples, total_size, rng):
    """A permutation of ``range(total_size)``: the first ``num_samples`` shuffled, the rest apart."""
    dtype = np.int32 if total_size < 2 ** 31 else np.int64
    first = np.arange(num_samples, dtype=dtype)
    shuffle_in_place(first, rng)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    shuffle_in_place(last, rng)
    return np.concatenate([first, last])


def build_blending_indices(weights, size):
    """Which dataset serves each of ``size`` blended samples, within one sample of the weights.

    After any n samples, dataset d has given ``c_d(n)`` with ``|c_d(n) - w_d n| < 1``.
    Two datasets: ``c_0(n) = round(w_0 n)`` (within half a sample), fully vectorized.
    More: item k of dataset d may only be served at steps ``(k-1)/w_d < n <= ceil(k/w_d)``
    (exactly the steps that keep it within one sample); a schedule meeting every such
    window exists (Tijdeman's chairman-assignment bound) and earliest-deadline-first
    finds one. (Megatron's greedy, "largest w_d*i - c_d first", strays up to ~2 samples
    from the weights for skewed blends of three or more datasets.)

    Returns ``(dataset_index int16[size], dataset_sample_index int64[size])``.
    """
    weights = np.asarray(weights, dtype=np.float64)
    weights = weights / weights.sum()
    k = len(weights)
    active = np.nonzero(weights > 0)[0]
    if len(active) == 1:
        dataset_index = np.full(size, active[0], dtype=np.int16)
    elif len(active) == 2:
        a, b = (int(x) for x in active)
        n = np.arange(size + 1, dtype=np.float64)
        served_a = np.floor(weights[a] * n + 0.5)  # samples of a after n steps
        step_a = np.diff(served_a) > 0
        dataset_index = np.where(step_a, a, b).astype(np.int16)
    else:
        dataset_index = _earliest_deadline_first([float(weights[d]) for d in active], size)
        dataset_index = active.astype(np.int16)[dataset_index]
    # The position of each sample within its dataset: a running count per dataset.
    dataset_sample_index = np.empty(size, dtype=np.int64)
    for d in range(k):
        mask = dataset_index == d
        dataset_sample_index[mask] = np.arange(int(mask.sum()), dtype=np.int64)
    return dataset_index, dataset_sample_index


def _earliest_deadline_first(weights, size):
    """Serve steps 1..size; item k of d is released at floor((k-1)/w)+1, due at ceil(k/w)."""
    import heapq
    out = np.empty(size, dtype=np.int16)
    released = []  # (deadline, dataset): items that may be served now
    upcoming = [(1, d, 1) for d in range(len(weights))]  # (release step, dataset, item k)
    heapq.heapify(upcoming)
    heappush, heappop, floor, ceil = heapq.heappush, heapq.heappop, math.floor, math.ceil
    for n in range(1, size + 1):
        while upcoming[0][0] <= n:
            _, d, item = heappop(upcoming)
            w = weights[d]
            heappush(released, (ceil(item / w), d))
            heappush(upcoming, (floor(item / w) + 1, d, item + 1))
        _, d = heappop(released)
        out[n - 1] = d
    return out


# ---------------------------------------------------------------------------------------
# Cache: arrays saved as .npy under names derived from a hash of what shaped them.

def description_hash(description):
    """Hex digest of a JSON-able description of every parameter that shapes an index."""
    text = json.dumps(description, sort_keys=True)
    return hashlib.md5(text.encode("utf-8")).hexdigest()


def _build_missing(cache_dir, paths, build):
    """Build and save the arrays unless every file exists; True when built."""
    if all(os.path.isfile(p) for p in paths.values()):
        return False
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create the index cache directory {cache_dir}: {e.strerror}") from None
    arrays = build()
    for key, path in paths.items():
        save_npy_atomic(path, arrays[key])
    return True


def save_npy_atomic(path, array):
    """Write ``array`` to ``path`` under a temporary name, then rename it into place."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npy", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _distributed():
    """The global rank when torch.distributed is initialized, else None.

    torch is only consulted when something already imported it: a process that never
    imported torch cannot have a process group, and importing it would cost start-up.
    """
    if "torch" not in sys.modules:
        return None
    from megatron.mpu import collectives
    return collectives.get_global_rank() if collectives.is_distributed() else None


def cached_arrays(cache_dir, file_names, build):
    """Load the arrays ``file_names`` (dict key -> file name) from ``cache_dir``, building them if absent.

    ``build()`` returns a dict of arrays with the same keys. When torch.distributed is
    initialized, rank 0 builds and saves while the other ranks wait, then every rank
    memory-maps the files; if rank 0 fails, every rank raises (``mpu.fail_together``)
    instead of the others waiting until the timeout. Returns ``(arrays, built)``.
    """
    paths = {key: os.path.join(cache_dir, name) for key, name in file_names.items()}
    rank = _distributed()
    def together(what):
        if rank is None:
            return contextlib.nullcontext()
        from megatron.mpu.collectives import fail_together
        return fail_together(f"{what} {cache_dir}")

    built = False
    with together("building the index cache in"):
        if rank is None or rank == 0:
            built = _build_missing(cache_dir, paths, build)
    with together("reading the index cache in"):
        missing = [p for p in paths.values() if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"index cache files missing after the build: {', '.join(missing)} "
                                    f"(is {cache_dir} shared by every rank?)")
        arrays = {key: np.load(path, mmap_mode="r", allow_pickle=False) for key, path in paths.items()}
    return arrays, built
