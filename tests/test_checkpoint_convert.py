"""Resharding (tools/checkpoint_convert.py): a checkpoint trained by the training loop at
TP=2 x PP=2, converted to TP=1 x PP=1 and TP=4 x PP=1 (each padding the vocabulary to a
different size), gives the original loss on a fixed batch, and training resumes from it
exactly as from the original (optimizer resharded); the same through a virtual-pipeline
layout (PP=2 x VP=2) and back; generation from it at TP=4 equals TP=1, with and without
the key-value cache.

One 4-process launch; plus single-process checks of the split/merge rules. A second
launch does the same for the Llama-style model (every option on, positions restarting
after each document): trained at TP=2 x PP=2, resumed bit for bit, converted to TP=1 and
to PP=2 x VP=2 (SwiGLU's [gate; up] and the untied output layer re-split, the output
layer's vocabulary re-padded) and resumed there with the same losses, and generated from
at TP=1 and TP=2 with and without the key-value cache.
"""
import os

import pytest
import torch

from tests.dist_harness import run_distributed
from tests.helpers.training import (RESHARD_DIVISIBLE_BY, RESHARD_SEQ, VOCAB, llama_overrides,
                                    make_corpus, reset_layout, reshard_overrides, run_pretrain)


def _padded(tp):
    # 64 ids padded to a multiple of 15 x TP: 75 rows at TP=1, 90 at TP=2, 120 at TP=4.
    # Every layout pads differently; the model masks the padding logits, so the
    # loss must not change across conversions anyway.
    from megatron.tokenizer import padded_vocab_size
    return padded_vocab_size(VOCAB, RESHARD_DIVISIBLE_BY, tp)


def _fixed_batch():
    g = torch.Generator().manual_seed(99)
    seq = torch.randint(0, 64, (8, RESHARD_SEQ + 1), generator=g)
    return seq[:, :-1], seq[:, 1:]


def _fixed_batch_loss(prefix, root, tp, pp):
    """Mean loss of the fixed batch with the checkpoint under ``root`` at TP x PP (forward only)."""
    import functools

    import pretrain_gpt
    from megatron import mpu
    from megatron.checkpoint import load_checkpoint
    from megatron.config import finalize, load_config
    from megatron.model import GPTModel
    from megatron.schedules import get_forward_backward_func
    from megatron.train_step import StepSchedule
    cfg = load_config(None, reshard_overrides(prefix, tp, pp))
    finalize(cfg, torch.distributed.get_world_size())
    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    mpu.initialize_model_parallel(tp, pp)
    model = GPTModel(cfg, _padded(tp), pre_process=mpu.is_pipeline_first_stage(),
                     post_process=mpu.is_pipeline_last_stage(), vocab_size=VOCAB)
    load_checkpoint(cfg, [model], None, None, root=root, load_optimizer=False, load_rng=False)
    model.eval()
    tokens, labels = _fixed_batch()
    # Every DP rank evaluates the whole batch: no gradient sync is involved.
    micro = [{"tokens": tokens[i:i + 2], "labels": labels[i:i + 2],
              "loss_mask": torch.ones(2, RESHARD_SEQ),
              "position_ids": torch.arange(RESHARD_SEQ).expand(2, RESHARD_SEQ)}
             for i in range(0, 8, 2)]
    step = StepSchedule.from_config(cfg)  # micro batches of 2, as the config says
    dicts = get_forward_backward_func()(
        functools.partial(pretrain_gpt.forward_step, device=torch.device("cpu")), iter(micro),
        [model], len(micro), tensor_shape=step.tensor_shape, dtype=step.dtype, forward_only=True)
    mpu.destroy_model_parallel()
    if not dicts:
        return None
    return sum(float(d["lm loss"]) for d in dicts) / len(dicts)


def _convert_runs(workdir):
    from megatron.checkpoint import convert_checkpoint
    rank = torch.distributed.get_rank()
    prefix = os.path.join(workdir, "corpus")
    d = {k: os.path.join(workdir, k) for k in ("orig", "tp1", "tp4", "tp1_noopt", "vp", "from_vp")}
    if rank == 0:
        make_corpus(prefix)
    torch.distributed.barrier()
    run_pretrain(reshard_overrides(prefix, 2, 2, **{"training.train_iters": 4,
                                                    "checkpoint.save": d["orig"]}))
    reset_layout()
    # The reference continuation: the original checkpoint resumed at its own layout.
    straight = run_pretrain(reshard_overrides(prefix, 2, 2, **{"training.train_iters": 6,
                                                               "checkpoint.load": d["orig"]}))
    reset_layout()
    if rank == 0:
        quiet = dict(log=lambda *_: None)
        convert_checkpoint(d["orig"], d["tp1"], 1, 1, include_optimizer=True, **quiet)
        convert_checkpoint(d["orig"], d["tp4"], 4, 1, include_optimizer=True, **quiet)
        convert_checkpoint(d["orig"], d["tp1_noopt"], 1, 1, **quiet)
        # Into a virtual-pipeline layout (PP=2 x VP=2: one layer per chunk) and out of it.
        convert_checkpoint(d["tp1"], d["vp"], 1, 2, vp=2, include_optimizer=True, **quiet)
        convert_checkpoint(d["vp"], d["from_vp"], 1, 1, **quiet)
    torch.distributed.barrier()
    losses = {"orig": _fixed_batch_loss(prefix, d["orig"], 2, 2),
              "tp1": _fixed_batch_loss(prefix, d["tp1"], 1, 1),
              "tp4": _fixed_batch_loss(prefix, d["tp4"], 4, 1),
              "tp1_noopt": _fixed_batch_loss(prefix, d["tp1_noopt"], 1, 1),
              "from_vp": _fixed_batch_loss(prefix, d["from_vp"], 1, 1)}
    resumed = {}
    for name, tp, pp, extra in (("tp4", 4, 1, {}), ("tp1", 1, 1, {}),
                                ("vp", 1, 2, {"parallel.virtual_pipeline_model_parallel_size": 2})):
        resumed[name] = run_pretrain(reshard_overrides(prefix, tp, pp, **{
            "training.train_iters": 6, "checkpoint.load": d[name], **extra}))["train_losses"]
        reset_layout()
    # Generation from the TP=2 x PP=2 checkpoint at TP=1 and at TP=4 (merged and re-split
    # in memory), with and without the key-value cache.
    from megatron import mpu
    from megatron.inference.loader import load_inference_model
    generations = {"tp1": _generations(load_inference_model(d["orig"], device=torch.device("cpu")))}
    mpu.initialize_model_parallel(4, 1)
    generations["tp4"] = _generations(load_inference_model(d["orig"], device=torch.device("cpu")))
    reset_layout()
    files = None
    if rank == 0:
        files = {k: sorted(os.listdir(os.path.join(d[k], "iter_0000004"))) for k in d}
        files["vp_chunks"] = sorted(k for k in torch.load(
            os.path.join(d["vp"], "iter_0000004", "mp_rank_00_001", "model_optim_rng.pt"),
            weights_only=True) if k.startswith("model"))
        files["rows"] = {k: _embedding_rows(d[k]) for k in ("orig", "tp1", "tp4")}
        f = torch.load(os.path.join(d["tp1_noopt"], "iter_0000004", "mp_rank_00", "model_optim_rng.pt"),
                       weights_only=True)
        files["noopt_has_optimizer"] = "optimizer" in f
        files["noopt_parallel"] = f["parallel"]
    return {"straight": straight["train_losses"], "losses": losses, "resumed": resumed,
            "files": files, "generations": generations}


def _embedding_rows(root):
    """The checkpoint's (merged) word-embedding rows: its padded vocabulary size."""
    from megatron.checkpoint import WORD_EMBEDDINGS_KEY, CheckpointShards, merge_model_state
    return merge_model_state(CheckpointShards(root))[WORD_EMBEDDINGS_KEY].shape[0]


def _generations(im):
    from megatron.inference.generation import generate_tokens
    out = {}
    for name, kw in {"greedy": dict(greedy=True),
                     "sample": dict(temperature=1.2, top_k=20, top_p=0.9, seed=5)}.items():
        out[name] = [generate_tokens(im, [1, 2, 3, 4, 5], 20, use_cache=cache, stop_at_eod=False,
                                     return_logprobs=True, **kw) for cache in (True, False)]
    return out


def test_tp2pp2_to_tp1_and_tp4(tmp_path):
    results = run_distributed(_convert_runs, 4, str(tmp_path), timeout=600)
    files = results[0]["files"]
    # every iteration folder, saved by training or by the converter, carries its manifest
    m = ["manifest.json"]
    assert files["orig"] == m + ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000",
                                 "mp_rank_01_001"]
    assert files["tp1"] == m + ["mp_rank_00"]
    assert files["tp4"] == m + [f"mp_rank_{i:02d}" for i in range(4)]
    assert files["vp"] == m + ["mp_rank_00_000", "mp_rank_00_001"]
    assert files["from_vp"] == m + ["mp_rank_00"]
    assert files["vp_chunks"] == ["model0", "model1"]
    assert files["noopt_has_optimizer"] is False
    assert files["noopt_parallel"]["tensor_model_parallel_size"] == 1
    # the layouts' padded vocabularies differ (the losses below agree all the same)
    assert files["rows"] == {"orig": _padded(2), "tp1": _padded(1), "tp4": _padded(4)} \
        == {"orig": 90, "tp1": 75, "tp4": 120}
    # the original loss comes from the last pipeline stage (ranks 2, 3 at TP=2 x PP=2)
    orig = [r["losses"]["orig"] for r in results if r["losses"]["orig"] is not None]
    assert len(orig) == 2 and orig[0] == orig[1]
    for r in results:
        for name in ("tp1", "tp4", "tp1_noopt", "from_vp"):
            assert r["losses"][name] == pytest.approx(orig[0], rel=1e-5), name
    # training resumes from the converted checkpoints as from the original
    straight = next(r["straight"] for r in results if r["straight"])
    assert sorted(straight) == [5, 6]
    # (at PP=2 only the last stage's two DP ranks report losses)
    assert sum(bool(r["resumed"]["vp"]) for r in results) == 2
    for r in results:
        for name, losses in r["resumed"].items():
            if name == "vp" and not losses:
                continue
            assert sorted(losses) == [5, 6], name
            for it in (5, 6):
                assert losses[it] == pytest.approx(straight[it], rel=1e-5), (name, it)
    # generation at TP=4 equals TP=1, cached equals uncached, token for token
    for r in results:
        for name, ref in r["generations"]["tp1"].items():
            ref_tokens, ref_lp = ref[0]
            assert len(ref_tokens) == 25
            for tokens, lp in ref + r["generations"]["tp4"][name]:
                assert tokens == ref_tokens, name
                assert max(abs(a - b) for a, b in zip(lp, ref_lp)) < 1e-4, name


@pytest.mark.parametrize("llama", [False, True])
def test_partition_rules_match_the_model(llama):
    """The name table of megatron.checkpoint.reshard agrees with the attributes the model's
    layers set (dim and stride), for GPT-2 and for the Llama-style options."""
    from megatron.config import Config
    from megatron.model import GPTModel
    from megatron.checkpoint.reshard import partition_dim, partition_stride
    from tests.helpers.model import LLAMA_OPTIONS
    cfg = Config()
    cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_attention_heads = 2, 16, 4
    cfg.model.seq_length = 8
    if llama:
        for key, value in LLAMA_OPTIONS.items():
            setattr(cfg.model, key, value)
    model = GPTModel(cfg, 128)
    names = set()
    for name, p in model.named_parameters():
        names.add(name)
        expected = p.partition_dim if getattr(p, "tensor_model_parallel", False) else None
        assert partition_dim(name) == expected, name
        assert partition_stride(name, cfg.to_dict()) == partition_stride(name, cfg) == \
            (p.partition_stride if expected is not None else 1), name
    assert ("output_layer.weight" in names) == llama
    assert partition_stride("layers.0.mlp.dense_h_to_4h.weight", cfg) == (2 if llama else 1)


def test_split_merge_round_trip_and_errors(tmp_path):
    """QKV split per head, vocabulary re-padding, and one-line errors for impossible layouts."""
    from megatron.checkpoint import (CheckpointError, CheckpointShards, convert_checkpoint,
                                     merge_model_state, split_tensor)
    from tests.helpers.bpe_checkpoint import make_bpe_checkpoint
    ref = make_bpe_checkpoint(str(tmp_path / "a"), steps=1, tp=2, pp=2)
    full = merge_model_state(CheckpointShards(str(tmp_path / "a")))
    for k, v in ref.state_dict().items():
        assert torch.equal(full[k], v), k
    # a TP shard of the QKV weight holds whole heads: [np/tp, 3, hn] rows of the full one
    qkv = full["layers.0.self_attention.query_key_value.weight"]
    heads, hn = 4, 8
    shard = split_tensor("layers.0.self_attention.query_key_value.weight", qkv, 2, 1)
    assert torch.equal(shard.view(2, 3, hn, -1), qkv.view(heads, 3, hn, -1)[2:])
    with pytest.raises(CheckpointError, match="num_attention_heads=4"):
        convert_checkpoint(str(tmp_path / "a"), str(tmp_path / "b"), 3, 1, log=lambda *_: None)
    with pytest.raises(CheckpointError, match="num_layers=2"):
        convert_checkpoint(str(tmp_path / "a"), str(tmp_path / "b"), 1, 4, log=lambda *_: None)
    import tools.checkpoint_convert as cli
    assert cli.main(["--load-dir", str(tmp_path / "none"), "--save-dir", str(tmp_path / "c"),
                     "--target-tensor-parallel-size", "1", "--target-pipeline-parallel-size", "1"]) == 1


def _llama_runs(workdir):
    from megatron.checkpoint import convert_checkpoint
    rank = torch.distributed.get_rank()
    prefix = os.path.join(workdir, "corpus")
    d = {k: os.path.join(workdir, k) for k in ("orig", "tp1", "vp")}
    if rank == 0:
        make_corpus(prefix)
    torch.distributed.barrier()

    def run(tp, pp, **extra):
        history = run_pretrain(reshard_overrides(prefix, tp, pp, **llama_overrides(), **{
            "training.train_iters": 4, **extra}))
        reset_layout()
        return history["train_losses"]
    straight = run(2, 2, **{"checkpoint.save": d["orig"], "checkpoint.save_interval": 2})
    torch.distributed.barrier()  # every rank is done with the latest file before it changes
    if rank == 0:
        with open(os.path.join(d["orig"], "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("2\n")  # resume (and convert) from iteration 2
        quiet = dict(log=lambda *_: None)
        convert_checkpoint(d["orig"], d["tp1"], 1, 1, include_optimizer=True, **quiet)
        convert_checkpoint(d["orig"], d["vp"], 1, 2, vp=2, include_optimizer=True, **quiet)
    torch.distributed.barrier()
    resumed = {"orig": run(2, 2, **{"checkpoint.load": d["orig"]}),
               "tp1": run(1, 1, **{"checkpoint.load": d["tp1"]}),
               "vp": run(1, 2, **{"checkpoint.load": d["vp"],
                                  "parallel.virtual_pipeline_model_parallel_size": 2})}
    from megatron import mpu
    from megatron.inference.loader import load_inference_model
    generations = {"tp1": _generations(load_inference_model(d["orig"], device=torch.device("cpu")))}
    mpu.initialize_model_parallel(2, 1)
    generations["tp2"] = _generations(load_inference_model(d["orig"], device=torch.device("cpu")))
    reset_layout()
    rows = None
    if rank == 0:
        from megatron.checkpoint import OUTPUT_LAYER_KEY, CheckpointShards, merge_model_state
        rows = {k: merge_model_state(CheckpointShards(d[k]))[OUTPUT_LAYER_KEY].shape[0]
                for k in d}
    return {"straight": straight, "resumed": resumed, "generations": generations, "rows": rows}


def test_llama_checkpoint_resumes_converts_and_generates(tmp_path):
    results = run_distributed(_llama_runs, 4, str(tmp_path), timeout=600)
    # the untied output layer is re-padded like the embedding (90 rows at TP=2, 75 at TP=1)
    assert results[0]["rows"] == {"orig": 90, "tp1": 75, "vp": 75}
    # at TP=2 x PP=2 the last stage's two TP ranks report the losses
    straight = [r["straight"] for r in results if r["straight"]]
    assert len(straight) == 2 and sorted(straight[0]) == list(range(1, 5))
    assert straight[0][4] < straight[0][1] - 0.1  # it did train
    for r in results:
        for name, losses in r["resumed"].items():
            if not losses:  # not a last pipeline stage
                continue
            assert sorted(losses) == [3, 4], name
            for it in (3, 4):
                if name == "orig":  # the same layout resumes bit for bit
                    assert losses[it] == straight[0][it], (it, losses, straight[0])
                else:
                    assert losses[it] == pytest.approx(straight[0][it], rel=1e-5), (name, it)
    assert sum(bool(r["resumed"]["vp"]) for r in results) == 2
    # generation at TP=2 equals TP=1, cached equals uncached, token for token
    for r in results:
        for name, ref in r["generations"]["tp1"].items():
            ref_tokens, ref_lp = ref[0]
            assert len(ref_tokens) == 25
            for tokens, lp in ref + r["generations"]["tp2"][name]:
                assert tokens == ref_tokens, name
                assert max(abs(a - b) for a, b in zip(lp, ref_lp)) < 1e-4, name
