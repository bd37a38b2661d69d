"""What one rank's checkpoint file holds: the dict builder, the model-chunk key
rule and the RNG states.

Everything stored is made of tensors, numbers, strings, lists and dicts so that
`torch.load(weights_only=True)` reads it.
"""
import random

import numpy as np
import torch

CHECKPOINT_VERSION = 1


def model_keys(num_chunks):
    """The keys of the model state dicts in a rank file: "model" for a single chunk,
    "model0", "model1", ... for the virtual-pipeline chunks of an interleaved run."""
    if num_chunks == 1:
        return ["model"]
    return [f"model{i}" for i in range(num_chunks)]


def model_states(rank_file, num_chunks):
    """The model state dicts of a loaded rank file, one per model chunk."""
    return [rank_file[k] for k in model_keys(num_chunks)]


def build_rank_state(*, iteration, consumed_samples, config, parallel, rng_state,
                     scheduler_state, model_states, optimizer_state=None, extra=None):
    """The dict of one rank's `model_optim_rng.pt`.

    `config` is `Config.to_dict()`; `parallel` the layout it was written at
    (tensor / pipeline / virtual pipeline / data parallel sizes); `rng_state` the
    RNG states of every DP rank; `model_states` one state dict per model chunk;
    `optimizer_state` the plain optimizer's state (None when the optimizer is
    sharded into its own files, or not saved).
    """
    state = {
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": iteration,
        "consumed_samples": consumed_samples,
        "config": config,
        "parallel": parallel,
        "rng_state": rng_state,
        "opt_param_scheduler": scheduler_state,
    }
    state.update(zip(model_keys(len(model_states)), model_states))
    if optimizer_state is not None:
        state["optimizer"] = optimizer_state
    if extra:
        state["extra"] = extra
    return state


def parallel_sizes(tp, pp, vp, dp):
    """The `parallel` entry of a rank file."""
    return {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
            "virtual_pipeline_model_parallel_size": vp, "data_parallel_size": dp}


# ---------------------------------------------------------------- RNG states
def get_rng_state():
    """Every RNG state of this process as tensors/lists (weights_only-loadable)."""
    from megatron import mpu
    version, mt, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64),
                   "gauss": gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch_cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "tracker": mpu.get_rng_tracker().get_states(),
    }
    return state


def set_rng_state(state):
    """Restore what get_rng_state() returned."""
    from megatron import mpu
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["gauss"]))
    torch.set_rng_state(state["torch_cpu"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    mpu.get_rng_tracker().set_states(state["tracker"])


def gather_rng_states_over_dp():
    """RNG states of every DP rank (rank-ordered), so that DP rank 0 can store them all."""
    from megatron import mpu
    state = get_rng_state()
    if mpu.get_data_parallel_world_size() == 1:
        return [state]
    return mpu.all_gather_object(state, group=mpu.get_data_parallel_group())


def fresh_rng_state(seed):
    """The RNG states a run seeded with `seed` starts from (this process's are kept)."""
    saved = get_rng_state()
    try:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        return get_rng_state()
    finally:
        set_rng_state(saved)
