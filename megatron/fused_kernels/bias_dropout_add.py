"""Fused bias + dropout + residual add with its reference."""
import torch.nn.functional as F

from ._dispatch import LazyCompiled, force_reference


def bias_dropout_add_reference(x, bias, residual, prob, training):
    """residual + dropout(x + bias); ``bias`` may be None. Dropout draws from the default generator."""
    if bias is not None:
        x = x + bias
    return residual + F.dropout(x, p=prob, training=training)


def _bias_dropout_add_train(x, bias, residual, prob):
    return residual + F.dropout(x + bias, p=prob, training=True)


def _bias_add(x, bias, residual):
    return residual + (x + bias)


bias_dropout_add_train_compiled = LazyCompiled(_bias_dropout_add_train)
bias_add_compiled = LazyCompiled(_bias_add)


def bias_dropout_add(x, bias, residual, prob, training):
    """residual + dropout(x + bias): one compiled (fused) kernel on CUDA, the reference on CPU
    (where the compiled one measured slower, bench/RESULTS.md).

    Dropout is only drawn when ``training`` and ``prob > 0``, so evaluation and
    dropout-free runs never touch the generator (as in the reference).
    """
    if force_reference() or not x.is_cuda or bias is None:
        return bias_dropout_add_reference(x, bias, residual, prob, training)
    if training and prob > 0:
        return bias_dropout_add_train_compiled(x, bias, residual, prob)
    return bias_add_compiled(x, bias, residual)
