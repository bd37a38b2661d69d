"""GPTModel: a GPT-2 (or Llama-style) decoder built from tensor-parallel layers, one pipeline
chunk at a time."""
import torch
import torch.nn.functional as F

from megatron import mpu
from megatron.model.embedding import Embedding, build_word_embeddings, prefix_stable_init_normal
from megatron.model.norms import build_norm
from megatron.model.rotary import RotaryEmbedding
from megatron.model.transformer import ParallelTransformerLayer
from megatron.model.utils import (SEED_SLOT_FINAL_LAYERNORM, SEED_SLOT_OUTPUT_LAYER,
                                  layer_position, mark_replicated, mark_sequence_parallel,
                                  seeded_init, stage_layer_range)

RECOMPUTE_CHOICES = ("none", "full", "selective")


def check_model_layout(cfg, padded_vocab_size, tensor_parallel_size):
    """Raise ValueError (one line, with the numbers) when the shapes do not split over TP."""
    m = cfg.model
    h, heads, tp = m.hidden_size, m.num_attention_heads, tensor_parallel_size
    ffn = m.ffn_hidden_size or 4 * h
    if h % heads != 0:
        raise ValueError(f"hidden_size={h} is not divisible by num_attention_heads={heads}")
    if heads % tp != 0:
        raise ValueError(f"num_attention_heads={heads} is not divisible by "
                         f"tensor_model_parallel_size={tp}")
    groups = m.query_groups()
    if heads % groups != 0:
        raise ValueError(f"num_attention_heads={heads} is not divisible by "
                         f"num_query_groups={groups}")
    if groups % tp != 0:
        raise ValueError(f"num_query_groups={groups} is not divisible by "
                         f"tensor_model_parallel_size={tp}")
    if ffn % tp != 0:
        raise ValueError(f"ffn_hidden_size={ffn} is not divisible by "
                         f"tensor_model_parallel_size={tp}")
    if padded_vocab_size % tp != 0:
        raise ValueError(f"padded_vocab_size={padded_vocab_size} is not divisible by "
                         f"tensor_model_parallel_size={tp}")
    if cfg.parallel.sequence_parallel and m.seq_length % tp != 0:
        raise ValueError(f"sequence_parallel needs seq_length={m.seq_length} divisible by "
                         f"tensor_model_parallel_size={tp}")
    max_positions = m.max_position_embeddings or m.seq_length
    if m.seq_length > max_positions:
        raise ValueError(f"seq_length={m.seq_length} exceeds "
                         f"max_position_embeddings={max_positions}")
    if cfg.training.recompute not in RECOMPUTE_CHOICES:
        raise ValueError(f"training.recompute={cfg.training.recompute!r} is not one of "
                         f"{', '.join(RECOMPUTE_CHOICES)}")


class GPTModel(torch.nn.Module):
    """GPT-2 (learned positions, pre-LN layers, final LN, output layer tied to the word embedding),
    or with ``cfg.model``'s options a Llama-style decoder (RoPE, RMSNorm, SwiGLU, grouped-query
    attention, no biases, an untied ``output_layer``); docs/models.md lists them.

    One instance is one pipeline model chunk: the layers it holds are chosen
    from ``mpu.parallel_state`` (pipeline rank and virtual rank), the embedding
    exists when ``pre_process``, the final norm, output layer and loss when
    ``post_process``. The untied output layer (``output_layer.weight``, its own
    init seed) is vocab-parallel like the word embedding and goes through the same
    gather, matmul and padding mask. Every module is initialized from a seed derived from
    ``cfg.training.seed`` and its global position, and parameter names use
    global layer indices, so weights and ``state_dict`` keys do not depend on
    the TP / PP layout.

    ``forward(input_ids, position_ids, labels=None, inference_params=None)`` returns, on a last stage,
    the per-token loss [b, s] (fp32) when ``labels`` is given, else the
    vocab-parallel logits [b, s, V/TP]; on other stages, hidden states
    [s, b, h] ([s/tp, b, h] with sequence parallelism).

    ``vocab_size`` is the true (tokenizer's) vocabulary size, ``padded_vocab_size``
    the number of embedding rows (a multiple of make_vocab_size_divisible_by x TP,
    so it depends on TP). The logits of the padding ids [vocab_size,
    padded_vocab_size) are set to -inf on every TP rank's shard before the loss
    and in the returned logits, so the softmax, the loss, every real gradient and
    any sampling are the same whatever the padding. ``vocab_size`` None means
    there is no padding to mask (== ``padded_vocab_size``).
    """

    def __init__(self, cfg, padded_vocab_size, pre_process=True, post_process=True,
                 vocab_size=None):
        super().__init__()
        ps = mpu.parallel_state
        tp = ps.get_tensor_model_parallel_world_size()
        check_model_layout(cfg, padded_vocab_size, tp)
        if vocab_size is None:
            vocab_size = padded_vocab_size
        if not 0 < vocab_size <= padded_vocab_size:
            raise ValueError(f"vocab_size={vocab_size} must be in [1, padded_vocab_size="
                             f"{padded_vocab_size}]")
        self.cfg = cfg
        self.padded_vocab_size = padded_vocab_size
        self.vocab_size = int(vocab_size)
        self.pre_process = pre_process
        self.post_process = post_process
        self.sequence_parallel = bool(cfg.parallel.sequence_parallel) and tp > 1
        self.recompute = cfg.training.recompute
        self.input_tensor = None

        pp_size = ps.get_pipeline_model_parallel_world_size()
        vp_size = ps.get_virtual_pipeline_model_parallel_world_size()
        start, end = stage_layer_range(
            cfg.model.num_layers, pp_size, ps.get_pipeline_model_parallel_rank(),
            vp_size, ps.get_virtual_pipeline_model_parallel_rank())
        self.layer_range = (start, end)

        self.untied = bool(cfg.model.untie_embeddings_and_output_weights)
        if pre_process:
            self.embedding = Embedding(cfg, padded_vocab_size, self.sequence_parallel)
        elif post_process and not self.untied:
            # A last stage that is not the first keeps its own copy of the word
            # embedding for the output layer, initialized equal to the first
            # stage's (same seed); the embedding group keeps their grads equal.
            self.embedding = torch.nn.Module()
            self.embedding.word_embeddings = build_word_embeddings(cfg, padded_vocab_size)
            self.embedding.word_embeddings.weight.shared_embedding = True
        if (pre_process or post_process) and not self.untied:
            self.embedding.word_embeddings.weight.tied_embedding = True
        self.rotary = None
        if cfg.model.position_embedding_type == "rope":
            self.rotary = RotaryEmbedding(cfg.model.rotary_dim(), cfg.model.rotary_base)

        layers = {}
        for i in range(start, end):
            with seeded_init(cfg.training.seed, layer_position(i)):
                layers[str(i)] = ParallelTransformerLayer(cfg, self.sequence_parallel)
            if cfg.training.compile:
                # Module.compile keeps the parameter names (no "_orig_mod.").
                layers[str(i)].compile()
        self.layers = torch.nn.ModuleDict(layers)

        if post_process:
            with seeded_init(cfg.training.seed, SEED_SLOT_FINAL_LAYERNORM):
                self.final_layernorm = build_norm(cfg.model)
            if self.sequence_parallel:
                mark_sequence_parallel(self.final_layernorm.parameters())
            if self.untied:
                # A column-parallel linear is the vocab-parallel weight [V/tp, h] with its
                # TP marks; _output_layer applies it (no bias) as it does the tied one.
                with seeded_init(cfg.training.seed, SEED_SLOT_OUTPUT_LAYER):
                    self.output_layer = mpu.ColumnParallelLinear(
                        cfg.model.hidden_size, padded_vocab_size, bias=False,
                        gather_output=False,
                        init_method=prefix_stable_init_normal(cfg.model.init_method_std))
        mark_replicated(self)

    def set_input_tensor(self, input_tensor):
        """Set the hidden states a non-first pipeline stage starts from."""
        if isinstance(input_tensor, (list, tuple)):
            assert len(input_tensor) == 1, "one model chunk takes one input tensor"
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    def word_embeddings_weight(self):
        """The (local shard of the) word-embedding weight (the tied output layer's)."""
        return self.embedding.word_embeddings.weight

    def output_weight(self):
        """The (local shard of the) output layer's weight [V/tp, h]: the untied
        ``output_layer``'s, else the word embedding's."""
        return self.output_layer.weight if self.untied else self.word_embeddings_weight()

    def _default_position_ids(self, input_ids, inference_params):
        # 0..s-1, after the cached positions when generating with a key-value cache.
        start = inference_params.sequence_len_offset if inference_params is not None else 0
        position_ids = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        return position_ids.unsqueeze(0).expand_as(input_ids)

    def forward(self, input_ids, position_ids=None, labels=None, inference_params=None):
        """See the class docstring; ``position_ids`` None means 0..s-1 (after the
        cached positions when ``inference_params``, a key-value cache, is given)."""
        if position_ids is None and (self.pre_process or self.rotary is not None):
            position_ids = self._default_position_ids(input_ids, inference_params)
        # RoPE: every stage rotates with the batch's own positions.
        rotary = self.rotary(position_ids) if self.rotary is not None else None
        if self.pre_process:
            hidden_states = self.embedding(input_ids, position_ids)
        else:
            if self.input_tensor is None:
                raise RuntimeError("a non-first pipeline stage needs set_input_tensor() "
                                   "before forward")
            hidden_states = self.input_tensor

        for layer in self.layers.values():
            if inference_params is not None:
                hidden_states = layer(hidden_states, rotary, inference_params=inference_params)
            elif self.recompute == "full" and self.training and torch.is_grad_enabled():
                hidden_states = mpu.checkpoint(layer, hidden_states, rotary)
            else:
                hidden_states = layer(hidden_states, rotary)

        if not self.post_process:
            return hidden_states
        hidden_states = self.final_layernorm(hidden_states)
        return self._output_layer(hidden_states, labels)

    def _output_layer(self, hidden_states, labels):
        # The logits' grad w.r.t. the hidden states is a partial sum over the
        # vocab shards: f (copy) all-reduces it in backward; with sequence
        # parallelism the all-gather's backward reduce-scatters it instead.
        if self.sequence_parallel:
            hidden_states = mpu.gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=True)
        else:
            hidden_states = mpu.copy_to_tensor_model_parallel_region(hidden_states)
        logits = F.linear(hidden_states, self.output_weight())  # [s, b, V/tp]
        logits = self._mask_padded_vocab(logits)
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        # The cross entropy upcasts to fp32 itself; fp32 logits, a temporary nothing
        # else reads (the matmul's backward does not need its output), are reused in place.
        loss = mpu.vocab_parallel_cross_entropy(logits, labels.transpose(0, 1).contiguous(),
                                                inplace=True)
        return loss.transpose(0, 1).contiguous()

    def _mask_padded_vocab(self, logits):
        """Set this rank's logits of padding ids (>= vocab_size) to -inf, in place.

        Rank r holds the ids [r * V/TP, (r + 1) * V/TP); only the tail of the
        vocabulary is padding, so the masked columns are a (possibly empty, possibly
        whole-shard) suffix of the shard. -inf is exact in every dtype and the
        vocab-parallel cross entropy handles it (exp gives 0 after the all-reduced,
        finite max; the target logit is never a padding id); the mask's backward
        gives the padding rows a zero gradient.
        """
        if self.vocab_size == self.padded_vocab_size:
            return logits
        per_rank = logits.size(-1)
        start = mpu.get_tensor_model_parallel_rank() * per_rank
        first_padded = max(self.vocab_size - start, 0)
        if first_padded >= per_rank:
            return logits
        # In place: the matmul's backward does not need its output, so no copy of
        # the logits is kept (autograd records the fill).
        logits[..., first_padded:] = float("-inf")
        return logits
