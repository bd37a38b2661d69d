"""Input embedding: vocab-parallel word embeddings plus learned positions (none with RoPE)."""
import torch
import torch.nn.functional as F

from megatron import mpu
from megatron.model.utils import (SEED_SLOT_POSITION_EMBEDDINGS, SEED_SLOT_WORD_EMBEDDINGS,
                                  dropout_rng_context, init_method_normal, seeded_init)


def prefix_stable_init_normal(std):
    """N(0, std) init whose values do not depend on how many rows follow.

    The padded vocabulary size depends on TP, and the real rows must start the
    same in every layout. CPU ``normal_`` draws its uniforms in order but, when
    the element count is not a multiple of 16, redraws the last 16 values, so
    a tensor's draw is a prefix of a larger one's only for multiples of 16.
    Drawing into a buffer rounded up to 16 makes it a prefix always (and equals
    a plain ``normal_`` when the count already is a multiple of 16).
    """
    def init_(tensor):
        n = tensor.numel()
        buf = torch.empty(-(-n // 16) * 16, dtype=tensor.dtype, device=tensor.device)
        buf.normal_(mean=0.0, std=std)
        with torch.no_grad():
            tensor.copy_(buf[:n].view_as(tensor))
        return tensor
    return init_


def build_word_embeddings(cfg, padded_vocab_size):
    """The vocab-parallel word embedding, seeded by its global position.

    Used by the first stage and, for the tied output layer, by a last stage
    that is not the first: both get the same initial weight. Its real rows are
    the same whatever the padding (``prefix_stable_init_normal``).
    """
    with seeded_init(cfg.training.seed, SEED_SLOT_WORD_EMBEDDINGS):
        return mpu.VocabParallelEmbedding(
            padded_vocab_size, cfg.model.hidden_size,
            init_method=prefix_stable_init_normal(cfg.model.init_method_std),
            params_dtype=torch.float32)


class Embedding(torch.nn.Module):
    """Word + position embeddings and dropout; returns hidden states [s, b, h].

    The learned position table exists only for ``position_embedding_type:
    learned``; with RoPE, positions enter in attention instead (model/rotary.py).

    With ``sequence_parallel`` the output is this rank's sequence shard
    [s/tp, b, h] and its dropout runs under the model-parallel RNG (each rank
    drops different positions of a different shard). Without it, the output is
    replicated across TP ranks and dropout uses the default generator, which
    is in the same state on every TP rank.
    """

    def __init__(self, cfg, padded_vocab_size, sequence_parallel=False):
        super().__init__()
        m = cfg.model
        self.word_embeddings = build_word_embeddings(cfg, padded_vocab_size)
        self.position_embeddings = None
        if m.position_embedding_type == "learned":
            max_positions = m.max_position_embeddings or m.seq_length
            with seeded_init(cfg.training.seed, SEED_SLOT_POSITION_EMBEDDINGS):
                self.position_embeddings = torch.nn.Embedding(max_positions, m.hidden_size)
                init_method_normal(m.init_method_std)(self.position_embeddings.weight.data)
        self.dropout = m.hidden_dropout
        self.sequence_parallel = sequence_parallel

    def forward(self, input_ids, position_ids):
        """input_ids, position_ids: [b, s] -> [s, b, h] (or [s/tp, b, h] with SP)."""
        x = self.word_embeddings(input_ids)
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(position_ids)
        x = x.transpose(0, 1).contiguous()
        if self.sequence_parallel:
            x = mpu.scatter_to_sequence_parallel_region(x)
        with dropout_rng_context(self.sequence_parallel, self.training and self.dropout > 0):
            return F.dropout(x, p=self.dropout, training=self.training)
