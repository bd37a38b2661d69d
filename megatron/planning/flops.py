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


def gpt_flops_per_iteration(batch_size, seq_length, num_layers, hidden_size, vocab_size,
                            ffn_hidden_size=None, recompute=False):
    """Model FLOPs of one training iteration on `batch_size` sequences (all ranks together).

    Written out term by term so that a non-default FFN size is counted right;
    with ffn_hidden_size = 4h it equals the papers' closed form above.
    """
    B, s, l, h, V = batch_size, seq_length, num_layers, hidden_size, vocab_size
    ffn = ffn_hidden_size or 4 * h
    layer_fwd_per_token = 2 * (3 * h * h + h * h + 2 * h * ffn) + 2 * 2 * s * h
    logit_fwd_per_token = 2 * h * V
    layer_passes = 4 if recompute else 3
    return B * s * (layer_passes * l * layer_fwd_per_token + 3 * logit_fwd_per_token)


def paper_closed_form(batch_size, seq_length, num_layers, hidden_size, vocab_size, recompute=False):
    """The papers' formula, verbatim (assumes ffn_hidden_size = 4h)."""
    B, s, l, h, V = batch_size, seq_length, num_layers, hidden_size, vocab_size
    if recompute:
        return 96 * B * s * l * h * h * (1 + s / (6 * h) + V / (16 * l * h))
    return 72 * B * s * l * h * h * (1 + s / (6 * h) + V / (12 * l * h))
