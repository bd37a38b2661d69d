"""Benchmark tools/preprocess_data.py: MB/s and peak RSS on ~50 MB of JSONL.

The embedded corpus (data/kjv.jsonl.gz, 4.17 MB of JSONL) is repeated 12 times
into an uncompressed .jsonl in a temporary directory, then the command is run
as a subprocess with GPT-2-style byte-level BPE (data/kjv-vocab.json +
data/kjv-merges.txt, 8192 tokens) at 1 and 2 workers. MB/s = input bytes /
wall time of the whole command, Python start-up included. Peak RSS is the
largest resident set of the command or any of its worker processes.

Usage: python bench/preprocess.py [--repeat 12] [--workers 1 2] [--runs 1]
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_once(cmd):
    """Wall seconds, CPU seconds (it and its workers) and peak RSS (MiB, the largest of
    it and its workers) of one command, and the last line it printed."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{out.decode()}")
    cpu = usage.ru_utime + usage.ru_stime
    return wall, cpu, usage.ru_maxrss / 1024, out.decode().strip().splitlines()[-1]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=12)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--runs", type=int, default=1, help="runs per worker count; the best is reported")
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
        for w in args.workers:
            best = None
            for r in range(args.runs):
                out = os.path.join(tmp, f"out_w{w}")
                cmd = [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", corpus,
                       "--output-prefix", out, "--tokenizer-type", "GPT2BPETokenizer",
                       "--vocab-file", os.path.join(ROOT, "data", "kjv-vocab.json"),
                       "--merge-file", os.path.join(ROOT, "data", "kjv-merges.txt"),
                       "--append-eod", "--workers", str(w), "--no-progress"]
                wall, cpu, rss, summary = run_once(cmd)
                print(f"workers={w} run={r}: {wall:.2f} s wall, {cpu:.2f} s CPU, {size / 1e6 / wall:.2f} MB/s, "
                      f"peak RSS {rss:.0f} MiB | {summary}")
                if best is None or wall < best[0]:
                    best = (wall, rss, cpu)
            figures[f"mb_per_s_w{w}"] = f"{size / 1e6 / best[0]:.2f}"
            figures[f"seconds_w{w}"] = f"{best[0]:.2f}"
            figures[f"peak_rss_mib_w{w}"] = f"{best[1]:.0f}"
            figures[f"cpu_seconds_w{w}"] = f"{best[2]:.2f}"
        print(" ".join(f"{k}={v}" for k, v in figures.items()))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
