"""Tensor memory as the framework allocates it: live storages, their peak, and what they are.

``MemoryTracker`` is a dispatch mode that follows every tensor storage an op creates
until it is freed (a weak reference on the storage tells it when), so views, which
share their base's storage, count once. It keeps the live bytes, the peak, the peak of
each named phase and the timeline of live bytes at each allocation, from which
``steady_peak`` derives the peak of a later step that starts with everything this one
left behind (the optimizer state Adam creates in its first step). The same tracker
measures a real step (real tensors) and predicts one (fake tensors, where it also
answers host reads such as ``.item()`` with zero: the common path, no overflow).

``state_storages`` names the storages a training run keeps between steps: parameters,
the DP gradient buffers, fp32 master weights and optimizer state.
"""
import contextlib
import functools
import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from megatron.utils import unwrap_model

_HOST_READ = torch.ops.aten._local_scalar_dense.default
_DEVICE = torch.ops.prim.device.default


def _storage_key(storage):
    return storage._cdata  # the StorageImpl's address: one key per storage, views included


class MemoryTracker(TorchDispatchMode):
    """Follow live tensor storages while entered (see the module doc).

    ``fake`` True: the tensors are fake; every host read (``.item()``, ``.tolist()``,
    ``bool(t)``) returns zero (the common path: no inf found, a finite norm) and every
    op asked for another device computes on the CPU (bytes do not depend on the device);
    an op whose tensors are all real (RNG states) runs for real.
    Host reads are counted in ``host_reads`` either way. Each of ``observers`` is
    called as ``observe(func, args, kwargs, out)`` after every op (one mode watching
    for several purposes costs a third of three stacked modes).
    """

    def __init__(self, fake=False, observers=()):
        super().__init__()
        self.fake = fake
        self.observers = list(observers)
        self.current = 0
        self.peak = 0
        self.host_reads = 0
        self.phase_peaks = {}
        self.phase_starts = {}
        self._open_phases = []
        self._live = {}  # key -> (bytes, allocation number, weak reference)
        self._seq = 0
        self._timeline = []  # (allocation number, live bytes just after it)

    # -- following storages ---------------------------------------------------------------
    def add(self, tensor):
        """Count ``tensor``'s storage from now until it is freed (once, however many views)."""
        storage = tensor.untyped_storage()
        key = _storage_key(storage)
        if key in self._live:
            return
        nbytes = storage.nbytes()
        self._seq += 1
        self._live[key] = (nbytes, self._seq, weakref.ref(storage, functools.partial(self._freed, key)))
        self.current += nbytes
        self._timeline.append((self._seq, self.current))
        if self.current > self.peak:
            self.peak = self.current
        for name in self._open_phases:
            if self.current > self.phase_peaks[name]:
                self.phase_peaks[name] = self.current

    def add_all(self, tensors):
        """``add`` each tensor of an iterable (None entries skipped)."""
        for t in tensors:
            if t is not None:
                self.add(t)

    def _freed(self, key, _ref):
        entry = self._live.pop(key, None)
        if entry is not None:
            self.current -= entry[0]

    # -- phases and peaks ----------------------------------------------------------------
    def mark(self):
        """Start a new measurement here: the peak restarts from the live bytes and the
        timeline is cleared. Returns the allocation number of the mark."""
        self.peak = self.current
        self._timeline = [(self._seq, self.current)]
        return self._seq

    @contextlib.contextmanager
    def phase(self, name):
        """Record the live bytes at the start of ``name`` and its peak (phases may nest)."""
        self.phase_starts[name] = self.current
        self.phase_peaks[name] = self.current
        self._open_phases.append(name)
        try:
            yield
        finally:
            self._open_phases.remove(name)

    def steady_peak(self, since):
        """The peak since the mark ``since`` had every storage allocated after it that is
        still alive (the state a step leaves for the next) existed from the start: the
        peak of the next, identical step. A bound from above: a leftover the next step
        replaces early (the model's last input tensor) counts for all of it."""
        survivors = sorted(((seq, nb) for nb, seq, _ in self._live.values() if seq > since),
                           reverse=True)
        best, later, i = 0, 0, 0
        for seq, live in reversed(self._timeline):
            while i < len(survivors) and survivors[i][0] > seq:
                later += survivors[i][1]
                i += 1
            best = max(best, live + later)
        return best

    def stop(self):
        """Forget every storage (its weak reference goes, so frees cost nothing after)."""
        self._live.clear()
        self._timeline = []

    # -- the dispatch hook ---------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _DEVICE and self.fake:
            # The autograd engine asks every fake tensor for its device (most of the
            # ops a fake step dispatches); answer as FakeTensorMode would, here.
            return args[0].fake_device
        if func is _HOST_READ:
            self.host_reads += 1
            if self.fake:
                return False if args[0].dtype == torch.bool else (
                    0.0 if args[0].is_floating_point() or args[0].is_complex() else 0)
        if self.fake and kwargs.get("device") is not None \
                and torch.device(kwargs["device"]).type not in ("cpu", "meta"):
            kwargs = {**kwargs, "device": torch.device("cpu")}
        if self.fake and _only_real_tensors(args, kwargs):
            # Host-side state that never was fake (RNG states from get_rng_state, which
            # dispatches nothing) stays real: a fake copy could not be set back.
            with unset_fake_temporarily():
                out = func(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.add(t)
        for observe in self.observers:
            observe(func, args, kwargs, out)
        return out


def _only_real_tensors(args, kwargs):
    # Op arguments are tensors or flat lists of them: no pytree walk (it runs per op).
    found = False
    for a in (*args, *kwargs.values()):
        for t in (a if isinstance(a, (list, tuple)) else (a,)):
            if isinstance(t, FakeTensor):
                return False
            found = found or isinstance(t, torch.Tensor)
    return found


def state_storages(model_chunks, optimizer):
    """What a run keeps between steps, by category: ``{"parameters", "gradients",
    "master_weights", "optimizer_state"}`` -> list of tensors, each storage in the first
    category that holds it (a master that is the model param itself is a parameter)."""
    params, grads, masters, state = [], [], [], []
    for chunk in model_chunks:
        params += list(unwrap_model(chunk).parameters()) + list(unwrap_model(chunk).buffers())
        for b in getattr(chunk, "buffers_", []):  # the DDP grad buffers
            grads.append(b.data)
            if b.param_data is not None:
                params.append(b.param_data)
    if optimizer is not None:
        inner = getattr(optimizer, "optimizer", optimizer)
        for group in inner.param_groups:
            masters += list(group["params"])
        for s in inner.state.values():
            state += [v for v in s.values() if isinstance(v, torch.Tensor)]
    categories = {"parameters": params, "gradients": grads, "master_weights": masters,
                  "optimizer_state": state}
    seen, out = set(), {}
    for name, tensors in categories.items():
        out[name] = []
        for t in tensors:
            key = _storage_key(t.untyped_storage())
            if key not in seen:
                seen.add(key)
                out[name].append(t)
    return out


def state_bytes(model_chunks, optimizer):
    """Bytes of each category of ``state_storages`` (distinct storages)."""
    def nbytes(tensors):
        return sum(t.untyped_storage().nbytes() for t in tensors)
    return {k: nbytes(v) for k, v in state_storages(model_chunks, optimizer).items()}
