"""Benchmark tools/preprocess_data.py: MB/s and peak RSS on ~50 MB of JSONL.

The embedded corpus (data/kjv.jsonl.gz, 4.17 MB of JSONL) is repeated 12 times
into an uncompressed .jsonl in a temporary directory, then the command is run
as a subprocess with GPT-2-style byte-level BPE (data/kjv-vocab.json +
data/kjv-merges.txt, 8192 tokens) at 1 and 2 workers. MB/s = input bytes /
wall time of the whole command, Python start-up included. Peak RSS is the
largest resident set of the command or any of its worker processes.

--formats also runs the same texts as Parquet (one `text` column, pyarrow's default
snappy compression, written here with pyarrow; needs the `[data]` extra): its MB/s
counts the JSONL bytes of the same documents, so the two figures compare wall times for
identical work, and parquet_over_jsonl_time_wN is Parquet's wall time / JSONL's.

With --engines it first measures the BPE engines alone, one thread, on the
corpus once (same vocabulary, identical ids): tiktoken (GPT2BPETokenizer) and
Hugging Face `tokenizers` (encode per document, and encode_batch on one thread).

Usage: python bench/preprocess.py [--repeat 12] [--workers 1 2] [--runs 1] [--formats jsonl parquet] [--engines]
The last line printed is key=value figures.
"""

import argparse
import gzip
import os
import shutil
import subprocess
import sys
import tempfile
import time

from harness import megatron_env  # bench/harness.py: a script's own directory leads sys.path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_once(cmd):
    """Wall seconds, CPU seconds (it and its workers) and peak RSS (MiB, the largest of
    it and its workers) of one command, and the last line it printed."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=megatron_env())
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{out.decode()}")
    cpu = usage.ru_utime + usage.ru_stime
    return wall, cpu, usage.ru_maxrss / 1024, out.decode().strip().splitlines()[-1]


_WRITE_PARQUET = """
import gzip, json, sys
import pyarrow as pa, pyarrow.parquet as pq
with gzip.open(sys.argv[1], "rt", encoding="utf-8") as f:
    texts = [json.loads(line)["text"] for line in f if line.strip()]
pq.write_table(pa.table({"text": texts * int(sys.argv[2])}), sys.argv[3], row_group_size=4096)
"""


def write_parquet(repeat, path):
    """The embedded corpus's documents, ``repeat`` times, as a Parquet file with one
    ``text`` column (row groups of 4096 documents). Written by a child process: pyarrow
    loaded here would count in the peak RSS of every command started afterwards."""
    subprocess.run([sys.executable, "-c", _WRITE_PARQUET, os.path.join(ROOT, "data", "kjv.jsonl.gz"),
                    str(repeat), path], check=True, env=megatron_env())
    return path


def measure_engines(texts, figures):
    """Single-thread MB/s of tiktoken and HF tokenizers on ``texts``; checks equal ids."""
    os.environ["RAYON_NUM_THREADS"] = "1"  # read when tokenizers starts its pool
    from tokenizers import Tokenizer, models, pre_tokenizers

    from megatron.tokenizer import build_tokenizer

    vocab, merges = os.path.join(ROOT, "data", "kjv-vocab.json"), os.path.join(ROOT, "data", "kjv-merges.txt")
    tik = build_tokenizer({"type": "GPT2BPETokenizer", "vocab_file": vocab, "merge_file": merges})
    hf = Tokenizer(models.BPE.from_file(vocab, merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    mb = sum(len(t.encode()) for t in texts) / 1e6
    runs = {
        "tiktoken": lambda: [tik.tokenize(t) for t in texts],
        "hf_tokenizers": lambda: [hf.encode(t, add_special_tokens=False).ids for t in texts],
        "hf_tokenizers_batch_1thread": lambda: [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)],
    }
    results = {}
    for name, fn in runs.items():
        t0 = time.perf_counter()
        results[name] = fn()
        dt = time.perf_counter() - t0
        print(f"engine {name}: {mb / dt:.2f} MB/s ({mb:.2f} MB of text in {dt:.2f} s)")
        figures[f"engine_{name}_mb_per_s"] = f"{mb / dt:.2f}"
    same = results["tiktoken"] == results["hf_tokenizers"] == results["hf_tokenizers_batch_1thread"]
    print(f"engines give identical ids: {same}")
    figures["engines_identical"] = str(same)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=12)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--runs", type=int, default=1, help="runs per worker count; the best is reported")
    p.add_argument("--engines", action="store_true", help="also time the BPE engines alone")
    p.add_argument("--formats", nargs="+", default=["jsonl"], choices=["jsonl", "parquet"],
                   help="input kinds to time on the same texts (parquet needs pyarrow)")
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench_preprocess-")
    try:
        corpus = os.path.join(tmp, "corpus.jsonl")
        with gzip.open(os.path.join(ROOT, "data", "kjv.jsonl.gz"), "rb") as f:
            one = f.read()
        with open(corpus, "wb") as f:
            for _ in range(args.repeat):
                f.write(one)
        size = os.path.getsize(corpus)
        print(f"input: {corpus} ({size / 1e6:.1f} MB, kjv x {args.repeat}); tokenizer: data/kjv-vocab.json "
              f"+ data/kjv-merges.txt (GPT2BPETokenizer, 8192 tokens)")
        figures = {"input_mb": f"{size / 1e6:.1f}"}
        inputs = {"jsonl": corpus}
        if "parquet" in args.formats:
            inputs["parquet"] = write_parquet(args.repeat, os.path.join(tmp, "corpus.parquet"))
            print(f"input: {inputs['parquet']} ({os.path.getsize(inputs['parquet']) / 1e6:.1f} MB, same texts)")
        # Interleaved (run, workers, format): a load change on the shared machine then
        # hits every format alike, and each keeps its best run.
        best = {}
        for r in range(args.runs):
            for w in args.workers:
                for fmt in args.formats:
                    out = os.path.join(tmp, f"out_{fmt}_w{w}")
                    cmd = [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input",
                           inputs[fmt], "--output-prefix", out, "--tokenizer-type", "GPT2BPETokenizer",
                           "--vocab-file", os.path.join(ROOT, "data", "kjv-vocab.json"),
                           "--merge-file", os.path.join(ROOT, "data", "kjv-merges.txt"),
                           "--append-eod", "--workers", str(w), "--no-progress"]
                    wall, cpu, rss, summary = run_once(cmd)
                    print(f"{fmt} workers={w} run={r}: {wall:.2f} s wall, {cpu:.2f} s CPU, "
                          f"{size / 1e6 / wall:.2f} MB/s, peak RSS {rss:.0f} MiB | {summary}")
                    if (fmt, w) not in best or wall < best[fmt, w][0]:
                        best[fmt, w] = (wall, rss, cpu)
        for fmt in args.formats:
            tag = "" if fmt == "jsonl" else f"{fmt}_"
            for w in args.workers:
                wall, rss, cpu = best[fmt, w]
                figures[f"{tag}mb_per_s_w{w}"] = f"{size / 1e6 / wall:.2f}"
                figures[f"{tag}seconds_w{w}"] = f"{wall:.2f}"
                figures[f"{tag}peak_rss_mib_w{w}"] = f"{rss:.0f}"
                figures[f"{tag}cpu_seconds_w{w}"] = f"{cpu:.2f}"
        for fmt in args.formats:
            if fmt == "jsonl" or "jsonl" not in args.formats:
                continue
            for w in args.workers:
                figures[f"{fmt}_over_jsonl_time_w{w}"] = f"{best[fmt, w][0] / best['jsonl', w][0]:.3f}"
            figures[f"{fmt}_identical_output"] = str(all(
                open(os.path.join(tmp, f"out_{fmt}_w{w}_text_document{e}"), "rb").read()
                == open(os.path.join(tmp, f"out_jsonl_w{w}_text_document{e}"), "rb").read()
                for w in args.workers for e in (".bin", ".idx")))
        if args.engines:
            # Last: Linux carries a parent's peak RSS into the children it forks
            # afterwards, and this step makes the parent large.
            import json

            measure_engines([json.loads(line)["text"] for line in one.splitlines()], figures)
        print(" ".join(f"{k}={v}" for k, v in figures.items()))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
