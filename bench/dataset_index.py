"""Wall time and peak memory to build the GPT dataset indices of a 10-billion-token dataset.

A synthetic dataset of 20 M documents of 500 tokens (uint16) is made once: the ``.idx``
written directly with numpy, the ``.bin`` a sparse file (never read by the build). Each
build runs in a fresh subprocess (start-up and imports included); its peak RSS is the
child's ``ru_maxrss``. With ``--mcore-python`` the same build by megatron-core's
GPTDataset (C++ helpers) runs side by side, in that interpreter.

    python bench/dataset_index.py [--mcore-python /tmp/mcore-venv/bin/python]

The last line is ``key=value`` figures.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from harness import megatron_env  # bench/harness.py: a script's own directory leads sys.path
from megatron.data.indexed_dataset import write_index

# The build measured in the child: everything from interpreter start-up to the arrays on disk.
# The child imports the megatron this process imports (PYTHONPATH from megatron_env).
OURS = r"""
import json, time
t0 = time.perf_counter()
from megatron.data.gpt_dataset import GPTDataset
from megatron.data.indexed_dataset import IndexedDataset
t1 = time.perf_counter()
indexed = IndexedDataset({prefix!r})
ds = GPTDataset(indexed, (0, indexed.num_documents()), {seq_length}, None, {seed}, cache_dir={cache!r})
t2 = time.perf_counter()
assert ds.built
print(json.dumps({{"samples": len(ds), "import_s": t1 - t0, "build_s": t2 - t1}}))
"""

MCORE = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import Split
t1 = time.perf_counter()


class Tokenizer:
    # The build reads only these: the vocabulary size, EOD, and an identity for the cache hash.
    vocab_size = 50257
    eod = 50256
    unique_identifiers = {{"class": "Tokenizer", "vocab_size": 50257}}


config = GPTDatasetConfig(random_seed={seed}, sequence_length={seq_length}, blend=([{prefix!r}], None),
                          split="1,0,0", path_to_cache={cache!r}, reset_position_ids=False,
                          reset_attention_mask=False, eod_mask_loss=False, tokenizer=Tokenizer(),
                          mid_level_dataset_surplus=0.005)
indexed = IndexedDataset({prefix!r})
indices = numpy.arange(len(indexed), dtype=numpy.int32)
ds = GPTDataset(indexed, {prefix!r}, indices, None, Split.train, config)
t2 = time.perf_counter()
print(json.dumps({{"samples": len(ds), "import_s": t1 - t0, "build_s": t2 - t1}}))
"""


def make_dataset(prefix, num_docs, doc_len):
    """Write the .idx directly and a sparse .bin of the right size."""
    lengths = np.full(num_docs, doc_len, dtype=np.int32)
    write_index(prefix + ".idx", np.uint16, lengths, np.arange(num_docs + 1, dtype=np.int64))
    with open(prefix + ".bin", "wb") as f:
        f.truncate(num_docs * doc_len * 2)


def peak_rss_mib_of(python, code, env=None):
    """Run ``code`` in a fresh interpreter; return (its last stdout line parsed, wall s, peak RSS MiB).

    os.wait4 reaps the child and gives its own ru_maxrss: the whole process, imports included.
    """
    start = time.perf_counter()
    proc = subprocess.Popen([python, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, cwd=tempfile.gettempdir())
    # The child prints little, so reading stdout then stderr cannot deadlock on a full pipe.
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{python} failed ({proc.returncode}):\n{err.decode()[-3000:]}")
    result = json.loads(out.decode().strip().splitlines()[-1])
    return result, wall, usage.ru_maxrss / 1024.0  # Linux: KiB


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-docs", type=int, default=20_000_000)
    parser.add_argument("--doc-len", type=int, default=500)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--mcore-python", default=None, help="python of a venv with megatron-core installed")
    parser.add_argument("--dir", default=None, help="where to put the synthetic dataset (default: a temp dir)")
    parser.add_argument("--repeat", type=int, default=1, help="builds per implementation (best wall time kept)")
    args = parser.parse_args()

    workdir = args.dir or tempfile.mkdtemp(prefix="bench-dataset-index-")
    os.makedirs(workdir, exist_ok=True)
    prefix = os.path.join(workdir, "synthetic_text_document")
    try:
        t = time.perf_counter()
        make_dataset(prefix, args.num_docs, args.doc_len)
        tokens = args.num_docs * args.doc_len
        print(f"dataset: {args.num_docs:,} documents x {args.doc_len} tokens = {tokens:,} tokens "
              f"(.idx {os.path.getsize(prefix + '.idx') / 2**20:.0f} MiB, sparse .bin) "
              f"made in {time.perf_counter() - t:.1f} s")
        fields = dict(prefix=prefix, seq_length=args.seq_length, seed=args.seed)
        figures = {}
        for name, python, template in (("ours", sys.executable, OURS), ("mcore", args.mcore_python, MCORE)):
            if python is None:
                continue
            # megatron-core's venv must not see our `megatron` (the same top-level name).
            env = megatron_env(OMP_NUM_THREADS="1") if name == "ours" else dict(os.environ, OMP_NUM_THREADS="1")
            best = None
            for r in range(args.repeat):
                cache = os.path.join(workdir, f"cache-{name}-{r}")
                result, wall, peak = peak_rss_mib_of(python, template.format(cache=cache, **fields), env)
                shutil.rmtree(cache, ignore_errors=True)
                print(f"{name:5s} run {r}: samples {result['samples']:,}  build {result['build_s']:.2f} s  "
                      f"imports {result['import_s']:.2f} s  whole process {wall:.2f} s  peak RSS {peak:.0f} MiB")
                if best is None or wall < best[1]:
                    best = (result, wall, peak)
            result, wall, peak = best
            figures[f"{name}_s"] = round(wall, 2)
            figures[f"{name}_build_s"] = round(result["build_s"], 2)
            figures[f"{name}_peak_mib"] = round(peak)
            figures[f"{name}_samples"] = result["samples"]
        if "mcore_s" in figures:
            figures["speedup"] = round(figures["mcore_s"] / figures["ours_s"], 2)
        print(" ".join(f"{k}={v}" for k, v in figures.items()))
    finally:
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
