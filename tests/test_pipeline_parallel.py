"""Pipeline parallelism end to end: the real GPTModel split over stages, DDP
grad buffers, finalize_model_grads (tied embedding over the embedding group),
the optimizer with global-norm clipping across stages, and the schedule chosen
by ``schedules.get_forward_backward_func``.

Ten optimizer steps at PP=2, PP=4, TP=2 x PP=2 with 2 virtual stages, and
TP=2 x PP=2 x DP=2 with sequence parallelism and the distributed optimizer
give the single-process losses within 1e-5 relative at every iteration; PP=2
in bf16 stays within 2e-2. The Llama-style model (every option on: RoPE with
positions that restart mid-sequence, RMSNorm, SwiGLU, 2 query groups, no biases,
untied output layer) matches its own single-process losses at TP=2 x PP=2 x VP=2
x DP=2 with sequence parallelism, the distributed optimizer and selective
recompute, and at TP=2 x DP=4 with full recompute (the 1F1B schedule trains it at
TP=2 x PP=2 in tests/test_checkpoint_convert.py). One launch of 8 gloo processes.
"""
import pytest
import torch

from megatron import mpu
from megatron.config import Config
from tests.dist_harness import run_distributed
from tests.helpers.model import LLAMA_OPTIONS, reset_positions

VOCAB = 128
GLOBAL_BATCH = 8
MICRO_BATCH = 1
ITERS = 10
SEQ = 16


def _cfg(tp=1, pp=1, vp=None, sequence_parallel=False, distributed_optimizer=False,
         precision="fp32", llama=False, recompute="none"):
    cfg = Config()
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length = 4, 32, 4, SEQ
    m.hidden_dropout = m.attention_dropout = 0.0
    if llama:
        for key, value in LLAMA_OPTIONS.items():
            setattr(m, key, value)
    cfg.training.recompute = recompute
    cfg.training.micro_batch_size = MICRO_BATCH
    cfg.training.global_batch_size = GLOBAL_BATCH
    cfg.training.precision = precision
    cfg.optimizer.lr = 3e-3
    cfg.optimizer.clip_grad = 0.5  # small enough to clip: the norm must span all stages
    cfg.optimizer.lr_decay_style = "constant"
    p = cfg.parallel
    p.tensor_model_parallel_size, p.pipeline_model_parallel_size = tp, pp
    p.virtual_pipeline_model_parallel_size = vp
    p.sequence_parallel = sequence_parallel
    p.distributed_optimizer = distributed_optimizer
    return cfg


def _samples(iteration):
    """The global batch of one iteration: tokens and next-token labels."""
    g = torch.Generator().manual_seed(1000 + iteration)
    seq = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
    return seq[:, :-1], seq[:, 1:]


def _micro_batches(iteration, dp_rank, dp_size, llama=False):
    """This DP rank's micro batches: slice ``dp_rank`` of each group of micro x DP samples
    (for the Llama-style model, positions restart mid-sequence, as after an end of document)."""
    tokens, labels = _samples(iteration)
    positions = reset_positions(MICRO_BATCH, SEQ, [5 + iteration % 7]) if llama else \
        torch.arange(SEQ).expand(MICRO_BATCH, SEQ)
    out = []
    for j in range(GLOBAL_BATCH // (MICRO_BATCH * dp_size)):
        start = (j * dp_size + dp_rank) * MICRO_BATCH
        sl = slice(start, start + MICRO_BATCH)
        out.append({"tokens": tokens[sl], "labels": labels[sl], "position_ids": positions})
    return out


def _forward_step(data_iterator, model):
    # Draws a batch on every stage and chunk, as pretrain_gpt's forward step does.
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], labels=batch["labels"])

    def loss_func(per_token_loss):
        loss = per_token_loss.float().mean()
        return loss, {"lm loss": loss.detach()}
    return output, loss_func


def _train(cfg):
    """Build this rank's chunks, run ITERS steps; the mean loss per step on a last stage."""
    from megatron.model import GPTModel
    from megatron.mpu.distributed import DistributedDataParallel, finalize_model_grads
    from megatron.optimizer import get_megatron_optimizer
    from megatron.schedules import get_forward_backward_func
    from megatron.train_step import StepSchedule

    vp = cfg.parallel.virtual_pipeline_model_parallel_size or 1
    chunks = []
    for c in range(vp):
        if vp > 1:
            mpu.set_virtual_pipeline_model_parallel_rank(c)
        model = GPTModel(cfg, VOCAB, pre_process=mpu.is_pipeline_first_stage(),
                         post_process=mpu.is_pipeline_last_stage())
        model = model.to(dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[
            cfg.training.precision])
        chunks.append(DistributedDataParallel(
            model, accumulate_allreduce_grads_in_fp32=True,
            use_distributed_optimizer=cfg.parallel.distributed_optimizer))
    if vp > 1:
        mpu.set_virtual_pipeline_model_parallel_rank(0)
    optimizer = get_megatron_optimizer(cfg, chunks)
    forward_backward = get_forward_backward_func()
    step = StepSchedule.from_config(cfg)  # the shape and dtype that stages exchange
    dp_rank, dp_size = mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()
    num_micro = GLOBAL_BATCH // (MICRO_BATCH * dp_size)

    losses = []
    for it in range(ITERS):
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        data = iter(_micro_batches(it, dp_rank, dp_size,
                                   cfg.model.position_embedding_type == "rope"))
        dicts = forward_backward(_forward_step, data, chunks, num_micro,
                                 tensor_shape=step.tensor_shape, dtype=step.dtype,
                                 forward_only=False, grad_scale_func=optimizer.scale_loss)
        finalize_model_grads(chunks)
        ok, grad_norm, _ = optimizer.step()
        assert ok
        if mpu.is_pipeline_last_stage(ignore_virtual=True):
            assert len(dicts) == num_micro
            losses.append(sum(float(d["lm loss"]) for d in dicts) / num_micro)
        else:
            assert dicts == []
    return losses


def _run_layouts(layouts):
    """Each layout in turn on this process; per layout, this rank's (is last, losses)."""
    import torch.distributed as dist
    out = []
    for kwargs in layouts:
        mpu.initialize_model_parallel(kwargs.get("tp", 1), kwargs.get("pp", 1),
                                      virtual_pipeline_model_parallel_size=kwargs.get("vp"))
        losses = _train(_cfg(**kwargs))
        out.append((mpu.is_pipeline_last_stage(ignore_virtual=True), losses))
        dist.barrier()
        mpu.destroy_model_parallel()
    return out


def _layout_losses(results, index):
    """The iteration losses of one layout, averaged over the last stages (DP replicas)."""
    per_rank = [r[index][1] for r in results if r[index][0]]
    assert per_rank, "no last stage reported losses"
    return [sum(vals) / len(vals) for vals in zip(*per_rank)]


@pytest.fixture(scope="module")
def reference():
    """The single-process runs (no process groups: every size 1), GPT-2 and Llama-style."""
    assert not mpu.model_parallel_is_initialized()
    out = {}
    for llama in (False, True):
        losses = _train(_cfg(llama=llama))
        assert len(losses) == ITERS and losses[-1] < losses[0], losses
        out[llama] = losses
    assert out[True] != out[False]
    return out


def _assert_matches(got, want, name, rtol):
    assert len(got) == len(want) == ITERS, (name, got)
    for i, (g, w) in enumerate(zip(got, want)):
        assert abs(g - w) <= rtol * abs(w), f"{name}: iteration {i + 1}: {g} vs single {w}"


# (name, layout, relative tolerance against the fp32 single-process losses),
# all in one 8-process launch (process start-up dominates the cost here), so
# layouts smaller than 8 ranks run with data parallelism on top. bf16 sends
# bf16 activations between stages: its rounding allows only a loose match,
# but a wrong dtype on the wire would fail outright.
LAYOUTS = [
    ("PP=2 (x DP=4)", dict(pp=2), 1e-5),
    ("PP=4 (x DP=2)", dict(pp=4), 1e-5),
    ("TP=2 x PP=2 x VP=2 (x DP=2)", dict(tp=2, pp=2, vp=2), 1e-5),
    ("TP=2 x PP=2 x DP=2 +SP +distributed optimizer",
     dict(tp=2, pp=2, sequence_parallel=True, distributed_optimizer=True), 1e-5),
    ("PP=2 (x DP=4) bf16", dict(pp=2, precision="bf16"), 2e-2),
    ("Llama TP=2 x PP=2 x VP=2 (x DP=2) +SP +distributed optimizer, selective recompute",
     dict(llama=True, tp=2, pp=2, vp=2, sequence_parallel=True, distributed_optimizer=True,
          recompute="selective"), 1e-5),
    ("Llama TP=2 (x DP=4), full recompute", dict(llama=True, tp=2, recompute="full"), 1e-5),
]


def test_pipeline_losses_equal_single_process(reference):
    results = run_distributed(_run_layouts, 8, [kw for _, kw, _ in LAYOUTS], timeout=900)
    for index, (name, kwargs, rtol) in enumerate(LAYOUTS):
        _assert_matches(_layout_losses(results, index), reference[kwargs.get("llama", False)],
                        name, rtol)
