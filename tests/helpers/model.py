"""A tiny GPT config and a random batch for model-level tests."""
import torch

from megatron.config import Config


def tiny_cfg(**overrides):
    """A small model; overrides are ``section__field=value``."""
    cfg = Config()
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length = 2, 64, 4, 16
    m.hidden_dropout = m.attention_dropout = 0.0
    for key, value in overrides.items():
        section, field = key.split("__")
        setattr(getattr(cfg, section), field, value)
    return cfg


def batch(vocab, b=2, s=16, seed=0):
    """Random token ids, default position ids and random labels: ``(ids, pos, labels)``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    labels = torch.randint(0, vocab, (b, s), generator=g)
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    return ids, pos, labels


# Every Llama-style option on (the exactness tests' configuration): RoPE, RMSNorm, SwiGLU,
# grouped-query attention with 2 query groups, no biases, an untied output layer.
LLAMA_OPTIONS = {"position_embedding_type": "rope", "normalization": "RMSNorm",
                 "activation": "swiglu", "num_query_groups": 2, "add_bias_linear": False,
                 "untie_embeddings_and_output_weights": True}


def llama_cfg(**overrides):
    """``tiny_cfg`` with LLAMA_OPTIONS (4 heads in 2 query groups); overrides as tiny_cfg's."""
    return tiny_cfg(**{**{f"model__{k}": v for k, v in LLAMA_OPTIONS.items()}, **overrides})


def reset_positions(b, s, resets):
    """Position ids [b, s] restarting at 0 at each index in ``resets`` (as data.reset_position_ids
    makes them after each end of document)."""
    pos = torch.arange(s)
    for r in sorted(resets):
        pos[r:] = torch.arange(s - r)
    return pos.unsqueeze(0).expand(b, s).clone()
