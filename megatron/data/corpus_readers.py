"""Where preprocessing reads documents from: JSONL (plain, ``.gz``, ``.zst``), Parquet,
and Hugging Face ``datasets`` directories written by ``save_to_disk``.

Every reader yields ``Chunk``s in input order. JSONL chunks carry raw lines (the
workers parse them, so the main process stays a reader and writer); Parquet and
Arrow chunks carry the texts of the wanted columns, already decoded by pyarrow
(None for a null value). Either way the same texts become the same documents,
so the ``.bin``/``.idx`` do not depend on the input kind.

A ``save_to_disk`` directory is read with pyarrow alone: its ``state.json``
lists Arrow stream files, in order (``datasets`` itself is not needed).
"""
import glob
import gzip
import io
import json
import os
import zlib
from dataclasses import dataclass

from megatron.errors import UserError
from megatron.optional_deps import require


class PreprocessError(UserError):
    """A user-caused problem (input, paths, tokenizer): one line, no traceback."""


@dataclass
class Chunk:
    """One work item: ``lines`` (raw JSONL lines) or ``rows`` (one list of texts per key),
    numbered from ``first`` (1-based line or row number in ``path``)."""

    path: str
    first: int
    kind: str  # "lines" | "rows"
    payload: list
    n_bytes: int

    def where(self, number):
        """How an error names item ``number`` of this chunk: ``path:12`` or ``path: row 12``."""
        return f"{self.path}:{number}" if self.kind == "lines" else f"{self.path}: row {number}"


def input_kind(path):
    """``jsonl``, ``parquet`` or ``hf_dataset`` for one input path (by name, or a directory)."""
    if os.path.isdir(path):
        return "hf_dataset"
    if path.endswith((".parquet", ".pq")):
        return "parquet"
    return "jsonl"


def _is_dataset_dir(path):
    return os.path.isdir(path) and (os.path.isfile(os.path.join(path, "state.json"))
                                    or os.path.isfile(os.path.join(path, "dataset_dict.json")))


def expand_inputs(pattern):
    """The inputs, in order: each path as given, each glob's matches sorted (files and
    ``save_to_disk`` directories). ``pattern``: a string or a list of them."""
    if isinstance(pattern, (list, tuple)):
        out = []
        for p in pattern:
            out.extend(expand_inputs(p))
        return out
    if any(c in pattern for c in "*?["):
        paths = sorted(p for p in glob.glob(pattern) if os.path.isfile(p) or _is_dataset_dir(p))
        if not paths:
            raise PreprocessError(f"no input file matches {pattern!r}")
        return paths
    if os.path.isdir(pattern):
        if not _is_dataset_dir(pattern):
            raise PreprocessError(f"input directory {pattern!r} is not a Hugging Face dataset saved with "
                        "save_to_disk (no state.json)")
        return [pattern]
    if not os.path.isfile(pattern):
        raise PreprocessError(f"input file not found: {pattern!r}")
    return [pattern]


# ------------------------------------------------------------------- JSONL

def _open_jsonl(path):
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        zstd = require("zstandard", "data", f"reading {path} (zstd JSONL)")
        raw = open(path, "rb")
        # Corpora compressed with --long use windows past the default limit.
        reader = zstd.ZstdDecompressor(max_window_size=2 ** 31).stream_reader(raw, closefd=True)
        return io.BufferedReader(reader, buffer_size=1 << 20)
    return open(path, "rb")


def _jsonl_chunks(path, size_limit):
    errors = (OSError, EOFError, zlib.error)
    zstd = None
    if path.endswith(".zst"):
        zstd = require("zstandard", "data", f"reading {path} (zstd JSONL)")
        errors = errors + (zstd.ZstdError,)
    try:
        with _open_jsonl(path) as f:
            lines, size, first = [], 0, 1
            for raw in f:
                lines.append(raw)
                size += len(raw)
                if size >= size_limit[0] or len(lines) >= size_limit[1]:
                    yield Chunk(path, first, "lines", lines, size)
                    first += len(lines)
                    lines, size = [], 0
            if lines:
                yield Chunk(path, first, "lines", lines, size)
    except errors as e:
        raise PreprocessError(f"{path}: cannot read ({e})") from None


# ------------------------------------------------------- Parquet and Arrow

def _text_columns(pa, schema, keys, path):
    """Check that every key is a string column of ``schema``."""
    for key in keys:
        index = schema.get_field_index(key)
        if index < 0:
            raise PreprocessError(f"{path}: no column {key!r} (columns: {', '.join(map(repr, schema.names[:8]))}); "
                              "--json-keys names the text columns")
        t = schema.field(index).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t)
                or getattr(pa.types, "is_string_view", lambda _: False)(t)):
            raise PreprocessError(f"{path}: column {key!r} holds {t}, not strings")


def _text_bytes(pa, column):
    """UTF-8 bytes of each row of a string column, read off its offsets (nulls count 0 or
    what the writer left there: this only sizes chunks). pyarrow.compute, which costs a
    noticeable share of a small run's start-up, is needed only for string views."""
    import numpy as np

    t = column.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        dtype = np.int64 if pa.types.is_large_string(t) else np.int32
        offsets = np.frombuffer(column.buffers()[1], dtype=dtype)[column.offset:column.offset + len(column) + 1]
        return np.diff(offsets).astype(np.int64)
    import pyarrow.compute as pc
    return pc.fill_null(pc.binary_length(column), 0).to_numpy(zero_copy_only=False).astype(np.int64)


def _row_chunks(pa, path, batches, keys, size_limit):
    """Split record batches into chunks of about ``size_limit`` = (bytes of text, rows)."""
    import numpy as np

    first = 1
    for batch in batches:
        if batch.num_rows == 0:
            continue
        columns = [batch.column(k) for k in keys]
        nbytes = sum(_text_bytes(pa, c) for c in columns)
        ends = np.cumsum(nbytes)
        start = 0
        while start < batch.num_rows:
            base = ends[start - 1] if start else 0
            stop = int(np.searchsorted(ends, base + size_limit[0], side="left")) + 1
            stop = min(stop, start + size_limit[1], batch.num_rows)
            texts = [c.slice(start, stop - start).to_pylist() for c in columns]
            yield Chunk(path, first, "rows", texts, int(ends[stop - 1] - base))
            first += stop - start
            start = stop


def _parquet_chunks(path, keys, size_limit):
    pa = require("pyarrow", "data", f"reading {path} (Parquet)")
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(path)
        _text_columns(pa, f.schema_arrow, keys, path)
        yield from _row_chunks(pa, path, f.iter_batches(batch_size=size_limit[1], columns=list(keys)), keys,
                                   size_limit)
    except (OSError, pa.ArrowException) as e:
        raise PreprocessError(f"{path}: cannot read as Parquet ({e})") from None


def dataset_files(path):
    """The Arrow files of a ``save_to_disk`` directory, in row order."""
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        try:
            with open(os.path.join(path, "dataset_dict.json")) as f:
                splits = json.load(f).get("splits", [])
        except (OSError, ValueError):
            splits = []
        example = os.path.join(path, splits[0]) if splits else os.path.join(path, "train")
        raise PreprocessError(f"{path} is a DatasetDict with splits {', '.join(splits) or '?'}: pass one "
                          f"split's directory, e.g. {example}")
    try:
        with open(os.path.join(path, "state.json")) as f:
            state = json.load(f)
        files = [os.path.join(path, d["filename"]) for d in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PreprocessError(f"{path}: cannot read state.json of a save_to_disk dataset ({e})") from None
    if state.get("_indices_data_files"):
        raise PreprocessError(f"{path}: the dataset has an indices mapping; save it again with "
                          "save_to_disk (which writes the selected rows)")
    return files


def _dataset_chunks(path, keys, size_limit):
    pa = require("pyarrow", "data", f"reading {path} (a Hugging Face dataset)")
    offset = 0  # rows are numbered across the dataset's files
    for name in dataset_files(path):
        rows = 0
        try:
            with pa.memory_map(name) as source:
                reader = pa.ipc.open_stream(source)
                _text_columns(pa, reader.schema, keys, path)
                for chunk in _row_chunks(pa, path, reader, keys, size_limit):
                    chunk.first += offset
                    rows += len(chunk.payload[0])
                    yield chunk
        except (OSError, pa.ArrowException) as e:
            raise PreprocessError(f"{name}: cannot read as an Arrow stream ({e})") from None
        offset += rows


def read_chunks(paths, keys, chunk_bytes, chunk_lines):
    """Yield the ``Chunk``s of every input in ``paths``, in order, each of about
    ``chunk_bytes`` of input and at most ``chunk_lines`` lines or rows."""
    size_limit = (chunk_bytes, chunk_lines)
    for path in paths:
        kind = input_kind(path)
        if kind == "parquet":
            yield from _parquet_chunks(path, keys, size_limit)
        elif kind == "hf_dataset":
            yield from _dataset_chunks(path, keys, size_limit)
        else:
            yield from _jsonl_chunks(path, size_limit)
