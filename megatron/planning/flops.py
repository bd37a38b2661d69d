"""Model FLOPs of GPT training, counted as the Megatron-LM papers count them.

Narayanan et al. 2021 ("Efficient Large-Scale Language Model Training on GPU
Clusters", appendix) count only matrix multiplications, attention included,
for a GPT with hidden size h, l layers, sequence length s, vocabulary V and
B sequences per iteration:

    F = 72 * B * s * l * h^2 * (1 + s / (6h) + V / (12 * l * h))     (forward + backward)

Per layer and token the forward pass does 2 * (3h^2 + h^2 + 8h^2) = 24 h^2
FLOPs in its GEMMs (QKV, attention output, the two 4h MLP matrices) plus
2 * 2 * s * h in attention (QK^T and attention-weighted V); the logit layer adds
2 * h * V per token. The backward pass costs twice the forward: x3 in all.
Full activation recomputation runs the layers' forward once more (x4 for the
layers, the logit layer is not recomputed):

    F = 96 * B * s * l * h^2 * (1 + s / (6h) + V / (16 * l * h))

Attention is counted as if unmasked (the papers' convention), so a causal
kernel that skips the masked half does less work than is credited.
"""


def layer_forward_flops_per_token(seq_length, hidden_size, ffn_hidden_size=None,
                                  num_attention_heads=None, num_query_groups=None, gated=False):
    """Forward FLOPs of one transformer layer per token: its GEMMs (QKV, attention output,
    the two MLP matrices) and attention's two s x s products (counted unmasked).

    Today's decoders: with ``num_query_groups`` ng of ``num_attention_heads`` np, K and V
    are ng / np as wide as Q (QKV h^2 (1 + 2 ng / np)); a ``gated`` MLP (SwiGLU) has three
    h x ffn matrices instead of two. Attention's products are np heads either way.
    """
    s, h = seq_length, hidden_size
    ffn = ffn_hidden_size or 4 * h
    kv = 2 * h * h
    if num_attention_heads and num_query_groups:
        kv = 2 * h * h * num_query_groups // num_attention_heads
    mlp = (3 if gated else 2) * h * ffn
    return 2 * (h * h + kv + h * h + mlp) + 2 * 2 * s * h


def model_flops_options(model_cfg):
    """The keyword arguments of ``layer_forward_flops_per_token`` / ``gpt_flops_per_iteration``
    that a ModelConfig's decoder options set (query groups, a gated MLP)."""
    return {"num_attention_heads": model_cfg.num_attention_heads,
            "num_query_groups": model_cfg.num_query_groups,
            "gated": model_cfg.activation == "swiglu"}


def attention_core_forward_flops_per_token(seq_length, hidden_size):
    """The part of ``layer_forward_flops_per_token`` a selective recompute runs again."""
    return 2 * 2 * seq_length * hidden_size


def layer_passes(recompute):
    """Forward-pass equivalents of a layer per step: forward, backward (twice the forward),
    and the forward once more under full recomputation. ``recompute``: bool or a
    ``training.recompute`` value ("selective" is counted by the caller)."""
    return 4 if recompute in (True, "full") else 3


def gpt_flops_per_iteration(batch_size, seq_length, num_layers, hidden_size, vocab_size,
                            ffn_hidden_size=None, recompute=False, num_attention_heads=None,
                            num_query_groups=None, gated=False):
    """Model FLOPs of one training iteration on `batch_size` sequences (all ranks together).

    Written out term by term so that a non-default FFN size is counted right;
    with ffn_hidden_size = 4h it equals the papers' closed form above. ``recompute``
    True or "full" counts the recomputed forward, "selective" the recomputed
    attention core; False / "none" gives the model FLOPs. ``num_attention_heads``,
    ``num_query_groups`` and ``gated`` as in ``layer_forward_flops_per_token``
    (``model_flops_options(cfg.model)`` gives them).
    """
    B, s, l, h, V = batch_size, seq_length, num_layers, hidden_size, vocab_size
    layer_fwd_per_token = layer_forward_flops_per_token(s, h, ffn_hidden_size, num_attention_heads,
                                                        num_query_groups, gated)
    logit_fwd_per_token = 2 * h * V
    per_token = layer_passes(recompute) * l * layer_fwd_per_token + 3 * logit_fwd_per_token
    if recompute == "selective":
        per_token += l * attention_core_forward_flops_per_token(s, h)
    return B * s * per_token


def paper_closed_form(batch_size, seq_length, num_layers, hidden_size, vocab_size, recompute=False):
    """The papers' formula, verbatim (assumes ffn_hidden_size = 4h)."""
    B, s, l, h, V = batch_size, seq_length, num_layers, hidden_size, vocab_size
    if recompute:
        return 96 * B * s * l * h * h * (1 + s / (6 * h) + V / (16 * l * h))
    return 72 * B * s * l * h * h * (1 + s / (6 * h) + V / (12 * l * h))
