"""The mmap indexed dataset: Megatron-compatible ``.bin`` + ``.idx`` files.

Format (see ``shared/reference/indexed_dataset.md``): the ``.bin`` holds the token
ids of every sequence, concatenated; the ``.idx`` holds a header (magic, version,
dtype code, sequence count, document-index count), then the sequence lengths
(int32), the byte pointers of the sequences (int64), the document index (int64)
and, for multimodal datasets only, one int8 mode per sequence.

This module imports numpy only: the preprocessing tool imports it and its
start-up time counts.
"""
import os
import shutil
import struct
from array import array

import numpy as np

from megatron.errors import UserError

_MAGIC = b"MMIDIDX\x00\x00"
_VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, S, D

DTYPES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}


class IndexedDatasetError(UserError, ValueError):
    """A ``.bin``/``.idx`` pair that is missing, truncated or corrupt."""


def dtype_code(dtype):
    """The ``.idx`` code of a token dtype (KeyError-free: a clear ValueError)."""
    dtype = np.dtype(dtype)
    for code, dt in DTYPES.items():
        if np.dtype(dt) == dtype:
            return code
    raise ValueError(f"token dtype {dtype} has no code in the indexed dataset format "
                     f"(supported: {', '.join(np.dtype(d).name for d in DTYPES.values())})")


def best_dtype(vocab_size):
    """Smallest token dtype Megatron uses: uint16 below 65,500 entries, else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.uint16
    return np.int32


def data_file_path(prefix):
    """Path of the token file of ``prefix``."""
    return prefix + ".bin"


def index_file_path(prefix):
    """Path of the index file of ``prefix``."""
    return prefix + ".idx"


def exists(prefix):
    """True when both files of ``prefix`` exist."""
    return os.path.isfile(data_file_path(prefix)) and os.path.isfile(index_file_path(prefix))


def _fail(path, why):
    raise IndexedDatasetError(f"{path}: {why}")


class _Index:
    """The parsed, memory-mapped ``.idx`` file of one dataset."""

    def __init__(self, idx_path, multimodal=False):
        self.path = idx_path
        try:
            size = os.path.getsize(idx_path)
        except OSError as e:
            _fail(idx_path, f"cannot read index file ({e.strerror})")
        if size < _HEADER.size:
            _fail(idx_path, f"truncated index file: {size} bytes, header needs {_HEADER.size}")
        self._mmap = np.memmap(idx_path, dtype=np.uint8, mode="r")
        buf = self._mmap
        magic, version, code, num_seqs, num_docs = _HEADER.unpack(bytes(buf[:_HEADER.size]))
        if magic != _MAGIC:
            _fail(idx_path, f"bad magic {magic!r}, expected {_MAGIC!r}: not an mmap indexed dataset index")
        if version != _VERSION:
            _fail(idx_path, f"unsupported index version {version} (only {_VERSION} is known)")
        if code not in DTYPES:
            _fail(idx_path, f"unknown dtype code {code} (known: {sorted(DTYPES)})")
        self.dtype = np.dtype(DTYPES[code])
        expected = _HEADER.size + num_seqs * (4 + 8) + num_docs * 8 + (num_seqs if multimodal else 0)
        if size != expected:
            _fail(idx_path, f"index size {size} bytes does not match its header "
                            f"({num_seqs} sequences, {num_docs} document entries"
                            f"{', multimodal' if multimodal else ''}: expected {expected} bytes)")
        if num_docs < 1:
            _fail(idx_path, "document index is empty (it must start with 0)")
        off = _HEADER.size
        self.sequence_lengths = np.frombuffer(buf, dtype=np.int32, count=num_seqs, offset=off)
        off += num_seqs * 4
        self.sequence_pointers = np.frombuffer(buf, dtype=np.int64, count=num_seqs, offset=off)
        off += num_seqs * 8
        self.document_indices = np.frombuffer(buf, dtype=np.int64, count=num_docs, offset=off)
        off += num_docs * 8
        self.sequence_modes = (np.frombuffer(buf, dtype=np.int8, count=num_seqs, offset=off)
                               if multimodal else None)
        if self.document_indices[0] != 0 or self.document_indices[-1] != num_seqs:
            _fail(idx_path, f"document index runs from {int(self.document_indices[0])} to "
                            f"{int(self.document_indices[-1])}, expected 0 to {num_seqs}")

    def __len__(self):
        return len(self.sequence_lengths)

    def data_bytes(self):
        """Bytes the ``.bin`` must hold according to this index."""
        if len(self) == 0:
            return 0
        return int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize


class IndexedDataset:
    """Read-only, memory-mapped view of ``prefix.bin`` / ``prefix.idx``.

    ``len(ds)`` is the number of sequences; ``ds[i]`` is sequence ``i`` as a numpy
    array (a slice of consecutive sequences gives a list of arrays);
    ``get(i, offset, length)`` reads part of one sequence without copying.
    """

    def __init__(self, prefix, multimodal=False):
        self.prefix = prefix
        self.multimodal = multimodal
        self._open()

    def _open(self):
        idx_path, bin_path = index_file_path(self.prefix), data_file_path(self.prefix)
        if not os.path.isfile(idx_path) or not os.path.isfile(bin_path):
            missing = [p for p in (bin_path, idx_path) if not os.path.isfile(p)]
            raise IndexedDatasetError(f"indexed dataset {self.prefix!r}: missing {', '.join(missing)}")
        self._index = _Index(idx_path, self.multimodal)
        expected = self._index.data_bytes()
        actual = os.path.getsize(bin_path)
        if actual != expected:
            _fail(bin_path, f"data file holds {actual} bytes but {idx_path} describes {expected} bytes "
                            f"({len(self._index)} sequences of {self._index.dtype.name})")
        # A zero-byte file cannot be memory-mapped.
        self._bin = (np.memmap(bin_path, dtype=np.uint8, mode="r") if actual
                     else np.zeros(0, dtype=np.uint8))

    def __getstate__(self):
        # Re-open the files after pickling (DataLoader workers) instead of copying maps.
        return {"prefix": self.prefix, "multimodal": self.multimodal}

    def __setstate__(self, state):
        self.prefix = state["prefix"]
        self.multimodal = state["multimodal"]
        self._open()

    @property
    def dtype(self):
        """numpy dtype of the tokens."""
        return self._index.dtype

    @property
    def sequence_lengths(self):
        """int32 array: tokens in each sequence."""
        return self._index.sequence_lengths

    @property
    def sequence_pointers(self):
        """int64 array: byte offset of each sequence in the ``.bin``."""
        return self._index.sequence_pointers

    @property
    def document_indices(self):
        """int64 array: 0, then for each document the sequence index just past its end."""
        return self._index.document_indices

    @property
    def sequence_modes(self):
        """int8 array of sequence modes (multimodal datasets only, else None)."""
        return self._index.sequence_modes

    def __len__(self):
        return len(self._index)

    def _read(self, pointer, count):
        return np.frombuffer(self._bin, dtype=self.dtype, count=count, offset=int(pointer))

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise ValueError("IndexedDataset slices must be contiguous (step 1)")
            lengths = self.sequence_lengths[start:stop]
            if len(lengths) == 0:
                return []
            flat = self._read(self.sequence_pointers[start], int(lengths.sum()))
            return np.split(flat, np.cumsum(lengths[:-1]))
        n = len(self)
        i = int(idx)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence index {idx} out of range for {n} sequences in {self.prefix}")
        return self._read(self.sequence_pointers[i], int(self.sequence_lengths[i]))

    def get(self, idx, offset=0, length=None):
        """Tokens ``[offset, offset + length)`` of sequence ``idx`` (to its end if length is None)."""
        n = len(self)
        if not -n <= idx < n:
            raise IndexError(f"sequence index {idx} out of range for {n} sequences in {self.prefix}")
        seq_len = int(self.sequence_lengths[idx])
        if length is None:
            length = seq_len - offset
        if offset < 0 or length < 0 or offset + length > seq_len:
            raise IndexError(f"tokens [{offset}, {offset + length}) out of range for sequence {idx} "
                             f"of length {seq_len} in {self.prefix}")
        pointer = int(self.sequence_pointers[idx]) + offset * self.dtype.itemsize
        return self._read(pointer, length)

    def num_documents(self):
        """Number of documents (entries of the document index minus one)."""
        return len(self.document_indices) - 1

    def get_document(self, doc, offset=0, length=None):
        """Tokens ``[offset, offset + length)`` of document ``doc``, its sequences concatenated.

        The sequences of a document are consecutive in the ``.bin``, so this is one view.
        """
        first, end = int(self.document_indices[doc]), int(self.document_indices[doc + 1])
        if first == end:
            doc_len = 0
        else:
            doc_len = (int(self.sequence_pointers[end - 1]) - int(self.sequence_pointers[first])) \
                // self.dtype.itemsize + int(self.sequence_lengths[end - 1])
        if length is None:
            length = doc_len - offset
        if offset < 0 or length < 0 or offset + length > doc_len:
            raise IndexError(f"tokens [{offset}, {offset + length}) out of range for document {doc} "
                             f"of length {doc_len} in {self.prefix}")
        if length == 0:
            return np.zeros(0, dtype=self.dtype)
        pointer = int(self.sequence_pointers[first]) + offset * self.dtype.itemsize
        return self._read(pointer, length)


class IndexedDatasetBuilder:
    """Writes an indexed dataset: tokens stream to ``bin_path``, ``finalize`` writes the index.

    Files are written to exactly the paths given; a caller that wants atomic output
    passes temporary names and renames both files afterwards.
    """

    def __init__(self, bin_path, dtype=np.uint16, multimodal=False):
        self.bin_path = bin_path
        self.dtype = np.dtype(dtype)
        dtype_code(self.dtype)  # reject unsupported dtypes before writing anything
        self.multimodal = multimodal
        self._data = open(bin_path, "wb", buffering=1 << 20)
        self.sequence_lengths = array("i")
        self.document_indices = array("q", [0])
        self.sequence_modes = array("b") if multimodal else None

    def _as_tokens(self, tokens):
        arr = np.asarray(tokens)
        if arr.dtype != self.dtype:
            if arr.size and arr.dtype.kind in "iu" and self.dtype.kind in "iu":
                info = np.iinfo(self.dtype)
                lo, hi = int(arr.min()), int(arr.max())
                if lo < info.min or hi > info.max:
                    raise ValueError(f"token ids {lo}..{hi} do not fit the dataset dtype {self.dtype.name} "
                                     f"({info.min}..{info.max}) of {self.bin_path}")
            arr = arr.astype(self.dtype)
        return arr.reshape(-1)

    def add_item(self, tokens, mode=0):
        """Append one sequence (token ids: list, numpy array or CPU tensor)."""
        arr = self._as_tokens(tokens)
        self._data.write(arr.tobytes())
        self.sequence_lengths.append(arr.size)
        if self.multimodal:
            self.sequence_modes.append(mode)

    def end_document(self):
        """Close the current document after the sequences added since the last one."""
        self.document_indices.append(len(self.sequence_lengths))

    def add_document(self, tokens, lengths, modes=None):
        """Append one document of several sequences: ``tokens`` concatenated, split by ``lengths``."""
        arr = self._as_tokens(tokens)
        lengths = [int(n) for n in lengths]
        if sum(lengths) != arr.size:
            raise ValueError(f"document lengths {lengths} sum to {sum(lengths)}, "
                             f"but {arr.size} tokens were given")
        self._data.write(arr.tobytes())
        self.sequence_lengths.extend(lengths)
        self.document_indices.append(len(self.sequence_lengths))
        if self.multimodal:
            self.sequence_modes.extend(modes if modes is not None else [0] * len(lengths))

    def add_index(self, prefix):
        """Append another dataset (index and tokens) after everything written so far."""
        other = IndexedDataset(prefix, multimodal=self.multimodal)
        if other.dtype != self.dtype:
            raise ValueError(f"cannot merge {prefix} (tokens {other.dtype.name}) into {self.bin_path} "
                             f"(tokens {self.dtype.name}): dtypes differ")
        offset = len(self.sequence_lengths)
        self.sequence_lengths.frombytes(np.ascontiguousarray(other.sequence_lengths, np.int32).tobytes())
        self.document_indices.frombytes((other.document_indices[1:] + offset).astype(np.int64).tobytes())
        if self.multimodal:
            self.sequence_modes.frombytes(np.ascontiguousarray(other.sequence_modes).tobytes())
        self._data.flush()
        with open(data_file_path(prefix), "rb") as src:
            shutil.copyfileobj(src, self._data, 16 << 20)
        del other

    def finalize(self, idx_path):
        """Close the ``.bin`` and write the ``.idx`` to ``idx_path``."""
        self._data.close()
        write_index(idx_path, self.dtype,
                    np.frombuffer(self.sequence_lengths, dtype=np.int32) if len(self.sequence_lengths)
                    else np.zeros(0, np.int32),
                    np.frombuffer(self.document_indices, dtype=np.int64),
                    np.frombuffer(self.sequence_modes, dtype=np.int8) if self.multimodal else None)


def sequence_pointers(sequence_lengths, dtype):
    """Byte offset of each sequence: 0, then running sums of length x itemsize."""
    pointers = np.empty(len(sequence_lengths), dtype=np.int64)
    if len(pointers):
        pointers[0] = 0
        np.cumsum(sequence_lengths[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= np.dtype(dtype).itemsize
    return pointers


def write_index(idx_path, dtype, sequence_lengths, document_indices, sequence_modes=None):
    """Write an ``.idx`` file from its arrays (pointers are derived from the lengths)."""
    sequence_lengths = np.asarray(sequence_lengths, dtype=np.int32)
    document_indices = np.asarray(document_indices, dtype=np.int64)
    with open(idx_path, "wb", buffering=1 << 20) as f:
        f.write(_HEADER.pack(_MAGIC, _VERSION, dtype_code(dtype),
                             len(sequence_lengths), len(document_indices)))
        f.write(sequence_lengths.tobytes())
        f.write(sequence_pointers(sequence_lengths, dtype).tobytes())
        f.write(document_indices.tobytes())
        if sequence_modes is not None:
            f.write(np.asarray(sequence_modes, dtype=np.int8).tobytes())
