"""What several benches share: a few spawned gloo ranks, and child processes that import
the same ``megatron`` as the bench.

Benches run as scripts (``python bench/x.py``), so this directory is first on
``sys.path`` and ``import harness`` finds this file; ``megatron`` comes from the
installed package (``pip install -e .``), or from ``PYTHONPATH``.
"""
import os
import queue as queue_module
import socket
import time


def megatron_env(**extra):
    """``os.environ`` plus ``extra``, with ``PYTHONPATH`` led by the directory holding the
    ``megatron`` this process imports, so that a child interpreter measures the same code."""
    import megatron
    root = os.path.dirname(os.path.dirname(os.path.abspath(megatron.__file__)))
    paths = [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths), **extra)


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, world_size, port, fn, args, results):
    import torch
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results.put((rank, fn(*args)))
    finally:
        from megatron import mpu
        if mpu.model_parallel_is_initialized():
            mpu.destroy_model_parallel()
        if dist.is_initialized():  # fn may have left the group itself (bench/dry_run.py)
            dist.destroy_process_group()


def run_ranks(fn, world_size, *args, timeout=1800):
    """Run ``fn(*args)`` on ``world_size`` spawned CPU gloo ranks; the per-rank results.

    ``fn`` is a module-level function that sets up its own model-parallel layout;
    its result must be picklable. A rank that dies, or a run past ``timeout``
    seconds, raises RuntimeError (the rank's traceback is on stderr)."""
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, world_size, port, fn, args, results))
             for r in range(world_size)]
    for p in procs:
        p.start()
    out, deadline = {}, time.monotonic() + timeout
    try:
        while len(out) < world_size:
            try:
                rank, result = results.get(timeout=1.0)
                out[rank] = result
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"{fn.__name__} on {world_size} ranks: "
                                       + (f"rank(s) {dead} failed" if dead else f"over {timeout}s"))
        for p in procs:
            p.join()
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    return [out[r] for r in range(world_size)]
