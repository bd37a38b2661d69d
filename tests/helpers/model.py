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
