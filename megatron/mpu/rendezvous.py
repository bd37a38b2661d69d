"""A store namespace of its own for each launch round of workers under torchrun.

Why it exists: torchrun's c10d rendezvous shares one TCPStore, hosted by the agent,
with every round of workers of a job (``TORCHELASTIC_USE_AGENT_STORE=True``, the
same ``MASTER_ADDR:MASTER_PORT`` after each restart), and torch's ``env://``
handler gives each worker a plain client of it, with no per-round prefix. Process
groups keep their keys under fixed names (the default group's, then each subgroup's
in creation order), so after a worker is killed and the agent restarts the group,
the killed round's keys are still in the store: a new rank that reads a peer's
address before the peer has rewritten it connects to a dead port (gloo:
``connectFullMesh ... Connection refused``; nccl: the old unique id) and fails, and
each such failure costs one more restart round.

``TORCHELASTIC_RESTART_COUNT`` cannot name the round on more than one node: only
the agent of the failed worker counts a restart; an agent whose workers were
healthy restarts them for the new round without counting, so nodes disagree.

So the round agrees on a number nothing has used before: global rank 0 takes it
from a counter on the shared store, and each other rank takes a ticket from a
second counter and waits for rank 0's answer under that ticket's key. A ticket is
new, and every worker of earlier rounds is dead before the agents start a new
round, so that key can only have been written by this round's rank 0.
"""
import datetime
import time

import torch.distributed as dist

_PREFIX = "megatron/round/"
_IDS = _PREFIX + "ids"            # counter: the numbers of rounds handed out
_TICKETS = _PREFIX + "tickets"    # counter: the tickets other ranks took
_ANSWERED = _PREFIX + "answered"  # the highest ticket rank 0 has answered so far


def _answer_key(ticket):
    return f"{_PREFIX}answer/{ticket}"


def _joined_key(round_id):
    return f"{_PREFIX}{round_id}/joined"


def _answer_tickets(store, round_id, world_size, timeout):
    """Rank 0: answer every ticket taken so far with ``round_id`` until the other
    ``world_size - 1`` ranks have joined the round (or ``timeout`` passes)."""
    answered = int(store.get(_ANSWERED)) if store.check([_ANSWERED]) else 0
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        last = store.add(_TICKETS, 0)
        if last > answered:
            # Tickets of dead rounds that were never answered get this round's number
            # too; nobody waits for them any more.
            keys = [_answer_key(t) for t in range(answered + 1, last + 1)]
            store.multi_set(keys, [str(round_id)] * len(keys))
            store.set(_ANSWERED, str(last))
            answered = last
        if store.add(_joined_key(round_id), 0) >= world_size - 1:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"rank 0 waited {timeout} for the other {world_size - 1} ranks to join "
                f"launch round {round_id} on the store at {store.host}:{store.port}; "
                f"{store.add(_joined_key(round_id), 0)} joined")
        time.sleep(0.005)


def launch_round_store(host, port, rank, world_size, timeout_minutes):
    """A client of the launcher's store at ``host:port`` under a prefix that only this
    round of workers uses (see the module doc). Every rank of the round must call it;
    rank 0 returns once all the others have taken their round number."""
    timeout = datetime.timedelta(minutes=timeout_minutes)
    store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    if rank == 0:
        round_id = store.add(_IDS, 1)
        _answer_tickets(store, round_id, world_size, timeout)
    else:
        ticket = store.add(_TICKETS, 1)
        round_id = int(store.get(_answer_key(ticket)))  # waits up to `timeout`
        store.add(_joined_key(round_id), 1)
    return dist.PrefixStore(f"{_PREFIX}{round_id}/", store)
