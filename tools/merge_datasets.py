"""Concatenate every ``.bin``/``.idx`` pair in a directory into one dataset.

Example:
    python tools/merge_datasets.py --input shards/ --output-prefix data/all_text_document

Pairs are merged in sorted order of their prefixes; all must share one token
dtype. The output is written under temporary names and renamed at the end.
"""

import argparse
import os
import sys

from megatron.cli import command
from megatron.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, IndexedDatasetError
from megatron.errors import UserError


class MergeError(UserError):
    """Inputs that cannot be merged (a missing directory or half pair, differing dtypes)."""


def find_prefixes(directory):
    """Sorted prefixes of the complete ``.bin``/``.idx`` pairs in ``directory``."""
    if not os.path.isdir(directory):
        raise MergeError(f"input directory not found: {directory}")
    names = set(os.listdir(directory))
    prefixes = []
    for name in sorted(names):
        stem, ext = os.path.splitext(name)
        if ext == ".idx":
            if stem + ".bin" not in names:
                raise MergeError(f"{os.path.join(directory, name)} has no matching .bin")
            prefixes.append(os.path.join(directory, stem))
        elif ext == ".bin" and stem + ".idx" not in names:
            raise MergeError(f"{os.path.join(directory, name)} has no matching .idx")
    if not prefixes:
        raise MergeError(f"no .bin/.idx pairs in {directory}")
    return prefixes


def merge(directory, output_prefix):
    """Merge the pairs of ``directory`` into ``output_prefix``; returns the prefixes merged."""
    prefixes = find_prefixes(directory)
    out_abs = os.path.abspath(output_prefix)
    if any(os.path.abspath(p) == out_abs for p in prefixes):
        raise MergeError(f"output prefix {output_prefix} is one of the inputs")
    try:
        dtypes = [(p, IndexedDataset(p).dtype) for p in prefixes]
    except IndexedDatasetError as e:
        raise MergeError(str(e)) from None
    first_prefix, dtype = dtypes[0]
    for p, dt in dtypes[1:]:
        if dt != dtype:
            raise MergeError(f"token dtypes differ: {first_prefix} holds {dtype.name}, {p} holds {dt.name}")
    tag = f".tmp{os.getpid()}"
    bin_tmp, idx_tmp = output_prefix + tag + ".bin", output_prefix + tag + ".idx"
    ok = False
    try:
        builder = IndexedDatasetBuilder(bin_tmp, dtype)
        for p in prefixes:
            builder.add_index(p)
        builder.finalize(idx_tmp)
        os.replace(bin_tmp, output_prefix + ".bin")
        os.replace(idx_tmp, output_prefix + ".idx")
        ok = True
    finally:
        if not ok:
            for path in (bin_tmp, idx_tmp):
                if os.path.exists(path):
                    os.remove(path)
    return prefixes


@command
def main(argv=None):
    """Command line entry; user errors print one line and exit 1."""
    p = argparse.ArgumentParser(description="Merge every .bin/.idx pair in a directory, in sorted order.")
    p.add_argument("--input", required=True, help="directory holding the .bin/.idx pairs")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    args = p.parse_args(argv)
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    if not os.path.isdir(out_dir):
        raise MergeError(f"output directory does not exist: {out_dir}")
    prefixes = merge(args.input, args.output_prefix)
    print(f"merged {len(prefixes)} datasets into {args.output_prefix}.bin/.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
