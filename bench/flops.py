"""Model FLOPs of GPT training: the formula lives in ``megatron.planning.flops`` (the
training log and the planner use it too); benches keep importing it from here."""
from megatron.planning.flops import gpt_flops_per_iteration, paper_closed_form  # noqa: F401
