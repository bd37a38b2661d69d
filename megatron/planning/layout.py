"""What a plan is about: the model's shape and one parallel layout of it.

``ModelShape`` holds the numbers the memory and time models need (from a
``Config`` and the tokenizer's vocabulary); ``Layout`` one way of running it:
TP x PP x VP x DP, micro batch, recomputation, sequence parallelism,
distributed optimizer, precision. ``Layout.overrides()`` gives the config
fields that select it, so a plan can be written back as a config overlay.
"""
from dataclasses import dataclass, replace
from typing import Optional

from megatron.errors import UserError

GPT2_VOCAB_SIZE = 50257  # the GPT-2 BPE vocabulary (encoder.json of the released model)
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def true_vocab_size(cfg, vocab_size=None):
    """The tokenizer's (unpadded) vocabulary size for ``cfg``: ``vocab_size`` when given,
    else the tokenizer's if it can be built, else GPT-2's 50257 for the GPT-2 BPE tokenizer
    (its files are often not downloaded yet when a run is planned)."""
    if vocab_size is not None:
        return int(vocab_size)
    if cfg.tokenizer.type == "NullTokenizer" and cfg.tokenizer.vocab_size:
        return int(cfg.tokenizer.vocab_size)
    from megatron.tokenizer import build_tokenizer
    try:
        return build_tokenizer(cfg.tokenizer).vocab_size
    except (ValueError, OSError) as e:
        if cfg.tokenizer.type == "GPT2BPETokenizer":
            return GPT2_VOCAB_SIZE
        raise UserError(f"cannot learn the vocabulary size of tokenizer.type="
                        f"{cfg.tokenizer.type} ({e}); give it (--vocab-size)") from None


@dataclass(frozen=True)
class ModelShape:
    """A GPT's shape: layers, hidden size h, heads a, FFN size, sequence s, the tokenizer's
    vocabulary (padded per TP size by ``padded_vocab``), position embeddings, dropout, and
    the decoder options of docs/models.md (defaults: GPT-2's block): ``num_query_groups``
    (None: one per head), ``activation``, ``normalization``, ``position_embedding_type``
    (with ``rotary_dim``, the dims of a head RoPE rotates), ``add_bias_linear``,
    ``untie_embeddings_and_output_weights``."""
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    seq_length: int
    vocab_size: int
    max_position_embeddings: int
    make_vocab_size_divisible_by: int = 128
    dropout: bool = True
    num_query_groups: Optional[int] = None
    activation: str = "gelu_tanh"
    normalization: str = "LayerNorm"
    position_embedding_type: str = "learned"
    rotary_dim: int = 0
    add_bias_linear: bool = True
    untie_embeddings_and_output_weights: bool = False

    @classmethod
    def from_config(cls, cfg, vocab_size):
        """The shape of ``cfg.model`` with the tokenizer's vocabulary size ``vocab_size``."""
        m = cfg.model
        rope = m.position_embedding_type == "rope"
        return cls(num_layers=m.num_layers, hidden_size=m.hidden_size,
                   num_attention_heads=m.num_attention_heads,
                   ffn_hidden_size=m.ffn_hidden_size or 4 * m.hidden_size,
                   seq_length=m.seq_length, vocab_size=int(vocab_size),
                   max_position_embeddings=m.max_position_embeddings or m.seq_length,
                   make_vocab_size_divisible_by=m.make_vocab_size_divisible_by,
                   dropout=(m.hidden_dropout > 0 or m.attention_dropout > 0),
                   num_query_groups=m.num_query_groups, activation=m.activation,
                   normalization=m.normalization,
                   position_embedding_type=m.position_embedding_type,
                   rotary_dim=m.rotary_dim() if rope else 0,
                   add_bias_linear=m.add_bias_linear,
                   untie_embeddings_and_output_weights=m.untie_embeddings_and_output_weights)

    @property
    def query_groups(self):
        """K/V heads (groups of query heads sharing them): ``num_query_groups`` or one per head."""
        return self.num_query_groups or self.num_attention_heads

    @property
    def kv_size(self):
        """Width of the keys (and of the values): query groups x head dim (h without GQA)."""
        return self.query_groups * (self.hidden_size // self.num_attention_heads)

    @property
    def gated(self):
        """Whether the MLP is gated (SwiGLU: gate and up projections, each ffn wide)."""
        return self.activation == "swiglu"

    @property
    def rope(self):
        """Whether positions enter as RoPE (no position table)."""
        return self.position_embedding_type == "rope"

    @property
    def untied(self):
        """Whether the output layer has its own weight (else it is the word embedding)."""
        return self.untie_embeddings_and_output_weights

    def norm_params(self):
        """Parameters of one norm: LayerNorm's weight and bias, RMSNorm's weight."""
        return self.hidden_size * (1 if self.normalization == "RMSNorm" else 2)

    def padded_vocab(self, tp):
        """Rows of the word embedding at tensor-parallel size ``tp`` (as the tokenizer pads)."""
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple

    def layer_params(self, tp):
        """Parameters of one transformer layer on one TP rank: the sharded QKV (K and V of
        ``query_groups`` heads), dense and MLP weights (SwiGLU: gate and up) and column
        biases, plus the replicated row biases and norms."""
        h, f = self.hidden_size, self.ffn_hidden_size
        qkv = h + 2 * self.kv_size
        up = (2 if self.gated else 1) * f
        split = h * qkv + h * h + h * up + f * h
        replicated = 2 * self.norm_params()
        if self.add_bias_linear:
            split += qkv + up
            replicated += 2 * h
        return split // tp + replicated

    def first_stage_params(self, tp):
        """Parameters the first pipeline stage holds beyond its layers: the word embedding
        shard (and the learned position table)."""
        h = self.hidden_size
        return self.padded_vocab(tp) // tp * h + (0 if self.rope else self.max_position_embeddings * h)

    def last_stage_params(self, tp, pp):
        """Parameters the last pipeline stage holds beyond its layers: the final norm and the
        output layer's shard (the untied one; the tied embedding's copy when p > 1)."""
        n = self.norm_params()
        if self.untied or pp > 1:
            n += self.padded_vocab(tp) // tp * self.hidden_size
        return n

    def num_parameters(self):
        """Parameters of the whole model at TP=1 (a tied output layer counted once)."""
        return (self.num_layers * self.layer_params(1) + self.first_stage_params(1)
                + self.last_stage_params(1, 1))

    def flops_kwargs(self):
        """The shape fields ``megatron.planning.flops`` takes beyond h, s, l and V."""
        return dict(ffn_hidden_size=self.ffn_hidden_size,
                    num_attention_heads=self.num_attention_heads,
                    num_query_groups=self.query_groups, gated_mlp=self.gated)


@dataclass(frozen=True)
class Layout:
    """One way to run a model on ``tp x pp x dp`` devices.

    ``vp``: model chunks per pipeline rank (1 = no interleaving); ``micro_batch`` samples
    per micro batch; ``num_microbatches`` per DP rank and step; ``recompute`` none /
    selective / full; ``grad_fp32``: the DP grad buffer is fp32 whatever the precision.
    """
    tp: int = 1
    pp: int = 1
    dp: int = 1
    vp: int = 1
    micro_batch: int = 1
    num_microbatches: int = 1
    recompute: str = "none"
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    precision: str = "fp32"
    grad_fp32: bool = True

    @classmethod
    def from_config(cls, cfg, world_size):
        """The layout ``cfg`` runs on ``world_size`` ranks (``cfg`` already finalized)."""
        p, t = cfg.parallel, cfg.training
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        dp = world_size // (tp * pp)
        return cls(tp=tp, pp=pp, dp=dp, vp=p.virtual_pipeline_model_parallel_size or 1,
                   micro_batch=t.micro_batch_size,
                   num_microbatches=t.global_batch_size // (t.micro_batch_size * dp),
                   recompute=t.recompute, sequence_parallel=bool(p.sequence_parallel and tp > 1),
                   distributed_optimizer=p.distributed_optimizer, precision=t.precision,
                   grad_fp32=p.accumulate_allreduce_grads_in_fp32)

    @property
    def world_size(self):
        """Devices the layout occupies."""
        return self.tp * self.pp * self.dp

    @property
    def global_batch(self):
        """Samples per optimizer step."""
        return self.micro_batch * self.num_microbatches * self.dp

    @property
    def dtype_bytes(self):
        """Bytes of one parameter / activation element in the run's precision."""
        return DTYPE_BYTES[self.precision]

    def with_(self, **changes):
        """A copy with some fields changed."""
        return replace(self, **changes)

    def overrides(self):
        """The config fields that select this layout, as ``{"section.key": value}``."""
        return {
            "parallel.tensor_model_parallel_size": self.tp,
            "parallel.pipeline_model_parallel_size": self.pp,
            "parallel.virtual_pipeline_model_parallel_size": self.vp if self.vp > 1 else None,
            "parallel.sequence_parallel": self.sequence_parallel,
            "parallel.distributed_optimizer": self.distributed_optimizer,
            "training.micro_batch_size": self.micro_batch,
            "training.global_batch_size": self.global_batch,
            "training.recompute": self.recompute,
        }

    def describe(self):
        """A short name: ``TP8 PP1 DP64 mb8 full`` (+ VP, SP, DO when used)."""
        parts = [f"TP{self.tp}", f"PP{self.pp}"]
        if self.vp > 1:
            parts.append(f"VP{self.vp}")
        parts += [f"DP{self.dp}", f"mb{self.micro_batch}", self.recompute]
        if self.sequence_parallel:
            parts.append("SP")
        if self.distributed_optimizer:
            parts.append("DO")
        return " ".join(parts)


def config_for(cfg, layout):
    """A copy of ``cfg`` switched to ``layout`` and finalized for its world size (the
    config's own validation says what does not divide: ConfigError)."""
    from megatron.config import Config, apply_overrides, finalize
    d = cfg.to_dict()
    apply_overrides(d, [f"{k}={'null' if v is None else v}" for k, v in layout.overrides().items()])
    d["training"]["precision"] = layout.precision
    d["parallel"]["accumulate_allreduce_grads_in_fp32"] = layout.grad_fp32
    if d["training"].get("train_samples") is not None:
        d["training"]["train_iters"] = None  # re-derived from the new global batch
    out = Config.from_dict(d)
    if out.training.train_iters is None and out.training.train_samples is None:
        out.training.train_iters = 1
    return finalize(out, layout.world_size)


__all__ = ["ModelShape", "Layout", "config_for", "true_vocab_size", "GPT2_VOCAB_SIZE",
           "DTYPE_BYTES"]
