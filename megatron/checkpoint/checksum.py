"""The checksum of checkpoint files: xxHash's XXH3 (64 bit) of every byte, and its size.

Why XXH3: measured on this project's 2-core CPU machine in 16 MB chunks
(bench/RESULTS.md, "Checkpoint integrity"), XXH3 ran at 2.8-8 GB/s, crc32c (the
`crc32c` package) at 3.4-10.6 GB/s, zlib's crc32 at 0.6-2.9 GB/s and sha256 at
0.4-1.1 GB/s; `xxhash` is a small BSD-licensed wheel on every platform. The
checksum is computed while a file is written (``HashingFile``), so a save reads
nothing back, and again while it is read (``file_checksum``) to verify it.
"""
import xxhash

ALGORITHM = "xxh3_64"
CHUNK_BYTES = 16 << 20


def new_hash():
    """A fresh running checksum (``update(bytes)``, ``hexdigest()``)."""
    return xxhash.xxh3_64()


class HashingFile:
    """A binary file opened for writing that checksums and counts what goes through it.

    ``torch.save`` writes a zip archive front to back through ``write``, so the
    checksum is that of the file's bytes, in one pass."""

    def __init__(self, f):
        self.f, self.hash, self.size = f, new_hash(), 0

    def write(self, data):
        """Write ``data`` (bytes-like) and fold it into the checksum."""
        self.hash.update(data)
        self.size += memoryview(data).nbytes
        return self.f.write(data)

    def flush(self):
        """Flush the underlying file."""
        self.f.flush()

    def fileno(self):
        """The underlying file's descriptor."""
        return self.f.fileno()

    def entry(self):
        """The manifest entry of what was written: ``{"size": bytes, "checksum": hex}``."""
        return {"size": self.size, "checksum": self.hash.hexdigest()}


def bytes_entry(data):
    """The manifest entry of ``data`` (bytes)."""
    h = new_hash()
    h.update(data)
    return {"size": len(data), "checksum": h.hexdigest()}


def file_checksum(path):
    """The checksum (hex) of the file at ``path``, read in 16 MB chunks."""
    h = new_hash()
    buf = bytearray(CHUNK_BYTES)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()
