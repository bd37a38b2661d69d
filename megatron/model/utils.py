"""Model helpers: init methods, layout-independent seeding, pipeline layer ranges."""
import contextlib
import math

import torch

from megatron import mpu

# Seed slots: offsets that give each module of the model its own init seed
# (module_seed). Layer i uses _LAYER_OFFSET + i, so the seed depends on the
# global position only, never on the TP / PP layout that decides which rank
# builds the module. (State-dict keys are another thing: see
# megatron.checkpoint.WORD_EMBEDDINGS_KEY.)
SEED_SLOT_WORD_EMBEDDINGS = 1
SEED_SLOT_POSITION_EMBEDDINGS = 2
SEED_SLOT_FINAL_LAYERNORM = 3
SEED_SLOT_OUTPUT_LAYER = 4
_LAYER_OFFSET = 1000
_SEED_STRIDE = 1_000_003


def init_method_normal(std):
    """Init method drawing N(0, std) into a full master weight, in place."""
    def init_(tensor):
        return torch.nn.init.normal_(tensor, mean=0.0, std=std)
    return init_


def scaled_init_method_normal(std, num_layers):
    """N(0, std / sqrt(2 * num_layers)): GPT-2's init of the residual output projections."""
    return init_method_normal(std / math.sqrt(2.0 * num_layers))


def layer_position(layer_index):
    """Seed offset of transformer layer ``layer_index`` (global, 0-based)."""
    return _LAYER_OFFSET + layer_index


def module_seed(base_seed, position):
    """The init seed of the module at ``position`` for training seed ``base_seed``."""
    return (int(base_seed) * _SEED_STRIDE + int(position)) % (2 ** 63)


@contextlib.contextmanager
def seeded_init(base_seed, position):
    """Run module construction on a private copy of the CPU RNG seeded for ``position``.

    The caller's RNG state is restored afterwards, so building a model does not
    depend on, nor disturb, the random stream of anything else.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(module_seed(base_seed, position))
        yield


def stage_layer_range(num_layers, pipeline_size, pipeline_rank,
                      virtual_size=None, virtual_rank=None):
    """Global indices [start, end) of the transformer layers of one model chunk.

    Layers are divided evenly. With interleaving (``virtual_size`` > 1), model
    chunk c = virtual_rank * pipeline_size + pipeline_rank holds layers
    [c * L / (PP * VP), (c + 1) * L / (PP * VP)).
    """
    vp = virtual_size or 1
    vr = virtual_rank or 0
    chunks = pipeline_size * vp
    if num_layers % chunks != 0:
        raise ValueError(
            f"num_layers={num_layers} is not divisible by pipeline_model_parallel_size="
            f"{pipeline_size} x virtual_pipeline_model_parallel_size={vp} = {chunks}")
    per_chunk = num_layers // chunks
    chunk = vr * pipeline_size + pipeline_rank
    return chunk * per_chunk, (chunk + 1) * per_chunk


def mark_replicated(module):
    """Mark every parameter that no mpu layer marked as replicated across TP ranks."""
    for p in module.parameters():
        mpu.set_defaults_if_not_set_tensor_model_parallel_attributes(p)


def mark_sequence_parallel(params):
    """Mark parameters whose grads are partial sums over the sequence shards of TP ranks."""
    for p in params:
        if p is not None:
            p.sequence_parallel = True


def dropout_rng_context(split_across_tp, active):
    """The RNG context for a dropout: the model-parallel tracker's fork for
    activations that differ across TP ranks, else the default generator.

    Inactive dropout (p = 0 or eval) draws nothing, so it needs no fork and
    works before ``mpu.model_parallel_seed`` was called (inference tools).
    """
    if split_across_tp and active:
        return mpu.get_rng_tracker().fork()
    return contextlib.nullcontext()


@contextlib.contextmanager
def without_sequence_parallel(model):
    """Run ``model`` with sequence parallelism switched off (restored afterwards).

    Sequence parallelism is a training layout over the same weights: off, every
    TP rank holds the whole sequence (the linears all-reduce instead of
    reduce-scattering, the embedding does not scatter), so the outputs are the
    same and a sequence of any length works. Generation from a model trained with
    it relies on this.
    """
    switched = [m for m in model.modules() if getattr(m, "sequence_parallel", False) is True]
    for m in switched:
        m.sequence_parallel = False
    try:
        yield model
    finally:
        for m in switched:
            m.sequence_parallel = True
