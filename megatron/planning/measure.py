"""Measured figures the plans are checked against: live tensor bytes during a real step, GEMM peak.

``LiveTensorBytes`` follows, while it is active, every tensor storage an
operator allocates (an output whose storage is none of the op's inputs'), until
it is freed: its running total and peak are the activation and temporary bytes
of the code it watches, on any device. ``measure_step_memory`` runs real
training steps of a config on this rank (the real model, DDP buffers,
optimizer and schedule, random tokens) and returns the bytes of what persists
between steps and the peak during one step; ``bench/memory_model.py`` and
``tests/test_memory_model.py`` compare them with the analytic memory model.
``measure_peak_gflops`` times a large GEMM: the yardstick of MFU when no
hardware profile is named (and of ``bench/throughput.py``).
"""
import functools
import gc
import time
import warnings
import weakref

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode


class LiveTensorBytes(TorchDispatchMode):
    """A dispatch mode counting the bytes of storages allocated while it is active.

    ``current`` is what is still alive, ``peak`` the most at any moment. Storages
    that existed before (parameters, buffers) are never counted, even when an op
    writes into them or returns a view of them. Each storage counts once, however
    many views share it, and leaves the count when it is freed.
    """

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._tracked = {}  # id(storage) -> weakref (the storage's Python object lives as long as it)

    def _release(self, key, nbytes, _ref):
        self._tracked.pop(key, None)
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {id(t.untyped_storage()) for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key = id(st)
            if key in inputs or key in self._tracked:
                continue
            nbytes = st.nbytes()
            self._tracked[key] = weakref.ref(st, functools.partial(self._release, key, nbytes))
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        return out


def live_storage_bytes():
    """Bytes of the distinct storages of every tensor the Python heap holds now."""
    seen = {}
    with warnings.catch_warnings():  # isinstance() on deprecated torch objects warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
                    st = obj.untyped_storage()
                    seen[st.data_ptr()] = st.nbytes()
            except (RuntimeError, ReferenceError):  # a tensor without storage (e.g. sparse)
                continue
    return sum(seen.values())


def _unique_bytes(tensors):
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def static_breakdown(model_chunks, optimizer):
    """Bytes of what persists between steps on this rank, by kind: ``params``, ``grads``
    (the DDP grad buffers), ``masters`` (fp32 copies the optimizer owns beyond the params)
    and ``optimizer_state`` (Adam moments)."""
    params = [p for c in model_chunks for p in c.parameters()]
    grads = [b.data for c in model_chunks for b in getattr(c, "buffers_", [])]
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    inner = optimizer.optimizer
    masters = [p for g in inner.param_groups for p in g["params"]
               if p.untyped_storage().data_ptr() not in param_ptrs]
    state = [v for s in inner.state.values() for v in s.values()
             if isinstance(v, torch.Tensor) and v.numel() > 1]
    return {"params": _unique_bytes(params), "grads": _unique_bytes(grads),
            "masters": _unique_bytes(masters), "optimizer_state": _unique_bytes(state)}


def _random_forward_step(cfg, vocab_size, seed):
    """A forward step on uniformly random tokens (the data loader's batch format)."""
    t = cfg.training
    g = torch.Generator().manual_seed(seed)

    def forward_step(data_iterator, model):
        b, s = t.micro_batch_size, cfg.model.seq_length
        tokens = torch.randint(0, vocab_size, (b, s), generator=g)
        labels = torch.randint(0, vocab_size, (b, s), generator=g)
        output = model(tokens, None, labels=labels)

        def loss_func(per_token_loss):
            loss = per_token_loss.float().mean()
            return loss, {"lm loss": loss.detach()}
        return output, loss_func
    return forward_step


def measure_step_memory(cfg, padded_vocab_size, steps=2):
    """Run ``steps`` real training steps of ``cfg`` on this rank (process groups and the
    model-parallel layout set up by the caller; CPU) and measure the last one.

    Returns a dict of bytes: ``static`` (every live tensor storage before the measured step:
    params, grad buffers, fp32 masters, Adam state), its ``breakdown``
    (``static_breakdown``), ``step_peak`` (the most bytes the step allocated on top, at
    once: activations, their grads, communication and optimizer temporaries) and ``peak``
    (their sum).
    """
    from megatron import mpu
    from megatron.model import GPTModel
    from megatron.optimizer import get_megatron_optimizer
    from megatron.train_step import StepSchedule, train_step
    from megatron.training import build_model, build_scheduler

    mpu.model_parallel_seed(cfg.training.seed)

    def provider(pre_process, post_process):
        return GPTModel(cfg, padded_vocab_size, pre_process=pre_process,
                        post_process=post_process)
    chunks = build_model(cfg, provider, torch.device("cpu"))
    optimizer = get_megatron_optimizer(cfg, chunks)
    scheduler = build_scheduler(cfg, optimizer)
    schedule = StepSchedule.from_config(cfg)
    forward_step = _random_forward_step(cfg, padded_vocab_size, cfg.training.seed + mpu.get_global_rank())
    for _ in range(steps - 1):
        train_step(schedule, forward_step, None, chunks, optimizer, scheduler)
    gc.collect()
    static = live_storage_bytes()
    breakdown = static_breakdown(chunks, optimizer)
    with LiveTensorBytes() as tracker:
        train_step(schedule, forward_step, None, chunks, optimizer, scheduler)
    return {"static": static, "breakdown": breakdown, "step_peak": tracker.peak,
            "peak": static + tracker.peak}


def synchronize(device):
    """Wait for ``device``'s queued work (a no-op on CPU), so wall time measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak_gflops(device, repeats=5, n=None):
    """Best GEMM rate of a few runs, fp32 2048^3 on CPU, bf16 8192^3 on GPU:
    (GFLOP per wall second, GFLOP per process CPU second)."""
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = n or (8192 if device.type == "cuda" else 2048)
    # A generator of its own: a training run measuring its peak must not move the global
    # RNG streams (dropout, exact resume).
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    c = torch.empty(n, n, device=device, dtype=dtype)
    torch.matmul(a, b, out=c)
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        synchronize(device)
        c0, t0 = time.process_time(), time.perf_counter()
        torch.matmul(a, b, out=c)
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    # The second figure is per process CPU second (all threads), the yardstick for CPU-time MFU.
    return 2 * n ** 3 / best / 1e9, 2 * n ** 3 / max(best_cpu, 1e-9) / 1e9


@functools.lru_cache(maxsize=None)
def startup_peak_flops(device_type):
    """FLOP/s of this process's device measured once (a 1024^3 GEMM on CPU, 8192^3 bf16
    on GPU, best of 3): the MFU yardstick of a run that names no hardware profile."""
    n = 1024 if device_type == "cpu" else None
    return measure_peak_gflops(torch.device(device_type), repeats=3, n=n)[0] * 1e9
