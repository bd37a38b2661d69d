"""Each torchrun launch round gets a store namespace of its own (mpu.launch_round_store),
and every process group gets training.distributed_timeout_minutes.

The rounds run as threads against one TCPStore, as torchrun's agent hosts it for every
round of a job: the ranks of a round agree on their namespace whichever starts first,
and a later round sees nothing the earlier one wrote, even after a rank of that round
died half-way through taking its number.
"""
import datetime
import threading

import torch
import torch.distributed as dist

from megatron import mpu

TIMEOUT_MINUTES = 0.5


def _round(port, world_size, delays):
    """Every rank's store of one round; rank r starts after delays[r] seconds."""
    stores, errors = [None] * world_size, []

    def rank(r):
        try:
            threading.Event().wait(delays[r])
            stores[r] = mpu.launch_round_store("127.0.0.1", port, r, world_size, TIMEOUT_MINUTES)
        except Exception as e:  # reported below
            errors.append(e)
    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and all(s is not None for s in stores), errors
    return stores


def test_rounds_agree_within_and_never_see_an_earlier_round():
    server = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False,
                           timeout=datetime.timedelta(seconds=30))
    first = _round(server.port, 3, [0.0, 0.0, 0.0])
    first[2].set("rank_0", "address of a process that is about to die")
    assert first[0].get("rank_0") == first[1].get("rank_0")  # one namespace for the round
    # A rank of the next round killed right after taking its ticket, before any answer.
    client = dist.TCPStore("127.0.0.1", server.port, 3, is_master=False)
    client.add("megatron/round/tickets", 1)
    # The next round: the other ranks come before rank 0 this time.
    second = _round(server.port, 3, [0.3, 0.0, 0.1])
    assert not any(s.check(["rank_0"]) for s in second)  # the dead round's key is not seen
    second[1].set("rank_0", "new address")
    assert [s.get("rank_0") for s in second] == [b"new address"] * 3
    assert first[0].get("rank_0") == b"address of a process that is about to die"


def test_every_group_gets_the_configured_timeout(monkeypatch):
    from megatron.initialize import destroy_megatron, init_distributed
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                "TORCHELASTIC_USE_AGENT_STORE"):
        monkeypatch.setenv(key, "")  # so that what init_distributed sets is undone afterwards
        monkeypatch.delenv(key)
    init_distributed(torch.device("cpu"), TIMEOUT_MINUTES)
    try:
        mpu.initialize_model_parallel(1, 1)
        groups = {"default": dist.group.WORLD, "tp": mpu.get_tensor_model_parallel_group(),
                  "dp": mpu.get_data_parallel_group(), "pp": mpu.get_pipeline_model_parallel_group(),
                  "mp": mpu.get_model_parallel_group(), "embedding": mpu.get_embedding_group()}
        # torch keeps a group's timeout in its backend's options (a private field).
        timeouts = {name: g._get_backend(torch.device("cpu")).options._timeout
                    for name, g in groups.items()}
        assert timeouts == {name: datetime.timedelta(seconds=30) for name in groups}, timeouts
        assert mpu.default_timeout() == datetime.timedelta(seconds=30)
    finally:
        destroy_megatron()
    assert mpu.default_timeout() is None
