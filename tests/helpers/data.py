"""An indexed dataset whose token ids name their own positions."""
import numpy as np

from megatron.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder


def make_dataset(prefix, num_docs=120, seed=0, multi_sequence=False):
    """Documents of random lengths whose token ids are their global positions + 1 (0 is EOD)."""
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    pos = 1
    for d in range(num_docs):
        n = int(rng.integers(1, 50))
        tokens = np.arange(pos, pos + n)
        pos += n
        if multi_sequence and n > 2 and d % 3 == 0:
            builder.add_document(tokens, [n // 2, n - n // 2])
        else:
            builder.add_item(tokens)
            builder.end_document()
    builder.finalize(prefix + ".idx")
    return IndexedDataset(prefix)
