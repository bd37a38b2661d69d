"""Fused ops used by the model, each with a plain-PyTorch ``*_reference`` twin.

No build step: on CUDA the ops use Triton kernels (LayerNorm, RMSNorm, bias-GeLU,
SwiGLU, RoPE),
torch.compile (bias-dropout-add) and scaled_dot_product_attention (flash /
memory-efficient attention); on CPU they use whichever path measured faster
(bench/RESULTS.md). Triton is imported lazily and never required.
``MEGATRON_FUSED_KERNELS=reference`` forces the references everywhere.
"""
from .attention import core_attention, core_attention_reference, core_attention_sdpa
from .bias_dropout_add import bias_dropout_add, bias_dropout_add_fuses, bias_dropout_add_reference
from .bias_gelu import bias_gelu, bias_gelu_compiled, bias_gelu_fuses, bias_gelu_reference
from .layer_norm import LayerNorm, layer_norm, layer_norm_reference
from .rms_norm import RMSNorm, rms_norm, rms_norm_reference
from .rotary import rotary_embedding, rotary_embedding_reference
from .swiglu import swiglu, swiglu_reference

__all__ = [
    "bias_gelu", "bias_gelu_reference", "bias_gelu_compiled", "bias_gelu_fuses",
    "bias_dropout_add", "bias_dropout_add_reference", "bias_dropout_add_fuses",
    "core_attention", "core_attention_reference", "core_attention_sdpa",
    "LayerNorm", "layer_norm", "layer_norm_reference",
    "RMSNorm", "rms_norm", "rms_norm_reference",
    "swiglu", "swiglu_reference",
    "rotary_embedding", "rotary_embedding_reference",
]
