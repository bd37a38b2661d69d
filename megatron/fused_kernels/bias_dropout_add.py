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


def bias_dropout_add_fuses(x):
    """Whether bias_dropout_add runs a fused (compiled) kernel for ``x``; if not, callers
    do better to add the bias inside the preceding GEMM and pass ``bias=None``."""
    return x.is_cuda and not force_reference()


def bias_dropout_add(x, bias, residual, prob, training):
    """residual + dropout(x + bias): one compiled (fused) kernel on CUDA, the reference on CPU
    (where the compiled one measured slower, bench/RESULTS.md).

    Dropout is only drawn when ``training`` and ``prob > 0``, so evaluation and
    dropout-free runs never touch the generator (as in the reference).
    """
    if bias is None or not bias_dropout_add_fuses(x):
        return bias_dropout_add_reference(x, bias, residual, prob, training)
    if training and prob > 0:
        return bias_dropout_add_train_compiled(x, bias, residual, prob)
    return bias_add_compiled(x, bias, residual)
