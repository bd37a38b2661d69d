"""Key-value cache for incremental decoding."""
import torch


class InferenceParams:
    """Keys and values of every attention layer for the tokens seen so far.

    Pass the same instance to each ``GPTModel.forward`` call of one generation:
    the first call takes the prompt (positions 0..s-1), each later call only
    the new tokens; ``sequence_len_offset`` is the number of cached positions
    and must be advanced by the caller (``advance``) after each forward.
    Caches are allocated lazily per attention module, [b, ng/tp, max_len, hn]: one
    per K/V head (query group; ng = np for multi-head attention).
    """

    def __init__(self, max_batch_size, max_sequence_length):
        self.max_batch_size = int(max_batch_size)
        self.max_sequence_length = int(max_sequence_length)
        self.sequence_len_offset = 0
        self.key_value_memory = {}

    def advance(self, num_tokens):
        """Record that ``num_tokens`` new positions are now cached."""
        self.sequence_len_offset += int(num_tokens)

    def update(self, module, k, v):
        """Store k, v ([b, np, s, hn]) of ``module`` at the current offset; return all cached k, v."""
        b, heads, s, hn = k.shape
        start, end = self.sequence_len_offset, self.sequence_len_offset + s
        if end > self.max_sequence_length:
            raise ValueError(f"key-value cache holds {self.max_sequence_length} positions, "
                             f"{end} requested")
        if b > self.max_batch_size:
            raise ValueError(f"key-value cache holds batch {self.max_batch_size}, got {b}")
        cache = self.key_value_memory.get(module)
        if cache is None:
            shape = (self.max_batch_size, heads, self.max_sequence_length, hn)
            cache = (torch.empty(shape, dtype=k.dtype, device=k.device),
                     torch.empty(shape, dtype=v.dtype, device=v.device))
            self.key_value_memory[module] = cache
        k_cache, v_cache = cache
        k_cache[:b, :, start:end] = k
        v_cache[:b, :, start:end] = v
        return k_cache[:b, :, :end], v_cache[:b, :, :end]
