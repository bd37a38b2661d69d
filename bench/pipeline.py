"""Measure the pipeline bubble of the 1F1B and interleaved schedules on CPU.

Spawns p gloo processes, one per pipeline stage, each holding stand-in model
chunks whose forward takes a fixed time t_f / v and whose backward 2 t_f / v
per micro batch (sleep-timed by default, so the figure measures the schedule
and its communication, not CPU contention between the processes). For each
(p, m, v) it runs whole global batches through
``megatron.schedules`` and reports, per stage, the idle fraction
``1 - busy / wall`` averaged over stages, beside the theory:

    idle / total = (p - 1) / (v m + p - 1)    (v = 1: (p - 1) / (m + p - 1))

i.e. a bubble of (p - 1)(t_f + t_b) / v on top of the ideal m (t_f + t_b).
``--work matmul`` replaces the sleeps by calibrated matrix products (real
compute; noisy when the cores are shared).

    python bench/pipeline.py [--tf-ms 20] [--iters 3] [--work sleep|matmul]

The last line is ``key=value`` figures: ``bubble_*`` measured, ``theory_*``.
"""
import argparse
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# (p, m, v) measured; grouped by p so that one launch serves each p.
CASES = [(2, 4, 1), (2, 4, 2), (2, 8, 1), (2, 8, 2),
         (4, 8, 1), (4, 8, 2), (4, 8, 4), (4, 16, 1), (4, 16, 2)]
SHAPE = (1, 1, 8)


class _Work:
    """Fixed-duration 'compute': a sleep, or matmuls calibrated to take as long."""

    def __init__(self, kind):
        self.kind = kind
        self.busy = 0.0
        self.a = torch.randn(64, 64)
        self.per_matmul = None
        if kind == "matmul":
            start, n = time.perf_counter(), 200
            for _ in range(n):
                self.a @ self.a
            self.per_matmul = (time.perf_counter() - start) / n

    def __call__(self, seconds):
        start = time.perf_counter()
        if self.kind == "sleep":
            time.sleep(seconds)
        else:
            for _ in range(max(1, round(seconds / self.per_matmul))):
                self.a @ self.a
        self.busy += time.perf_counter() - start


class _Timed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, work, tf):
        ctx.work, ctx.tf = work, tf
        work(tf)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.work(2 * ctx.tf)
        return grad, None, None


class _Chunk(torch.nn.Module):
    """A stage chunk: a scale parameter and a fixed forward/backward time."""

    def __init__(self, work, tf):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.work, self.tf = work, tf
        self.input_tensor = None

    def set_input_tensor(self, tensor):
        self.input_tensor = tensor

    def forward(self, x):
        inp = x if self.input_tensor is None else self.input_tensor
        return _Timed.apply(inp * self.weight, self.work, self.tf)


def _forward_step(data_iterator, model):
    from megatron.mpu import parallel_state as ps
    out = model(torch.ones(SHAPE) if ps.is_pipeline_first_stage() else None)
    return out, lambda o: (o.sum(), {})


def _measure(p, m, v, tf, iters, kind):
    from megatron import schedules as sched
    from megatron.mpu import parallel_state as ps
    ps.set_virtual_pipeline_model_parallel_world_size(v if v > 1 else None)
    ps.set_virtual_pipeline_model_parallel_rank(0 if v > 1 else None)
    work = _Work(kind)
    chunks = [_Chunk(work, tf / v) for _ in range(v)]
    fn = (sched.forward_backward_pipelining_with_interleaving if v > 1
          else sched.forward_backward_pipelining_without_interleaving)
    fractions, walls = [], []
    for it in range(iters + 1):  # the first is a warm-up
        dist.barrier()
        work.busy = 0.0
        start = time.perf_counter()
        fn(_forward_step, None, chunks if v > 1 else chunks[0], m, tensor_shape=SHAPE,
           dtype=torch.float32)
        # The pipeline is flushed when its slowest stage is done: a stage that
        # finishes early idles until then (as before an optimizer step).
        dist.barrier()
        wall = time.perf_counter() - start
        if it > 0:
            fractions.append(1.0 - work.busy / wall)
            walls.append(wall)
    ps.set_virtual_pipeline_model_parallel_world_size(None)
    ps.set_virtual_pipeline_model_parallel_rank(None)
    mine = torch.tensor([sum(fractions) / len(fractions), sum(walls) / len(walls)],
                        dtype=torch.float64)
    every = [torch.zeros_like(mine) for _ in range(p)]
    dist.all_gather(every, mine)
    return [float(t[0]) for t in every], max(float(t[1]) for t in every)


def _worker(rank, p, port, cases, tf, iters, kind, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=p)
    from megatron.mpu import parallel_state as ps
    ps.initialize_model_parallel(1, p)
    try:
        for (_, m, v) in cases:
            measured = _measure(p, m, v, tf, iters, kind)
            if rank == 0:
                queue.put(((p, m, v), measured))
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    """Run every case, print a table and the key=value line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tf-ms", type=float, default=40.0,
                        help="forward time of one micro batch through one stage (ms)")
    parser.add_argument("--iters", type=int, default=3, help="measured global batches per case")
    parser.add_argument("--work", choices=("sleep", "matmul"), default="sleep")
    args = parser.parse_args()
    tf = args.tf_ms / 1000.0

    ctx = mp.get_context("spawn")
    results = {}
    for p in sorted({c[0] for c in CASES}):
        cases = [c for c in CASES if c[0] == p]
        queue = ctx.Queue()
        port = _free_port()
        procs = [ctx.Process(target=_worker, args=(r, p, port, cases, tf, args.iters, args.work,
                                                    queue)) for r in range(p)]
        for proc in procs:
            proc.start()
        for _ in cases:
            key, measured = queue.get(timeout=600)
            results[key] = measured
        for proc in procs:
            proc.join()
            if proc.exitcode != 0:
                sys.exit(f"bench worker failed with exit code {proc.exitcode} (p={p})")

    print(f"pipeline bubble on CPU/gloo, {args.work} work, t_f={args.tf_ms:g} ms, t_b=2 t_f, "
          f"{args.iters} global batches per case; idle fraction = 1 - busy/wall per stage, "
          f"wall up to the pipeline flush")
    print("overhead = (measured wall - theoretical wall) per forward or backward step of a chunk")
    print(f"{'schedule':<12}{'p':>3}{'m':>4}{'v':>3}  {'measured':>9}  {'theory':>7}  "
          f"{'overhead ms':>11}  {'per stage':<}")
    figures = []
    for (p, m, v) in CASES:
        per_stage, wall = results[(p, m, v)]
        measured = sum(per_stage) / len(per_stage)
        theory = (p - 1) / (v * m + p - 1)
        ideal_wall = 3 * tf * (m + (p - 1) / v)
        overhead_ms = 1000 * (wall - ideal_wall) / (2 * m * v)
        name = "1f1b" if v == 1 else "interleaved"
        print(f"{name:<12}{p:>3}{m:>4}{v:>3}  {measured:>9.3f}  {theory:>7.3f}  "
              f"{overhead_ms:>11.2f}  " + " ".join(f"{x:.3f}" for x in per_stage))
        tag = f"p{p}_m{m}" + ("" if v == 1 else f"_v{v}")
        figures += [f"bubble_{name}_{tag}={measured:.3f}", f"theory_{name}_{tag}={theory:.3f}"]
    print(" ".join(figures))


if __name__ == "__main__":
    main()
