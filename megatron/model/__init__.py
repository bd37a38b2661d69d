"""GPT-2 built from the tensor-parallel layers of megatron.mpu."""
from megatron.model.gpt_model import GPTModel

__all__ = ["GPTModel"]
