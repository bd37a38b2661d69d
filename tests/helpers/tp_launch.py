"""The one 4-process launch of the mpu tests: every check of test_mpu_layers
(tp_layer_checks), test_cross_entropy (tp_cross_entropy_checks) and the dropout masks
of test_mpu_random, at TP=4 then TP=2 x DP=2 (each spawned process costs seconds of
CPU on the shared test machine, so they share one).
"""
import functools

import torch
import torch.nn.functional as F

from megatron import mpu
from tests.dist_harness import run_distributed
from tests.helpers.tp_cross_entropy_checks import cross_entropy_errors
from tests.helpers.tp_layer_checks import indivisible_messages, layer_errors

SEED = 1234


def dropout_masks():
    """After ``model_parallel_seed``: a replicated-region mask (default
    generator), a split-region one (tracker), and the next replicated one."""
    mpu.model_parallel_seed(SEED)
    ones = torch.ones(64, 32)
    replicated = F.dropout(ones, 0.5) != 0
    with mpu.get_rng_tracker().fork():
        split = F.dropout(ones, 0.5) != 0
    replicated_after = F.dropout(ones, 0.5) != 0
    return replicated, split, replicated_after


def _tp_worker():
    out = {"layers": {}, "cross_entropy": {}, "masks": {}, "indivisible": None}
    for tp in (4, 2):
        mpu.initialize_model_parallel(tp)
        assert mpu.get_tensor_model_parallel_world_size() == tp
        out["layers"].update(layer_errors(tp))
        out["cross_entropy"].update(cross_entropy_errors(tp))
        out["masks"][tp] = dropout_masks()
        if tp == 2:
            out["indivisible"] = indivisible_messages()
        mpu.destroy_model_parallel()
    return out


@functools.lru_cache(maxsize=None)
def tp_launch_results():
    """Per-rank results of the one 4-process launch shared by test_mpu_layers,
    test_cross_entropy and test_mpu_random (run once per pytest session)."""
    return tuple(run_distributed(_tp_worker, 4))
