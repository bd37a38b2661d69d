"""Model-parallel RNG: named generator states, and activation checkpointing.

Dropout in regions replicated across TP ranks (after a row-parallel reduction)
must draw the same mask on every TP rank; dropout in TP-split regions
(attention probabilities of this rank's heads) must draw different masks. The
default generator serves the first (seeded with ``seed`` on every TP rank); the
tracker's ``"model-parallel-rng"`` state serves the second (seeded with
``seed + 2718 + tp_rank``) and is entered with ``get_rng_tracker().fork()``.

The tracker keeps, per name, a CPU generator state and, when CUDA is in use, a
CUDA generator state of the current device; ``fork`` swaps both into the
default generators, so the same code runs on CPU and on GPU.

``checkpoint(fn, *args)`` runs ``fn`` without keeping its activations and, in
backward, recomputes it under the RNG states of the forward (CPU, CUDA and the
tracker's), so a recomputed dropout mask equals the original one.
"""
import contextlib

import torch

from . import parallel_state

_MODEL_PARALLEL_RNG_TRACKER_NAME = "model-parallel-rng"
_TP_SEED_OFFSET = 2718
_PP_SEED_STRIDE = 100


def rank_seeds(seed, tp_rank, pp_rank):
    """(default-generator seed, tracker seed) of the rank at (tp_rank, pp_rank).

    Each pipeline stage gets its own base seed (Megatron's ``seed + 100 * pp_rank``)
    so that stages never replay each other's dropout masks; the base is shared by
    the TP ranks of a stage (replicated-region dropout equal), and the tracker
    seed adds ``2718 + tp_rank`` (split-region dropout differs across TP ranks).
    """
    base = seed + _PP_SEED_STRIDE * pp_rank
    return base, base + _TP_SEED_OFFSET + tp_rank


def _cuda_in_use():
    return torch.cuda.is_available() and torch.cuda.is_initialized()


class RNGStatesTracker:
    """Named RNG states (CPU, and CUDA when used) that ``fork`` swaps in and out."""

    def __init__(self):
        self.reset()

    def reset(self):
        """Forget every state and seed; CUDA tracking off."""
        self.states_ = {}
        self.seeds_ = set()
        self.seed_of_ = {}
        self.cuda_device = None

    def use_cuda(self, device=None):
        """Also track the CUDA generator of ``device`` (default: the current one)."""
        if isinstance(device, int):
            device = torch.device("cuda", device)
        index = None if device is None else torch.device(device).index
        self.cuda_device = torch.device("cuda", torch.cuda.current_device() if index is None else index)

    def get_states(self):
        """``{name: {"cpu": ByteTensor[, "cuda": ByteTensor]}}``: tensors only, so a
        checkpoint holding it loads with ``torch.load(weights_only=True)``."""
        return {name: dict(state) for name, state in self.states_.items()}

    def set_states(self, states):
        """Replace every state by ``states`` (as returned by ``get_states``);
        the seeds of ``add`` stay known."""
        self.states_ = {name: {k: v.clone() for k, v in state.items()} for name, state in states.items()}

    def add(self, name, seed):
        """Create state ``name`` from ``seed``; names and seeds must be new."""
        if seed in self.seeds_:
            raise ValueError(f"RNG seed {seed} is already used by the tracker")
        if name in self.states_:
            raise ValueError(f"RNG state {name!r} already exists in the tracker")
        self.seeds_.add(seed)
        self.seed_of_[name] = seed
        state = {"cpu": torch.Generator(device="cpu").manual_seed(seed).get_state()}
        if self.cuda_device is not None:
            state["cuda"] = self._seeded_cuda_state(seed)
        self.states_[name] = state

    def _seeded_cuda_state(self, seed):
        with torch.cuda.device(self.cuda_device):
            saved = torch.cuda.get_rng_state()
            torch.cuda.manual_seed(seed)
            state = torch.cuda.get_rng_state()
            torch.cuda.set_rng_state(saved)
        return state

    def _cuda_state_for(self, name):
        """The CUDA state of ``name``, or None when CUDA is not in use. CUDA may
        come into use after seeding (model moved to the GPU later), or states
        may come from a CPU checkpoint: the state is then created from the
        name's seed, so split-region dropout on the GPU never silently falls
        back to the default (TP-replicated) generator."""
        if self.cuda_device is None:
            if not _cuda_in_use():
                return None
            self.use_cuda()
        state = self.states_[name]
        if "cuda" not in state:
            if name not in self.seed_of_:
                raise RuntimeError(f"RNG state {name!r} has no CUDA state and no known seed; "
                                   f"call model_parallel_seed after choosing the device")
            state["cuda"] = self._seeded_cuda_state(self.seed_of_[name])
        return state["cuda"]

    @contextlib.contextmanager
    def fork(self, name=_MODEL_PARALLEL_RNG_TRACKER_NAME):
        """Within the block the default generators draw from state ``name``;
        afterwards they resume where they were and ``name`` keeps its advance."""
        if name not in self.states_:
            raise KeyError(f"RNG state {name!r} is not in the tracker (call model_parallel_seed first)")
        cuda_state = self._cuda_state_for(name)
        use_cuda = cuda_state is not None
        saved_cpu = torch.get_rng_state()
        torch.set_rng_state(self.states_[name]["cpu"])
        if use_cuda:
            saved_cuda = torch.cuda.get_rng_state(self.cuda_device)
            torch.cuda.set_rng_state(cuda_state, self.cuda_device)
        try:
            yield
        finally:
            new_state = {"cpu": torch.get_rng_state()}
            torch.set_rng_state(saved_cpu)
            if use_cuda:
                new_state["cuda"] = torch.cuda.get_rng_state(self.cuda_device)
                torch.cuda.set_rng_state(saved_cuda, self.cuda_device)
            self.states_[name] = new_state


_RNG_TRACKER = RNGStatesTracker()


def get_rng_tracker():
    """The process-wide model-parallel RNG tracker."""
    return _RNG_TRACKER


def model_parallel_seed(seed, device=None):
    """Seed the default generators and the tracker's ``"model-parallel-rng"`` with
    this rank's ``rank_seeds(seed, tp_rank, pp_rank)``.

    ``device``: when it is a CUDA device the tracker also tracks that device's
    CUDA generator; with None, CUDA is tracked if CUDA is already initialized.
    """
    default_seed, tracker_seed = rank_seeds(seed, parallel_state.get_tensor_model_parallel_rank(),
                                            parallel_state.get_pipeline_model_parallel_rank())
    torch.manual_seed(default_seed)  # every device's default generator
    _RNG_TRACKER.reset()
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda":
            _RNG_TRACKER.use_cuda(device.index if device.index is not None else None)
    elif _cuda_in_use():
        _RNG_TRACKER.use_cuda()
    _RNG_TRACKER.add(_MODEL_PARALLEL_RNG_TRACKER_NAME, tracker_seed)


def get_rng_states():
    """Every RNG state that dropout can read: CPU, CUDA (if tracked) and tracker."""
    states = {"cpu": torch.get_rng_state(), "tracker": _RNG_TRACKER.get_states()}
    if _RNG_TRACKER.cuda_device is not None:
        states["cuda"] = torch.cuda.get_rng_state(_RNG_TRACKER.cuda_device)
    elif _cuda_in_use():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states):
    """Restore states captured by ``get_rng_states``."""
    torch.set_rng_state(states["cpu"])
    if "cuda" in states:
        if _RNG_TRACKER.cuda_device is not None:
            torch.cuda.set_rng_state(states["cuda"], _RNG_TRACKER.cuda_device)
        else:
            torch.cuda.set_rng_state(states["cuda"])
    _RNG_TRACKER.set_states(states["tracker"])


def _detach_like(inputs):
    out = []
    for x in inputs:
        if isinstance(x, torch.Tensor):
            y = x.detach()
            y.requires_grad_(x.requires_grad)
            out.append(y)
        else:
            out.append(x)
    return out


class CheckpointFunction(torch.autograd.Function):
    """Reentrant activation checkpointing that replays the forward's RNG states."""

    @staticmethod
    def forward(ctx, fn, _anchor, *args):
        ctx.fn = fn
        ctx.rng_states = get_rng_states()
        ctx.tensor_indices = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        ctx.non_tensor_args = [None if isinstance(a, torch.Tensor) else a for a in args]
        ctx.save_for_backward(*[args[i] for i in ctx.tensor_indices])
        with torch.no_grad():
            outputs = fn(*args)
        return outputs

    @staticmethod
    def backward(ctx, *grad_outputs):
        if not torch.autograd._is_checkpoint_valid():
            raise RuntimeError("checkpoint() does not support torch.autograd.grad(); "
                               "use .backward()")
        args = list(ctx.non_tensor_args)
        for i, t in zip(ctx.tensor_indices, ctx.saved_tensors):
            args[i] = t
        inputs = _detach_like(args)

        backward_states = get_rng_states()
        set_rng_states(ctx.rng_states)
        try:
            with torch.enable_grad():
                outputs = ctx.fn(*inputs)
        finally:
            set_rng_states(backward_states)
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)

        pairs = [(o, g) for o, g in zip(outputs, grad_outputs)
                 if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        grads = tuple(x.grad if isinstance(x, torch.Tensor) else None for x in inputs)
        return (None, None) + grads


def checkpoint(fn, *args):
    """``fn(*args)`` without keeping its activations; recomputed in backward.

    ``args`` may mix tensors with other values (None, floats, bools). ``fn`` must
    return a tensor or a tuple of tensors. The RNG states of the forward are
    replayed in the recomputation, so dropout masks match.
    """
    # An anchor that requires grad makes the output require grad even when no
    # tensor argument does (the first layer of a stage), so that the parameters
    # inside ``fn`` still receive gradients.
    anchor = torch.empty(0, requires_grad=torch.is_grad_enabled())
    return CheckpointFunction.apply(fn, anchor, *args)
