"""Process groups: Megatron's membership, working collectives, stages, errors.

One 8-process gloo launch initializes several layouts in turn (TP=2 x PP=2 x
DP=2 first). Ranks decompose as ``rank = pp * (DP * TP) + dp * TP + tp`` (TP
ranks adjacent, pipeline stages strided by ``world / PP``), as in Megatron.
"""
import pytest
import torch
import torch.distributed as dist

from megatron import mpu
from tests.dist_harness import run_distributed

WORLD = 8
LAYOUTS = [(2, 2, None), (1, 1, None), (8, 1, None), (2, 4, None), (1, 8, None), (4, 2, 3)]


def _group_sum(group):
    """Sum of the global ranks in ``group`` via a real all-reduce."""
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t, group=group)
    return int(t.item())


def _observe(tp, pp, vpp):
    mpu.initialize_model_parallel(tp, pp, vpp)
    obs = {
        "initialized": mpu.model_parallel_is_initialized(),
        "tp": (mpu.get_tensor_model_parallel_rank(), mpu.get_tensor_model_parallel_world_size()),
        "pp": (mpu.get_pipeline_model_parallel_rank(), mpu.get_pipeline_model_parallel_world_size()),
        "dp": (mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()),
        "mp_size": mpu.get_model_parallel_world_size(),
        "tp_ranks": mpu.get_tensor_model_parallel_global_ranks(),
        "pp_ranks": mpu.get_pipeline_model_parallel_global_ranks(),
        "dp_ranks": mpu.get_data_parallel_global_ranks(),
        "embedding_ranks": mpu.get_embedding_global_ranks(),
        "tp_sum": _group_sum(mpu.get_tensor_model_parallel_group()),
        "pp_sum": _group_sum(mpu.get_pipeline_model_parallel_group()),
        "dp_sum": _group_sum(mpu.get_data_parallel_group()),
        "mp_sum": _group_sum(mpu.get_model_parallel_group()),
        "tp_src": mpu.get_tensor_model_parallel_src_rank(),
        "next": mpu.get_pipeline_model_parallel_next_rank(),
        "prev": mpu.get_pipeline_model_parallel_prev_rank(),
        "first": mpu.is_pipeline_first_stage(),
        "last": mpu.is_pipeline_last_stage(),
        "in_embedding": mpu.is_rank_in_embedding_group(),
    }
    group = mpu.get_embedding_group()
    obs["embedding_sum"] = None if group is None else _group_sum(group)
    if vpp is not None:
        stages = []
        for v in range(vpp):
            mpu.set_virtual_pipeline_model_parallel_rank(v)
            stages.append((mpu.get_virtual_pipeline_model_parallel_rank(),
                           mpu.is_pipeline_first_stage(), mpu.is_pipeline_last_stage(),
                           mpu.is_pipeline_first_stage(ignore_virtual=True),
                           mpu.is_pipeline_last_stage(ignore_virtual=True),
                           mpu.is_rank_in_embedding_group()))
        obs["virtual"] = (mpu.get_virtual_pipeline_model_parallel_world_size(), stages)
    try:
        mpu.initialize_model_parallel(tp, pp, vpp)
        obs["reinit_error"] = None
    except RuntimeError as e:
        obs["reinit_error"] = str(e)
    mpu.destroy_model_parallel()
    return obs


def _groups_worker():
    results = {layout: _observe(*layout) for layout in LAYOUTS}
    errors = {}
    for tp, pp in ((3, 1), (2, 3), (16, 1)):
        try:
            mpu.initialize_model_parallel(tp, pp)
            errors[(tp, pp)] = None
        except ValueError as e:
            errors[(tp, pp)] = str(e)
        errors[(tp, pp, "initialized")] = mpu.model_parallel_is_initialized()
    after_destroy = (mpu.model_parallel_is_initialized(), mpu.get_tensor_model_parallel_world_size(),
                     mpu.get_pipeline_model_parallel_rank(), mpu.get_tensor_model_parallel_group())
    return results, errors, after_destroy


@pytest.fixture(scope="module")
def world8():
    return run_distributed(_groups_worker, WORLD)


def test_tp2_pp2_dp2_membership_is_megatrons(world8):
    # Megatron's layout for 8 ranks, TP=2, PP=2, DP=2.
    tp_groups = [[0, 1], [2, 3], [4, 5], [6, 7]]
    pp_groups = [[0, 4], [1, 5], [2, 6], [3, 7]]
    dp_groups = [[0, 2], [1, 3], [4, 6], [5, 7]]
    mp_groups = [[0, 1, 4, 5], [2, 3, 6, 7]]
    for rank, (results, _, _) in enumerate(world8):
        obs = results[(2, 2, None)]
        mine = lambda groups: next(g for g in groups if rank in g)  # noqa: E731
        assert obs["tp_ranks"] == mine(tp_groups)
        assert obs["pp_ranks"] == mine(pp_groups)
        assert obs["dp_ranks"] == mine(dp_groups)
        assert obs["embedding_ranks"] == mine(pp_groups)
        assert obs["tp_sum"] == sum(mine(tp_groups))
        assert obs["pp_sum"] == sum(mine(pp_groups))
        assert obs["dp_sum"] == sum(mine(dp_groups))
        assert obs["mp_sum"] == sum(mine(mp_groups))
        assert obs["embedding_sum"] == sum(mine(pp_groups))
        assert obs["mp_size"] == 4 and obs["tp_src"] == mine(tp_groups)[0]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ranks_decompose_and_groups_work(world8, layout):
    tp, pp, vpp = layout
    dp = WORLD // (tp * pp)
    for rank, (results, _, _) in enumerate(world8):
        obs = results[layout]
        t, d, p = rank % tp, (rank // tp) % dp, rank // (tp * dp)
        assert obs["initialized"]
        assert obs["tp"] == (t, tp) and obs["dp"] == (d, dp) and obs["pp"] == (p, pp)
        assert obs["mp_size"] == tp * pp
        pipeline = [q * tp * dp + d * tp + t for q in range(pp)]
        assert obs["pp_ranks"] == pipeline
        assert obs["tp_sum"] == sum(range(rank - t, rank - t + tp))
        assert obs["dp_sum"] == sum(p * tp * dp + e * tp + t for e in range(dp))
        assert obs["pp_sum"] == sum(pipeline)
        assert obs["next"] == pipeline[(p + 1) % pp] and obs["prev"] == pipeline[(p - 1) % pp]
        ends = sorted({pipeline[0], pipeline[-1]})
        assert obs["embedding_ranks"] == ends
        on_end = rank in ends
        assert obs["embedding_sum"] == (sum(ends) if on_end else None)
        assert obs["in_embedding"] == (on_end if vpp is None else (p == 0))  # virtual chunk 0
        assert obs["reinit_error"] and "already initialized" in obs["reinit_error"]
        if vpp is None:
            assert obs["first"] == (p == 0) and obs["last"] == (p == pp - 1)
        else:
            size, stages = obs["virtual"]
            assert size == vpp
            for v, (vr, first, last, first_iv, last_iv, in_emb) in enumerate(stages):
                assert vr == v
                assert first == (p == 0 and v == 0) and last == (p == pp - 1 and v == vpp - 1)
                assert first_iv == (p == 0) and last_iv == (p == pp - 1)
                assert in_emb == (first or last)


def test_indivisible_world_sizes_are_one_line_errors(world8):
    for rank, (_, errors, after_destroy) in enumerate(world8):
        for tp, pp in ((3, 1), (2, 3), (16, 1)):
            message = errors[(tp, pp)]
            assert message is not None and "\n" not in message
            assert "(8)" in message and f"({tp})" in message and f"({pp})" in message
            assert errors[(tp, pp, "initialized")] is False
        assert after_destroy == (False, 1, 0, None)


def test_uninitialized_defaults_are_single_process():
    assert not mpu.model_parallel_is_initialized()
    assert mpu.get_tensor_model_parallel_world_size() == 1
    assert mpu.get_pipeline_model_parallel_world_size() == 1
    assert mpu.get_data_parallel_world_size() == 1
    assert mpu.get_tensor_model_parallel_rank() == 0
    assert mpu.get_pipeline_model_parallel_rank() == 0
    assert mpu.get_data_parallel_rank() == 0
    assert mpu.is_pipeline_first_stage() and mpu.is_pipeline_last_stage()
    assert mpu.is_rank_in_embedding_group()
    assert mpu.get_tensor_model_parallel_group() is None
    assert mpu.get_virtual_pipeline_model_parallel_world_size() is None
    assert mpu.get_pipeline_model_parallel_next_rank() == 0
    x = torch.randn(3, 4)
    assert torch.equal(mpu.reduce_from_tensor_model_parallel_region(x), x)
    assert torch.equal(mpu.gather_from_sequence_parallel_region(x), x)


def test_initialize_without_torch_distributed_says_so():
    if dist.is_initialized():
        pytest.skip("a default process group exists in this process")
    with pytest.raises(RuntimeError, match="torch.distributed"):
        mpu.initialize_model_parallel(1)
    assert not mpu.model_parallel_is_initialized()
