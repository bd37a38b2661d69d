"""Checkpoint integrity: each iteration's `manifest.json` and its verification.

A save writes `iter_N.tmp/manifest.json` (every file of the iteration by path
relative to the iteration folder: its size and checksum, checksum.py) once every
rank has written its files and before the folder is renamed, so a renamed
checkpoint always has a complete manifest. Every reader (training resume, the
offline converters, the inference loader, tools/checkpoint_verify.py) checks a
file against it before unpickling it, and refuses it in one line naming the
file and the reason: missing, truncated, failing its checksum, or not
unpickling. A checkpoint written before manifests existed has none and is read
unverified.
"""
import json
import os

from megatron.checkpoint.checksum import ALGORITHM, file_checksum
from megatron.checkpoint.files import MODEL_FILE, CheckpointError, atomic_write, load_file

MANIFEST = "manifest.json"
_FORMAT = 1


def file_path(it_dir, rel):
    """The path on disk of `rel` ("mp_rank_00/model_optim_rng.pt") inside `it_dir`."""
    return os.path.join(it_dir, *rel.split("/"))


def write_manifest(it_dir, iteration, entries):
    """Write `it_dir/manifest.json` listing `entries` ({relative path: entry})."""
    doc = {"format": _FORMAT, "algorithm": ALGORITHM, "iteration": iteration,
           "files": dict(sorted(entries.items()))}
    atomic_write(os.path.join(it_dir, MANIFEST), json.dumps(doc, indent=1) + "\n")


class Manifest:
    """The files of one checkpoint iteration with their sizes and checksums."""

    def __init__(self, it_dir, files):
        self.it_dir, self.files = it_dir, files
        self.path = os.path.join(it_dir, MANIFEST)

    def __contains__(self, rel):
        return rel in self.files

    def verify(self, rel):
        """Raise CheckpointError (one line naming the file) unless `rel` is on disk with
        the size and checksum the manifest lists for it."""
        path = file_path(self.it_dir, rel)
        entry = self.files.get(rel)
        if entry is None:
            raise CheckpointError(f"checkpoint file {path} is not listed in {self.path}")
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint file {path} is missing (listed in {MANIFEST})")
        size = os.path.getsize(path)
        if size != entry["size"]:
            how = "truncated" if size < entry["size"] else "grew after it was saved"
            raise CheckpointError(f"checkpoint file {path} is {size} bytes but {MANIFEST} "
                                  f"says {entry['size']} ({how})")
        got = file_checksum(path)
        if got != entry["checksum"]:
            raise CheckpointError(f"checkpoint file {path} fails its checksum ({ALGORITHM} "
                                  f"{got}, {MANIFEST} says {entry['checksum']}): its bytes "
                                  f"changed after it was saved")
        return entry["size"]


def read_manifest(it_dir, verify=True):
    """The Manifest of the iteration folder `it_dir`; None when it has none (saved before
    manifests existed); CheckpointError when it cannot be read, or None then too when
    not `verify` (checkpoint.verify=false skips the checks)."""
    try:
        return _read_manifest(it_dir)
    except CheckpointError:
        if verify:
            raise
        return None


def _read_manifest(it_dir):
    path = os.path.join(it_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            doc = json.load(f)
        files, algorithm = doc["files"], doc["algorithm"]
        for rel, entry in files.items():
            if not (isinstance(entry["size"], int) and isinstance(entry["checksum"], str)):
                raise ValueError(f"bad entry for {rel}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"checkpoint manifest {path} is unreadable "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                              ) from None
    if algorithm != ALGORITHM:
        raise CheckpointError(f"checkpoint manifest {path} uses checksum {algorithm!r}; this "
                              f"version verifies {ALGORITHM!r} (set checkpoint.verify=false to skip)")
    return Manifest(it_dir, files)


def load_verified(it_dir, rel, manifest, verify=True):
    """Verify `rel` against `manifest` (when there is one and `verify`), then load it."""
    if verify and manifest is not None:
        manifest.verify(rel)
    return load_file(file_path(it_dir, rel))


def _rank_files(it_dir):
    """Every checkpoint file under the rank folders of `it_dir`, by relative path."""
    rels = []
    for d in sorted(os.listdir(it_dir)):
        if d.startswith("mp_rank_") and os.path.isdir(os.path.join(it_dir, d)):
            rels += [f"{d}/{n}" for n in sorted(os.listdir(os.path.join(it_dir, d)))
                     if n.endswith(".pt")]
    return rels


def verify_iteration(it_dir):
    """Check every file of the checkpoint folder `it_dir`; return one line saying what
    was checked, or raise CheckpointError naming the first bad file and the reason.

    With a manifest every listed file is checked (size, checksum). Without one (saved
    before manifests existed) every rank file is unpickled instead, which finds a
    truncated file but not changed bytes."""
    if not os.path.isdir(it_dir):
        raise CheckpointError(f"checkpoint folder {it_dir} is missing")
    manifest = read_manifest(it_dir)
    if manifest is None:
        rels = _rank_files(it_dir)
        if not rels:
            raise CheckpointError(f"checkpoint folder {it_dir} holds no {MODEL_FILE}")
        for rel in rels:
            load_file(file_path(it_dir, rel))
        return f"not verified (no {MANIFEST}: saved before checksums); its {len(rels)} files load"
    total = sum(manifest.verify(rel) for rel in sorted(manifest.files))
    return f"OK ({len(manifest.files)} files, {total / 1e6:.1f} MB, {ALGORITHM} verified)"
