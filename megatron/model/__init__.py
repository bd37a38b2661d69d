"""GPT-2 built from the tensor-parallel layers of megatron.mpu."""
from megatron.model.gpt_model import GPTModel
from megatron.model.utils import without_sequence_parallel

__all__ = ["GPTModel", "without_sequence_parallel"]
