"""Kill a training run at random moments until it completes; compare it with an uninterrupted run.

A run is ``pretrain_gpt.py`` with ``checkpoint.save`` = ``checkpoint.load``, so each start
resumes from the newest checkpoint: either one process, which ``run_with_kills`` starts
again after each kill, or ``torchrun --standalone --nproc_per_node=N --max-restarts=K``,
whose agent restarts the workers itself. The moments (``Moment.kind``):

- ``startup``: a random delay after the (re)start, within the uninterrupted run's time
  until training begins (imports, rendezvous, model, data, checkpoint loading), and at
  the latest when this start's training begins;
- ``train``: a random delay after the log line of a random iteration of this start;
  with ``before`` (e.g. the first save), a random point between the start of training
  and the iteration before that one;
- ``save``: while a checkpoint is written. After the log line of an iteration that saves,
  the workers run in short slices: stopped (SIGSTOP) between two, while the folder is
  looked for; when an ``iter_N.tmp`` folder made by this start is there, one worker is
  SIGKILLed (at a random sighting). Nothing in the training code waits for this.

A kill counts as mid-save when that folder is still there once every worker of the
start is dead (a torn save, not one another rank completed). ``compare`` checks the last
logged training and validation loss of every iteration (the console line's text) and
every tensor and value of the final checkpoint's files, bit for bit.

Used by bench/faults.py (the long form) and tests/test_faults.py.
"""
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Optional

import harness

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY = os.path.join(ROOT, "pretrain_gpt.py")
TRAINING = re.compile(r"training: iterations (\d+) -> (\d+)")
ITERATION = re.compile(r"^ iteration\s+(\d+)/\s*\d+ \|.*\| lm loss: (\S+) \|")
VALIDATION = re.compile(r" validation loss at iteration (\d+) \| lm loss value: (\S+) \|")
ROUND = "Rendezvous complete for workers"  # the agent's line per round (LOGLEVEL=INFO)


@dataclass
class Moment:
    """When to kill: ``kind`` startup|train|save, ``fraction`` in [0, 1) picks the point
    in that window, ``rank`` the worker (torchrun), ``before`` bounds a train kill."""
    kind: str
    fraction: float
    rank: int = 0
    before: Optional[int] = None


def make_plan(rng, kills, mid_saves, nproc=1, first_before=None):
    """``kills`` moments: ``mid_saves`` of them "save" at random places, the first a "train"
    kill before iteration ``first_before`` (before the first checkpoint) when given, the
    others "startup" or "train" (one in four startup)."""
    kinds = ["save"] * mid_saves + ["startup" if rng.random() < 0.25 else "train"
                                    for _ in range(kills - mid_saves - (first_before is not None))]
    rng.shuffle(kinds)
    if first_before is not None:
        kinds.insert(0, "train")
    return [Moment(kind, rng.random(), rng.randrange(nproc),
                   first_before if i == 0 and first_before is not None else None)
            for i, kind in enumerate(kinds)]


class _Output:
    """The run's console, read in a thread: every line with the time it arrived."""

    def __init__(self, stream):
        self.lines = []
        self.closed = False
        self._cond = threading.Condition()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream):
        for line in stream:
            with self._cond:
                self.lines.append((time.monotonic(), line.rstrip("\n")))
                self._cond.notify_all()
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def wait_for(self, pattern, start, deadline):
        """(index, match) of the first line from index ``start`` matching ``pattern``;
        None when the output ends or the deadline passes first."""
        i = start
        with self._cond:
            while True:
                while i < len(self.lines):
                    m = pattern.search(self.lines[i][1])
                    if m:
                        return i, m
                    i += 1
                if self.closed or time.monotonic() > deadline:
                    return None
                self._cond.wait(timeout=0.05)

    def text(self):
        with self._cond:
            return "\n".join(line for _, line in self.lines)


def _state(pid):
    """The /proc state letter of ``pid`` (R, S, T, Z, ...), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def _alive(pid):
    return _state(pid) not in (None, "Z", "X")


def _children(pid):
    found = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found += [int(p) for p in f.read().split()]
    except (FileNotFoundError, ProcessLookupError):
        pass
    return found


def _rank_of(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        return int(env[b"RANK"])
    except (FileNotFoundError, ProcessLookupError, KeyError, ValueError):
        return None


def _signal(pids, sig):
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class Launch:
    """One ``pretrain_gpt.py`` command: a plain process (``nproc`` 1) or torchrun's agent
    with ``nproc`` workers and ``max_restarts``; its console in ``out``."""

    def __init__(self, overrides, nproc=1, max_restarts=0):
        self.nproc = nproc
        script = [ENTRY, "--config", os.devnull, *overrides]
        if nproc == 1:
            self.cmd = [sys.executable, *script]
        else:
            self.cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc_per_node={nproc}", f"--max-restarts={max_restarts}", *script]
        env = harness.megatron_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", LOGLEVEL="INFO")
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
        self.env = env

    def start(self):
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, cwd=ROOT, env=self.env, start_new_session=True)
        self.started = time.monotonic()
        self.out = _Output(self.proc.stdout)
        return self

    def workers(self):
        """{rank: pid} of the live workers (the process itself when ``nproc`` is 1)."""
        if self.nproc == 1:
            return {0: self.proc.pid} if _alive(self.proc.pid) else {}
        ranks = {}
        for pid in _children(self.proc.pid):
            rank = _rank_of(pid) if _alive(pid) else None
            if rank is not None:
                ranks[rank] = pid
        return ranks

    def wait(self, deadline):
        """The exit code; the whole process group is killed at the deadline (None)."""
        try:
            return self.proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            return None


def _iteration_dir(root, iteration):
    return os.path.join(root, f"iter_{iteration:07d}")


def _latest(root):
    try:
        with open(os.path.join(root, "latest_checkpointed_iteration.txt")) as f:
            return int(f.read().strip())
    except (FileNotFoundError, ValueError):
        return None


def _made_since(path, since_ns):
    try:
        return os.stat(path).st_mtime_ns >= since_ns
    except FileNotFoundError:
        return False


def _stopped(pids, deadline):
    """Wait until every pid is stopped (or gone): a signal is delivered asynchronously."""
    while time.monotonic() < deadline:
        if all(_state(p) in (None, "T", "t", "Z", "X") for p in pids):
            return
        time.sleep(0.0002)


class _Start:
    """One start of the workers (a process, or one torchrun round): where its output
    begins, when it began (wall clock, to tell its folders from older ones)."""

    def __init__(self, launch, line, wall_ns):
        self.launch, self.line, self.wall_ns = launch, line, wall_ns
        self.pids = set(launch.workers().values())


def _kill_save(start, moment, rng, save_root, save_interval, begin, end, reach, deadline):
    """Kill one worker while a checkpoint is written: of a save in (begin, begin + reach],
    or of a later one when those finish between two looks.

    From the save iteration's log line on, the workers run in slices of a fraction of a
    millisecond, stopped between two slices while the folder is looked for, so that a
    save of a few milliseconds is seen several times."""
    launch = start.launch
    saves = [k for k in range(begin + 1, end + 1) if k % save_interval == 0 or k == end]
    near = sum(k <= begin + reach for k in saves)
    looks = rng.randrange(4)  # further sightings before the kill: anywhere in the save
    for k in saves[int(moment.fraction * near):]:
        if launch.out.wait_for(re.compile(rf"^ iteration\s+{k}/"), start.line, deadline) is None:
            return None
        tmp = _iteration_dir(save_root, k) + ".tmp"
        workers = launch.workers()
        victim, pids = workers.get(moment.rank), list(workers.values())
        if victim is None:
            return None
        seen = False
        while time.monotonic() < deadline:
            _signal(pids, signal.SIGSTOP)
            try:
                _stopped(pids, deadline)
                if not _alive(victim):
                    return None
                if _made_since(tmp, start.wall_ns):
                    seen = True
                    if looks == 0:
                        _signal([victim], signal.SIGKILL)
                        return k
                    looks -= 1
                elif _latest(save_root) == k or launch.out.wait_for(
                        re.compile(rf"^ iteration\s+{k + 1}/"), start.line, 0) is not None:
                    break  # this save finished between two looks: try the next one
            finally:
                _signal(pids, signal.SIGCONT)
            time.sleep(0.0003)
        if seen:
            looks = 0  # the save ended before the chosen sighting: take the first next time
    return None


def _kill(start, moment, rng, timing, save_root, save_interval, kills_left, deadline):
    """Carry out ``moment`` on this start: (whether a worker was killed, the iteration
    it aimed at or None); not killed when the start ended first. Kills aim within the
    next (iterations left) / (kills left + 1) iterations, at least a save interval, so
    that the plan is spread over the run instead of reaching its end early."""
    launch = start.launch
    if moment.kind == "startup":
        # A random point of the uninterrupted run's startup time, but not after this
        # start's training has begun (a start can be quicker than the reference).
        launch.out.wait_for(TRAINING, start.line,
                            time.monotonic() + moment.fraction * timing["startup"])
        victim = launch.workers().get(moment.rank)
        _signal([victim] if victim else [], signal.SIGKILL)
        return victim is not None, None
    found = launch.out.wait_for(TRAINING, start.line, deadline)
    if found is None:
        return False, None
    begin, end = int(found[1].group(1)), int(found[1].group(2))
    reach = max(save_interval, (end - begin) // (kills_left + 1))
    if moment.kind == "save" and begin < end:
        k = _kill_save(start, moment, rng, save_root, save_interval, begin, end, reach, deadline)
        return k is not None, k
    if moment.before is not None and begin < moment.before - 1:
        # Before the first save: a random point of the iterations before it, from the
        # start of training on (at least an iteration's margin before the save ends).
        span = moment.before - 1 - begin
        time.sleep(moment.fraction * span * timing["iteration"])
        k = begin + 1 + int(moment.fraction * span)
    else:
        last = min(end, begin + reach)
        k = begin + 1 + int(moment.fraction * max(last - begin, 0))
        if begin < end and launch.out.wait_for(re.compile(rf"^ iteration\s+{k}/"), start.line,
                                               deadline) is None:
            return False, None
        time.sleep(rng.random() * timing["iteration"])  # within about an iteration
    victim = launch.workers().get(moment.rank)
    _signal([victim] if victim else [], signal.SIGKILL)
    return victim is not None, k


def _wait_gone(pids, deadline):
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.005)


def _next_start(launch, previous, deadline):
    """The next round of torchrun's workers: all ``nproc`` live and none of ``previous``."""
    while time.monotonic() < deadline and launch.proc.poll() is None:
        workers = launch.workers()
        if len(workers) == launch.nproc and not set(workers.values()) & previous:
            return _Start(launch, len(launch.out.lines), time.time_ns())
        time.sleep(0.005)
    return None


def reference(overrides, nproc=1, timeout=600):
    """The uninterrupted run: its console text and timing (``startup``: seconds until
    training begins; ``iteration``: median seconds between iteration lines)."""
    launch = Launch(overrides, nproc).start()
    code = launch.wait(time.monotonic() + timeout)
    text = launch.out.text()
    if code != 0:
        raise RuntimeError(f"the uninterrupted run failed (exit {code}):\n{text[-3000:]}")
    began = next(t for t, line in launch.out.lines if TRAINING.search(line))
    times = [t for t, line in launch.out.lines if ITERATION.search(line)]
    gaps = [b - a for a, b in zip(times, times[1:])] or [0.05]
    return text, {"startup": began - launch.started, "iteration": statistics.median(gaps)}


def run_with_kills(overrides, plan, timing, rng, save_root, save_interval, nproc=1,
                   timeout=900):
    """Run until completion, killing a worker at each moment of ``plan``.

    One process is started again after each kill; under torchrun (``nproc`` > 1, with
    ``--max-restarts=len(plan)``) the agent restarts the workers. Returns a dict:
    ``code`` (the last exit code), ``text`` (the whole console), ``kills`` (one dict per
    kill: kind, rank, iteration, mid_save, and the newest checkpoint once the start was
    dead), ``rounds`` (torchrun's rendezvous rounds, from its agent's log).
    """
    deadline = time.monotonic() + timeout
    kills = []
    if nproc == 1:
        texts = []
        for i, moment in enumerate(plan):
            launch = Launch(overrides).start()
            start = _Start(launch, 0, time.time_ns())
            killed, k = _kill(start, moment, rng, timing, save_root, save_interval,
                              len(plan) - i, deadline)
            launch.wait(deadline)
            texts.append(launch.out.text())
            if killed:
                kills.append(_record(moment, k, save_root, start))
        final = Launch(overrides).start()
        code = final.wait(deadline)
        return {"code": code, "text": "\n".join(texts + [final.out.text()]), "kills": kills,
                "rounds": None}
    launch = Launch(overrides, nproc, max_restarts=len(plan)).start()
    previous = set()
    for i, moment in enumerate(plan):
        start = _next_start(launch, previous, deadline)
        if start is None:
            break
        killed, k = _kill(start, moment, rng, timing, save_root, save_interval, len(plan) - i,
                          deadline)
        previous = start.pids | set(launch.workers().values())
        _wait_gone(previous, deadline)  # the agent stops the others; then the folder is final
        if killed:
            kills.append(_record(moment, k, save_root, start))
    code = launch.wait(deadline)
    text = launch.out.text()
    return {"code": code, "text": text, "kills": kills, "rounds": text.count(ROUND)}


def _record(moment, iteration, save_root, start):
    torn = (moment.kind == "save" and iteration is not None
            and _made_since(_iteration_dir(save_root, iteration) + ".tmp", start.wall_ns)
            and _latest(save_root) != iteration)
    return {"kind": moment.kind, "rank": moment.rank, "iteration": iteration, "mid_save": torn,
            "checkpoint": _latest(save_root)}


# ---------------------------------------------------------------- comparison
def logged_losses(text):
    """{"train": {iteration: text}, "valid": {...}}: the last logged value of each iteration."""
    found = {"train": {}, "valid": {}}
    for line in text.splitlines():
        for key, pattern in (("train", ITERATION), ("valid", VALIDATION)):
            m = pattern.search(line)
            if m:
                found[key][int(m.group(1))] = m.group(2)
    return found


def _diff(a, b, where, out):
    import numpy as np
    import torch
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    elif isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        same = np.array_equal(a, b)
    elif isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            out.append(f"{where}: keys {sorted(map(str, a))} != {sorted(map(str, b))}")
        for key in a.keys() & b.keys():
            _diff(a[key], b[key], f"{where}.{key}", out)
        return
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, f"{where}[{i}]", out)
        return
    else:
        same = type(a) is type(b) and repr(a) == repr(b)  # repr: NaN equals NaN
    if not same:
        out.append(where)


def final_checkpoint(root):
    """{relative path: loaded file (None for the manifest and other non-torch files)} of
    the newest checkpoint under ``root``."""
    import torch
    it_dir = _iteration_dir(root, _latest(root))
    files = {}
    for folder, _, names in os.walk(it_dir):
        for name in names:
            path = os.path.join(folder, name)
            files[os.path.relpath(path, it_dir)] = (
                torch.load(path, map_location="cpu", weights_only=True)
                if name.endswith(".pt") else None)
    return files


def compare(reference_text, reference_root, text, root):
    """What differs between a run and the uninterrupted one (empty: identical): the last
    logged losses of each iteration, the final checkpoint's iteration, files and every
    value in its torch files (the stored config holds the directories and is left out,
    and so the manifest of their checksums)."""
    out = []
    ref, got = logged_losses(reference_text), logged_losses(text)
    for key in ("train", "valid"):
        if ref[key] != got[key]:
            bad = sorted(i for i in ref[key].keys() | got[key].keys()
                         if ref[key].get(i) != got[key].get(i))
            out.append(f"{key} losses differ at iterations {bad[:10]}")
    if not ref["train"]:
        out.append("the uninterrupted run logged no loss")
    if _latest(reference_root) != _latest(root):
        return out + [f"final iteration {_latest(root)} != {_latest(reference_root)}"]
    a, b = final_checkpoint(reference_root), final_checkpoint(root)
    if a.keys() != b.keys():
        return out + [f"checkpoint files {sorted(b)} != {sorted(a)}"]
    for name in a:
        for state in (a[name], b[name]):
            if isinstance(state, dict):
                state.pop("config", None)
        _diff(a[name], b[name], name, out)
    return out
