"""The model's normalization layer: GPT-2's LayerNorm or Llama's RMSNorm (model.normalization)."""
from megatron import fused_kernels


def build_norm(model_cfg):
    """A norm over model_cfg.hidden_size with model_cfg.layernorm_epsilon.

    LayerNorm has ``weight`` and ``bias``, RMSNorm ``weight`` only; both start
    at weight 1 (bias 0), and both normalize in fp32.
    """
    if model_cfg.normalization == "RMSNorm":
        return fused_kernels.RMSNorm(model_cfg.hidden_size, eps=model_cfg.layernorm_epsilon)
    return fused_kernels.LayerNorm(model_cfg.hidden_size, eps=model_cfg.layernorm_epsilon)
