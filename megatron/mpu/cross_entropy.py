"""Cross entropy over logits whose vocabulary is split across TP ranks.

The full ``[..., V]`` logits are never gathered: the max, the target logit and
the sum of exponentials are all-reduced over TP instead (two collectives: the
max, then the target logit and the sum together). The backward is written by
hand (softmax minus one-hot on the local shard) so that only one fp32 copy of
the local logits is kept for it.
"""
import torch
import torch.distributed as dist

from . import parallel_state
from .utils import vocab_range_from_per_partition_vocab_size


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vocab_parallel_logits, target, inplace):
        group = parallel_state.get_tensor_model_parallel_group()
        world_size = parallel_state.get_tensor_model_parallel_world_size()
        rank = parallel_state.get_tensor_model_parallel_rank()
        if target.shape != vocab_parallel_logits.shape[:-1]:
            raise ValueError(f"target shape {tuple(target.shape)} does not match the logits "
                             f"shape {tuple(vocab_parallel_logits.shape)} without its last dim")

        # Shifted by the global max for a stable exp; always a fresh fp32 tensor
        # that is then reused in place for the softmax saved for backward.
        logits_max = vocab_parallel_logits.detach().max(dim=-1)[0].float()
        if world_size > 1:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        if inplace and vocab_parallel_logits.dtype == torch.float32:
            # The caller's temporary becomes the softmax: no second [tokens, V/tp] buffer.
            logits = vocab_parallel_logits.sub_(logits_max.unsqueeze(-1))
        else:
            logits = vocab_parallel_logits.float() - logits_max.unsqueeze(-1)

        partition_vocab_size = logits.size(-1)
        vocab_start, vocab_end = vocab_range_from_per_partition_vocab_size(partition_vocab_size, rank)
        target_outside = (target < vocab_start) | (target >= vocab_end)
        local_target = (target.long() - vocab_start).masked_fill(target_outside, 0)

        predicted_logits = logits.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        predicted_logits = predicted_logits.masked_fill(target_outside, 0.0)
        exp_logits = logits.exp_()
        sum_exp_logits = exp_logits.sum(dim=-1)
        if world_size > 1:
            both = torch.stack((predicted_logits, sum_exp_logits))
            dist.all_reduce(both, group=group)
            predicted_logits, sum_exp_logits = both[0], both[1]

        loss = torch.log(sum_exp_logits) - predicted_logits

        softmax = exp_logits.div_(sum_exp_logits.unsqueeze(-1))
        ctx.input_dtype = vocab_parallel_logits.dtype
        ctx.save_for_backward(softmax, target_outside, local_target)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        softmax, target_outside, local_target = ctx.saved_tensors
        # d loss / d logits = softmax - one_hot(target), on this rank's columns.
        grad_input = softmax
        on_this_rank = (~target_outside).to(grad_input.dtype)
        grad_input.scatter_add_(-1, local_target.unsqueeze(-1), -on_this_rank.unsqueeze(-1))
        grad_input.mul_(grad_output.unsqueeze(-1).to(grad_input.dtype))
        return grad_input.to(ctx.input_dtype), None, None


def vocab_parallel_cross_entropy(vocab_parallel_logits, target, inplace=False):
    """Per-token cross entropy (fp32, shape of ``target``) from logits
    ``[..., V / tp]`` holding this rank's vocabulary slice and ``target`` ids
    ``[...]`` in the full vocabulary. Computed in fp32 whatever the logits dtype.
    ``inplace``: fp32 logits are overwritten (with the softmax) instead of copied,
    for a caller whose logits are a temporary that nothing else reads (the model's).
    """
    return _VocabParallelCrossEntropy.apply(vocab_parallel_logits, target, inplace)
