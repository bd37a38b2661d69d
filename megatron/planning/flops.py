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

Today's decoders (docs/models.md) change two terms: grouped-query attention's
K and V projections are g/a as wide (QKV: h (h + 2 g h/a)), and SwiGLU has three
h x f matrices instead of two. Per layer and token, forward:

    2 * (h (h + 2 g h/a) + h^2 + k h f) + 4 s h        (k = 3 with SwiGLU, else 2)

RoPE, RMSNorm and the activations are element-wise (not counted); an untied
output layer does the tied one's 2 h V per token.
"""


def layer_forward_flops_per_token(seq_length, hidden_size, ffn_hidden_size=None,
                                  num_attention_heads=None, num_query_groups=None,
                                  gated_mlp=False):
    """Forward FLOPs of one transformer layer per token: its GEMMs (QKV, attention output,
    the MLP matrices) and attention's two s x s products (counted unmasked).

    Grouped-query attention (``num_query_groups`` K/V heads of ``num_attention_heads``)
    narrows the K and V projections to ``g/a`` of h each; the attention products are
    those of the a query heads either way. A gated MLP (SwiGLU) has three h x ffn
    matrices (gate, up, down) instead of two."""
    s, h = seq_length, hidden_size
    ffn = ffn_hidden_size or 4 * h
    kv = h if not (num_attention_heads and num_query_groups) else \
        num_query_groups * (h // num_attention_heads)
    mlp_matrices = 3 if gated_mlp else 2
    return 2 * (h * (h + 2 * kv) + h * h + mlp_matrices * h * ffn) + 2 * 2 * s * h


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
                            num_query_groups=None, gated_mlp=False):
    """Model FLOPs of one training iteration on `batch_size` sequences (all ranks together).

    Written out term by term so that a non-default FFN size is counted right;
    with ffn_hidden_size = 4h it equals the papers' closed form above. ``recompute``
    True or "full" counts the recomputed forward, "selective" the recomputed
    attention core; False / "none" gives the model FLOPs. The decoder options
    (``num_query_groups`` of ``num_attention_heads``, ``gated_mlp``) change the
    layer's GEMMs (``layer_forward_flops_per_token``); an untied output layer does
    the same work as the tied one.
    """
    B, s, l, h, V = batch_size, seq_length, num_layers, hidden_size, vocab_size
    layer_fwd_per_token = layer_forward_flops_per_token(
        s, h, ffn_hidden_size, num_attention_heads, num_query_groups, gated_mlp)
    logit_fwd_per_token = 2 * h * V
    per_token = layer_passes(recompute) * l * layer_fwd_per_token + 3 * logit_fwd_per_token
    if recompute == "selective":
        per_token += l * attention_core_forward_flops_per_token(s, h)
    return B * s * per_token


def model_flops_per_iteration(model_cfg, batch_size, vocab_size, recompute=False):
    """``gpt_flops_per_iteration`` of a config's ``model`` section (its FFN size, query
    groups and activation) on ``batch_size`` sequences with vocabulary ``vocab_size``."""
    m = model_cfg
    return gpt_flops_per_iteration(batch_size, m.seq_length, m.num_layers, m.hidden_size,
                                   vocab_size, m.ffn_hidden_size, recompute,
                                   num_attention_heads=m.num_attention_heads,
                                   num_query_groups=m.num_query_groups,
                                   gated_mlp=m.activation == "swiglu")


def paper_closed_form(batch_size, seq_length, num_layers, hidden_size, vocab_size, recompute=False):
    """The papers' formula, verbatim (assumes ffn_hidden_size = 4h)."""
    B, s, l, h, V = batch_size, seq_length, num_layers, hidden_size, vocab_size
    if recompute:
        return 96 * B * s * l * h * h * (1 + s / (6 * h) + V / (16 * l * h))
    return 72 * B * s * l * h * h * (1 + s / (6 * h) + V / (12 * l * h))
