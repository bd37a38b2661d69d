"""What checkpoint integrity costs: checksum speeds, the save overhead, the verify time.

Writes one checkpoint file of ``--mb`` MB of fp32 tensors (a rank file's shape: a
few large tensors and many small ones) in a temporary folder and measures, best of
``--repeat`` each:

- the checksum candidates over the same bytes in 16 MB chunks: xxh3_64 (the one
  used, megatron/checkpoint/checksum.py), zlib.crc32, sha256, and crc32c when the
  ``crc32c`` package is importable;
- the save: ``torch.save`` + fsync to a path, against ``atomic_write`` (which
  checksums the bytes as they are written, then fsyncs and renames), alternated;
- the load: verifying the file against its manifest entry (reads it back with the
  page cache warm, as right after a save or on a second read) and ``torch.load``.

    python bench/checkpoint_integrity.py [--mb 512] [--repeat 3] [--dir /tmp]

The last line is ``key=value`` figures (seconds per GB, MB/s).
"""
import argparse
import hashlib
import os
import shutil
import tempfile
import time
import zlib

import torch

from megatron.checkpoint.checksum import CHUNK_BYTES, file_checksum, new_hash
from megatron.checkpoint.files import atomic_write
from megatron.checkpoint.integrity import Manifest


def _state(mb):
    """About `mb` MB of fp32: four large tensors and 200 small ones."""
    gen = torch.Generator().manual_seed(0)
    big = (mb << 20) // 4 // 4
    state = {f"big{i}": torch.randn(big, generator=gen) for i in range(4)}
    state.update({f"small{i}": torch.randn(256, generator=gen) for i in range(200)})
    return state


def _best(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _checksums(data):
    """Name -> function checksumming `data` (bytes) in 16 MB chunks."""
    view = memoryview(data)
    chunks = [view[i:i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)]

    def running(h):
        for c in chunks:
            h.update(c)
        return h.hexdigest()

    def crc(fn):
        def run():
            value = 0
            for c in chunks:
                value = fn(c, value)
            return value
        return run
    algos = {"xxh3_64": lambda: running(new_hash()), "zlib_crc32": crc(zlib.crc32),
             "sha256": lambda: running(hashlib.sha256())}
    try:
        import crc32c
        algos["crc32c"] = crc(lambda c, v: crc32c.crc32c(c, value=v))
    except ImportError:
        pass
    return algos


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=512)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write (default: the system temp dir)")
    args = p.parse_args()
    work = tempfile.mkdtemp(dir=args.dir, prefix="ckpt_integrity_")
    try:
        state = _state(args.mb)
        plain, hashed = os.path.join(work, "plain.pt"), os.path.join(work, "hashed.pt")

        def plain_save():
            torch.save(state, plain)
            fd = os.open(plain, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        entry = {}
        # Alternate the two saves so that the disk's write-back state hits both alike.
        t_plain = t_atomic = float("inf")
        for _ in range(args.repeat):
            t_plain = min(t_plain, _best(plain_save, 1))
            t_atomic = min(t_atomic, _best(lambda: entry.update(atomic_write(hashed, state)), 1))
        gb = entry["size"] / 1e9
        with open(hashed, "rb") as f:
            data = f.read()
        speeds = {name: gb * 1e3 / _best(fn, args.repeat)
                  for name, fn in _checksums(data).items()}
        del data
        manifest = Manifest(work, {"hashed.pt": entry})
        t_verify = _best(lambda: manifest.verify("hashed.pt"), args.repeat)
        t_load = _best(lambda: torch.load(hashed, map_location="cpu", weights_only=True),
                       args.repeat)
        assert file_checksum(hashed) == entry["checksum"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"file: {entry['size'] / 1e6:.1f} MB, torch {torch.__version__}, {os.cpu_count()} CPUs")
    for name, mbps in sorted(speeds.items(), key=lambda kv: -kv[1]):
        print(f"checksum {name:10s} {mbps:8.0f} MB/s")
    print(f"save: torch.save+fsync {t_plain / gb:.3f} s/GB, atomic_write (checksummed) "
          f"{t_atomic / gb:.3f} s/GB, overhead {(t_atomic - t_plain) / gb:+.3f} s/GB")
    print(f"load: verify {t_verify / gb:.3f} s/GB (page cache warm), torch.load "
          f"{t_load / gb:.3f} s/GB")
    print(f"verify_s_per_gb={t_verify / gb:.3f} load_s_per_gb={t_load / gb:.3f} "
          f"save_overhead_s_per_gb={(t_atomic - t_plain) / gb:.3f} "
          + " ".join(f"{k}_mb_s={v:.0f}" for k, v in sorted(speeds.items())))


if __name__ == "__main__":
    main()
