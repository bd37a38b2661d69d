"""One harness for every multi-process test: launch k CPU processes on gloo.

``run_distributed(fn, world_size, *args, **kwargs)`` spawns ``world_size``
processes, initializes a gloo process group in each (rank r of world_size), runs
``fn(*args, **kwargs)`` and returns the list of per-rank return values (rank
order). ``fn`` must be a module-level function (it is pickled by spawn) and
its return value must be picklable (tensors, numbers, dicts, lists). An
exception in any rank fails the call with that rank's traceback; a rank that
hangs fails it after ``timeout`` seconds.

The model-parallel state is not initialized here: ``fn`` calls
``megatron.mpu.initialize_model_parallel(...)`` itself, with the layout it
tests, and the harness destroys it afterwards.
"""
import os
import socket
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port():
    """A TCP port on loopback that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, outdir, fn, args, kwargs):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    out = os.path.join(outdir, f"rank{rank}.pt")
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(*args, **kwargs)
        torch.save({"ok": True, "result": result}, out)
    except BaseException:  # report every failure to the parent, then die
        torch.save({"ok": False, "error": traceback.format_exc()}, out)
        raise
    finally:
        try:
            from megatron import mpu
            if mpu.model_parallel_is_initialized():
                mpu.destroy_model_parallel()
        except Exception:
            pass
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size, *args, timeout=300, **kwargs):
    """Run ``fn`` on ``world_size`` gloo ranks; return the per-rank results."""
    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.start_processes(_worker, args=(world_size, free_port(), outdir, fn, args, kwargs),
                                 nprocs=world_size, join=False, start_method="spawn")
        errors = []
        try:
            import time
            deadline = time.monotonic() + timeout
            while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"distributed test did not finish in {timeout}s "
                                       f"(world_size={world_size}, fn={fn.__name__})")
        except mp.ProcessRaisedException as e:
            errors.append(str(e))
        except mp.ProcessExitedException as e:
            errors.append(str(e))
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        results = []
        for rank in range(world_size):
            path = os.path.join(outdir, f"rank{rank}.pt")
            if not os.path.exists(path):
                results.append(None)
                continue
            rec = torch.load(path, weights_only=False)
            if not rec["ok"]:
                errors.append(f"rank {rank}:\n{rec['error']}")
            results.append(rec.get("result"))
        if errors:
            raise AssertionError("distributed test failed:\n" + "\n".join(errors))
        return results
