"""Corpus -> Megatron ``.bin``/``.idx`` token files (the logic of tools/preprocess_data.py).

Inputs are JSONL (plain, .gz, .zst), Parquet or Hugging Face ``save_to_disk``
directories (megatron/data/corpus_readers.py reads them).
The corpus is streamed in chunks of lines or rows: workers parse and tokenize chunks,
the main process writes their results in input order, so the output does not
depend on the worker count and memory stays flat in the corpus size. Output is
written under temporary names and renamed at the end: a failed run leaves no
partial files. This module imports numpy and the tokenizer only (no torch):
start-up time is part of the measured throughput.
"""

import json
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from megatron.data.indexed_dataset import IndexedDatasetBuilder, best_dtype
from megatron.data.corpus_readers import PreprocessError, expand_inputs, read_chunks
from megatron.tokenizer import build_tokenizer

CHUNK_BYTES = 1 << 20  # input bytes per work item: large enough to amortize IPC
CHUNK_LINES = 4096
DOCUMENT_SUFFIX = "_document"


@dataclass
class PreprocessSummary:
    """What one preprocessing run read and wrote."""

    documents: int = 0
    tokens: int = 0
    input_bytes: int = 0
    seconds: float = 0.0
    bad_lines: int = 0
    empty: int = 0
    outputs: list = field(default_factory=list)

    @property
    def mb_per_s(self):
        """Input megabytes (10^6 bytes) per second of this run."""
        return self.input_bytes / 1e6 / max(self.seconds, 1e-9)

    def line(self):
        """The one-line summary printed at the end."""
        return (f"documents={self.documents} tokens={self.tokens} input_mb={self.input_bytes / 1e6:.2f} "
                f"seconds={self.seconds:.2f} mb_per_s={self.mb_per_s:.2f} "
                f"skipped_bad_lines={self.bad_lines} skipped_empty={self.empty}")


def output_prefix_for(output_prefix, key):
    """Megatron's naming: ``{output_prefix}_{key}_document``."""
    return f"{output_prefix}_{key}{DOCUMENT_SUFFIX}"


# ---------------------------------------------------------------- worker side

_worker = {}


def _init_worker(tok, keys, append_eod, keep_empty, dtype):
    if isinstance(tok, dict):  # a tokenizer config, sent to a spawned worker
        tok = build_tokenizer(tok)
    _worker.update(tok=tok, keys=keys, append_eod=append_eod, keep_empty=keep_empty, dtype=np.dtype(dtype))


def _encode(tok, texts):
    """Flat int64 ids of ``texts`` and the length of each."""
    if hasattr(tok, "encode_batch_flat"):
        return tok.encode_batch_flat(texts)
    encoded = tok.encode_batch(texts)
    lengths = np.array([len(e) for e in encoded], dtype=np.int64)
    flat = np.fromiter((i for e in encoded for i in e), dtype=np.int64, count=int(lengths.sum()))
    return flat, lengths


def _parse(raw, keys):
    """The texts of one raw line, or (None, reason) for a bad line."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})"
    try:
        obj = json.loads(line)
    except ValueError as e:
        return None, f"invalid JSON ({e})"
    if not isinstance(obj, dict):
        return None, f"not a JSON object (a {type(obj).__name__})"
    texts = []
    for key in keys:
        if key not in obj:
            return None, f"no key {key!r} (keys: {', '.join(map(repr, list(obj)[:8]))})"
        text = obj[key]
        if not isinstance(text, str):
            return None, f"{key!r} holds a {type(text).__name__}, not a string"
        texts.append(text)
    return texts, None


def _encode_columns(tok, keys, columns, linenos, bad):
    """Encode each key's texts; a text the tokenizer rejects (ValueError, e.g. the
    null tokenizer given a word) turns its line into a bad line, in every key."""
    try:
        return [_encode(tok, col) for col in columns]
    except ValueError:
        pass
    rejected = {}
    for key, col in zip(keys, columns):
        for i, text in enumerate(col):
            try:
                tok.tokenize(text)
            except ValueError as e:
                rejected.setdefault(i, f"tokenizer rejected {key!r}: {e}")
    bad.extend((linenos[i], reason) for i, reason in rejected.items())
    keep = [i for i in range(len(linenos)) if i not in rejected]
    return [_encode(tok, [col[i] for i in keep]) for col in columns]


def encode_chunk(first_lineno, lines):
    """Parse and tokenize one chunk of raw JSONL lines (runs in a worker).

    Returns ``(n_lines, per_key, bad, empty)``: per key a pair (ids of the
    kept documents concatenated, one length per kept document); ``bad`` lists
    (line number, reason); ``empty`` counts documents skipped for no tokens.
    """
    keys = _worker["keys"]
    bad = []
    linenos = []
    columns = [[] for _ in keys]
    for n, raw in enumerate(lines):
        if not raw.strip():
            continue  # a blank line (e.g. a trailing one) holds no document
        texts, reason = _parse(raw, keys)
        if texts is None:
            bad.append((first_lineno + n, reason))
            continue
        linenos.append(first_lineno + n)
        for col, text in zip(columns, texts):
            col.append(text)
    return (len(lines),) + _encode_documents(columns, linenos, bad)


def encode_rows(first_row, columns):
    """Tokenize one chunk of rows (Parquet or Arrow; runs in a worker): ``columns`` holds one
    list of texts per key, None for a null value (a bad row). Returns as ``encode_chunk``."""
    keys = _worker["keys"]
    n_rows = len(columns[0])
    bad = []
    nulls = set()
    for key, col in zip(keys, columns):
        for i, text in enumerate(col):
            if text is None and i not in nulls:
                nulls.add(i)
                bad.append((first_row + i, f"{key!r} is null"))
    if nulls:
        keep = [i for i in range(n_rows) if i not in nulls]
        columns = [[col[i] for i in keep] for col in columns]
        rows = [first_row + i for i in keep]
    else:
        rows = range(first_row, first_row + n_rows)
    return (n_rows,) + _encode_documents(columns, rows, bad)


def _encode_documents(columns, linenos, bad):
    """Tokenize the parsed texts of one chunk: ``(per_key, bad, empty)`` (see ``encode_chunk``)."""
    tok = _worker["tok"]
    encoded = _encode_columns(tok, _worker["keys"], columns, linenos, bad)
    bad.sort()
    per_key = []
    empty = 0
    for flat, lengths in encoded:
        if not _worker["keep_empty"]:
            keep = lengths > 0
            if not keep.all():
                empty += int((~keep).sum())
                # The flat ids need no change: empty documents contribute none.
                lengths = lengths[keep]
        if _worker["append_eod"]:
            flat = np.insert(flat, np.cumsum(lengths), tok.eod)
            lengths = lengths + 1
        per_key.append((flat.astype(_worker["dtype"], copy=False), lengths))
    return per_key, bad, empty


# ---------------------------------------------------------------- main side

class _InProcess:
    """The one-worker path: no process pool, no pickling."""

    def submit(self, fn, *args):
        result = fn(*args)

        class Done:
            def result(self):
                return result

            def cancel(self):
                pass

        return Done()

    def shutdown(self, wait=True, cancel_futures=False):
        pass


def _make_executor(workers, tok, tokenizer_cfg, args):
    import multiprocessing as mp

    if workers <= 1:
        _init_worker(tok, *args)
        return _InProcess()
    from concurrent.futures import ProcessPoolExecutor

    if "fork" in mp.get_all_start_methods():
        # fork: workers start in milliseconds and inherit the tokenizer already
        # built. The CLI path has imported no torch and started no threads;
        # callers inside a training process use workers=1.
        _init_worker(tok, *args)
        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"))
        # The first submit forks every worker: do it now, before a Parquet or Arrow
        # reader has started pyarrow's threads in this process.
        pool.submit(int).result()
        return pool
    return ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(dict(tokenizer_cfg), *args))


def _remove(paths):
    for p in paths:
        try:
            os.remove(p)
        except FileNotFoundError:
            pass


def _atomic_write_text(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def preprocess(inputs, output_prefix, tokenizer_cfg, json_keys=("text",), append_eod=False, workers=1,
               log_interval=1000, skip_bad_lines=False, keep_empty=False, progress=True):
    """Tokenize ``inputs`` (a path, glob or list of them: JSONL, .jsonl.gz, .jsonl.zst,
    Parquet, or a ``save_to_disk`` directory) into ``{output_prefix}_{key}_document.bin/.idx``,
    documents in input order; ``json_keys`` name the JSON keys or the text columns.

    ``tokenizer_cfg`` is the config's tokenizer section (dataclass or dict).
    A bad line raises ``PreprocessError`` naming file and line and leaves no
    output, unless ``skip_bad_lines``: then bad lines are counted and listed in
    ``{output_prefix}.skipped.txt``. Returns a ``PreprocessSummary``.
    """
    start = time.time()
    if int(workers) < 1:
        raise PreprocessError(f"workers must be at least 1, got {workers}")
    keys = list(json_keys)
    if not keys:
        raise PreprocessError("no --json-keys given")
    paths = expand_inputs(inputs)
    try:
        tok = build_tokenizer(tokenizer_cfg)
    except (ValueError, FileNotFoundError) as e:
        raise PreprocessError(str(e)) from None
    dtype = best_dtype(tok.vocab_size)
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    if not os.path.isdir(out_dir):
        raise PreprocessError(f"output directory does not exist: {out_dir}")

    finals = [output_prefix_for(output_prefix, k) for k in keys]
    tag = f".tmp{os.getpid()}"
    temps = [(f + tag + ".bin", f + tag + ".idx") for f in finals]
    builders = []
    try:
        for b, _ in temps:
            builders.append(IndexedDatasetBuilder(b, dtype))
    except OSError as e:
        for builder in builders:
            builder._data.close()
        _remove([b for b, _ in temps])
        raise PreprocessError(f"cannot write {e.filename}: {e.strerror}") from None
    summary = PreprocessSummary()
    skipped = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(unit=" docs", desc="preprocess", file=sys.stderr, mininterval=1.0, dynamic_ncols=True)
    executor = _make_executor(workers, tok, tokenizer_cfg, (keys, append_eod, keep_empty, dtype))
    pending = deque()
    max_pending = 1 if workers <= 1 else 3 * workers
    ok = False
    try:
        def drain_one():
            chunk, fut = pending.popleft()
            n_lines, per_key, bad, empty = fut.result()
            if bad:
                if not skip_bad_lines:
                    lineno, reason = bad[0]
                    raise PreprocessError(f"{chunk.where(lineno)}: {reason} "
                                          "(use --skip-bad-lines to skip such lines)")
                summary.bad_lines += len(bad)
                skipped.extend(f"{chunk.where(lineno)}: {reason}" for lineno, reason in bad)
            summary.empty += empty
            for builder, (flat, lengths) in zip(builders, per_key):
                offset = 0
                for n in lengths.tolist():
                    builder.add_document(flat[offset:offset + n], [n])
                    offset += n
                summary.tokens += int(flat.size)
            docs = len(per_key[0][1])
            summary.documents += docs
            summary.input_bytes += chunk.n_bytes
            if bar is not None:
                bar.update(docs)
                if summary.documents // max(log_interval, 1) != (summary.documents - docs) // max(log_interval, 1):
                    el = max(time.time() - start, 1e-9)
                    bar.set_postfix_str(f"{summary.input_bytes / 1e6:.1f} MB, "
                                        f"{summary.input_bytes / 1e6 / el:.2f} MB/s", refresh=False)

        for chunk in read_chunks(paths, keys, CHUNK_BYTES, CHUNK_LINES):
            encode = encode_chunk if chunk.kind == "lines" else encode_rows
            pending.append((chunk, executor.submit(encode, chunk.first, chunk.payload)))
            while len(pending) >= max_pending:
                drain_one()
        while pending:
            drain_one()
        for builder, (_, idx_tmp) in zip(builders, temps):
            builder.finalize(idx_tmp)
        # .bin first, .idx last: a prefix counts as present only with both files.
        for final, (bin_tmp, idx_tmp) in zip(finals, temps):
            os.replace(bin_tmp, final + ".bin")
            os.replace(idx_tmp, final + ".idx")
        if skip_bad_lines:
            skipped_path = output_prefix + ".skipped.txt"
            if skipped:
                _atomic_write_text(skipped_path, "\n".join(skipped) + "\n")
            else:
                _remove([skipped_path])  # a stale list from an earlier run would mislead
        ok = True
    finally:
        for fut in pending:
            fut[1].cancel()
        executor.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
        if not ok:
            for b in builders:
                try:
                    b._data.close()
                except Exception:
                    pass
            _remove([p for pair in temps for p in pair])
    summary.seconds = time.time() - start
    summary.outputs = finals
    return summary


def _data_prefixes(data_path):
    """The prefixes of ``data.data_path``: ``[p]`` or ``[w1, p1, w2, p2, ...]``."""
    if isinstance(data_path, str):
        data_path = [data_path]
    items = list(data_path or [])
    if len(items) <= 1:
        return [str(p) for p in items]
    if len(items) % 2:
        raise PreprocessError(f"data.data_path {items} has odd length: with blending, weights and prefixes alternate")
    return [str(p) for p in items[1::2]]


def ensure_preprocessed(data_cfg, tokenizer_cfg, workers=1, progress=True):
    """Build any of ``data_cfg.data_path``'s ``.bin/.idx`` that are absent from ``data_cfg.preprocess_input``.

    A prefix ``P_{key}_document`` is built from the JSONL key ``key`` into
    output prefix ``P``, with EOD appended. ``preprocess_input`` is one path
    (used for every absent prefix) or a list paired with the absent prefixes.
    Call it on one rank only (the others wait at a barrier). Returns the list
    of prefixes it built.
    """
    get = (lambda k: data_cfg.get(k)) if isinstance(data_cfg, dict) else (lambda k: getattr(data_cfg, k, None))
    missing = [p for p in _data_prefixes(get("data_path"))
               if not (os.path.isfile(p + ".bin") and os.path.isfile(p + ".idx"))]
    if not missing:
        return []
    source = get("preprocess_input")
    if not source:
        raise PreprocessError(f"dataset {missing[0]}.bin/.idx not found and data.preprocess_input is not set "
                              "(run tools/preprocess_data.py or set data.preprocess_input to a JSONL file)")
    sources = [source] * len(missing) if isinstance(source, str) else list(source)
    if len(sources) != len(missing):
        raise PreprocessError(f"data.preprocess_input has {len(sources)} entries but {len(missing)} "
                              f"datasets are absent: {missing}")
    built = []
    for prefix, src in zip(missing, sources):
        stem, sep, key = prefix[:-len(DOCUMENT_SUFFIX)].rpartition("_") if prefix.endswith(DOCUMENT_SUFFIX) \
            else ("", "", "")
        if not sep or not stem or not key:
            raise PreprocessError(f"cannot preprocess into {prefix!r}: the prefix must end in "
                                  f"_<json key>{DOCUMENT_SUFFIX} (e.g. data/corpus_text_document)")
        out_dir = os.path.dirname(os.path.abspath(stem))
        os.makedirs(out_dir, exist_ok=True)
        summary = preprocess(src, stem, tokenizer_cfg, json_keys=[key], append_eod=True, workers=workers,
                             progress=progress)
        print(f"preprocessed {src} -> {prefix}: {summary.line()}", file=sys.stderr)
        built.append(prefix)
    return built
