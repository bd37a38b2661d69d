"""The GPT model split over tensor (and pipeline) ranks equals the single-process model.

One launch of 4 gloo ranks runs every layout in turn (TP=2 x DP=2, TP=2 with
sequence parallelism, TP=4, TP=2 x PP=2 with virtual stages), each compared
on every rank with a TP=1 model built in the same process; also a vocabulary
whose padding differs with TP (masked padding logits: the same loss anyway).
The Llama-style model (tests.helpers.model.llama_cfg: RoPE with restarting
positions, RMSNorm, SwiGLU, 2 query groups, no biases, untied output layer)
goes through TP=2, TP=2 with sequence parallelism and the pipeline chunks too.
"""
import torch
import torch.distributed as dist

from megatron import mpu
from megatron.model import GPTModel
from tests.dist_harness import run_distributed
from tests.helpers.model import batch, llama_cfg, reset_positions, tiny_cfg

VOCAB = 1000          # real tokens: ids and labels stay below this
PADDED_VOCAB = 1024   # padded to a multiple of 128 x 4, the same for every TP here
LR = 0.5              # large steps, so that a wrong gradient shows in later losses
STEPS = 3
# A true vocabulary whose padding (multiple of 128 x TP) differs with TP.
ODD_VOCAB = 1030
ODD_PADDED = {1: 1152, 2: 1280, 4: 1536}


def _tp_group():
    return mpu.get_tensor_model_parallel_group()


def _gather_full(param, tensor):
    """The full (TP=1) tensor from this rank's shard of ``param``."""
    if not getattr(param, "tensor_model_parallel", False) or \
            mpu.get_tensor_model_parallel_world_size() == 1:
        return tensor.clone()
    parts = [torch.empty_like(tensor) for _ in range(mpu.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, tensor.contiguous(), group=_tp_group())
    return mpu.stride_merge(parts, param.partition_dim, getattr(param, "partition_stride", 1))


def _sync_sequence_parallel_grads(model):
    # What finalize_model_grads does for these parameters in training.
    for p in model.parameters():
        if getattr(p, "sequence_parallel", False) and mpu.get_tensor_model_parallel_world_size() > 1:
            dist.all_reduce(p.grad, group=_tp_group())


# The two model families: how to build a config, the TP layouts to compare (two query
# groups do not split over four ranks), the position ids (restarting for RoPE) and the
# SGD step size (the bias-free RMSNorm model starts closer to uniform: larger steps).
FAMILIES = {"gpt": (tiny_cfg, ((2, False), (2, True), (4, False)), None, LR),
            "llama": (llama_cfg, ((2, False), (2, True)), [6, 11], 4 * LR)}


def _batch(family, seed=0):
    ids, pos, labels = batch(VOCAB, seed=seed)
    resets = FAMILIES[family][2]
    return ids, (reset_positions(*pos.shape, resets) if resets else pos), labels


def _train(cfg, padded_vocab=PADDED_VOCAB, vocab_size=None, lr=None, family="gpt"):
    """Losses of STEPS plain SGD steps and the full gradients of the first step."""
    lr = FAMILIES[family][3] if lr is None else lr
    model = GPTModel(cfg, padded_vocab, vocab_size=vocab_size)
    losses, first_grads = [], None
    for step in range(STEPS):
        ids, pos, labels = _batch(family, seed=step)
        loss = model(ids, pos, labels=labels)
        loss.mean().backward()
        _sync_sequence_parallel_grads(model)
        if first_grads is None:
            first_grads = {n: _gather_full(p, p.grad) for n, p in model.named_parameters()}
            logits = model(ids, pos)
            assert logits.shape == (2, 16, padded_vocab // mpu.get_tensor_model_parallel_world_size())
        losses.append(loss.detach())
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * p.grad
                p.grad = None
    return losses, first_grads


def _assert_close(got, want, what):
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale,
                               msg=lambda m: f"{what}: {m}")


def _check_equivalence(family="gpt"):
    """TP=2, TP=2 + SP and TP=4 (GPT) against TP=1: loss, every gradient, SGD losses."""
    make_cfg, layouts = FAMILIES[family][:2]
    ref_losses, ref_grads = _train(make_cfg(), family=family)
    report = {}
    for tp, sp in layouts:
        mpu.initialize_model_parallel(tp)
        mpu.model_parallel_seed(1234)
        cfg = make_cfg(parallel__tensor_model_parallel_size=tp, parallel__sequence_parallel=sp)
        losses, grads = _train(cfg, family=family)
        name = f"TP={tp}{' SP' if sp else ''}"
        assert set(grads) == set(ref_grads), name
        for step, (l, r) in enumerate(zip(losses, ref_losses)):
            _assert_close(l, r, f"{name} loss at step {step}")
        for n, g in grads.items():
            _assert_close(g, ref_grads[n], f"{name} grad of {n}")
        report[name] = [l.mean().item() for l in losses]
        mpu.destroy_model_parallel()
    report["TP=1"] = [l.mean().item() for l in ref_losses]
    # The same batches through the untrained model: what the losses would be had no
    # step (or a step of zero gradient) been taken.
    report["TP=1 frozen"] = [l.mean().item() for l in _train(make_cfg(), lr=0.0, family=family)[0]]
    if family == "gpt":
        report["padding"] = _check_padding_independence()
    return report


def _check_padding_independence():
    """Vocabulary 1030 padded to 1152 / 1280 / 1536 at TP=1 / 2 / 4: with the padding
    logits masked, the losses and the real rows' gradients equal TP=1's; padding rows
    get no gradient."""
    w = "embedding.word_embeddings.weight"
    ref_losses, ref_grads = _train(tiny_cfg(), ODD_PADDED[1], ODD_VOCAB)
    checked = []
    for tp in (2, 4):
        mpu.initialize_model_parallel(tp)
        mpu.model_parallel_seed(1234)
        cfg = tiny_cfg(parallel__tensor_model_parallel_size=tp)
        losses, grads = _train(cfg, ODD_PADDED[tp], ODD_VOCAB)
        name = f"TP={tp} padded to {ODD_PADDED[tp]}"
        for step, (l, r) in enumerate(zip(losses, ref_losses)):
            _assert_close(l, r, f"{name} loss at step {step}")
        for n, g in grads.items():
            if n == w:
                assert not g[ODD_VOCAB:].any(), f"{name}: padding rows got a gradient"
                g, want = g[:ODD_VOCAB], ref_grads[n][:ODD_VOCAB]
            else:
                want = ref_grads[n]
            _assert_close(g, want, f"{name} grad of {n}")
        checked.append(tp)
        mpu.destroy_model_parallel()
    return checked


def _hook_outputs(modules):
    seen = {}

    def make(name):
        def hook(_module, _inputs, output):
            seen[name] = output.detach().clone()
        return hook
    for name, module in modules.items():
        module.register_forward_hook(make(name))
    return seen


def _all_equal_over_tp(t):
    parts = [torch.empty_like(t) for _ in range(mpu.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, t.contiguous(), group=_tp_group())
    return all(torch.equal(parts[0], p) for p in parts[1:])


def _check_dropout_regions():
    """Replicated-region masks agree across TP ranks; split-region masks differ."""
    mpu.initialize_model_parallel(2)
    out = {}
    ids, pos, labels = batch(VOCAB)

    # Replicated regions (embedding and residual dropout, no SP): outputs identical.
    cfg = tiny_cfg(parallel__tensor_model_parallel_size=2, model__hidden_dropout=0.5)
    mpu.model_parallel_seed(1234)
    model = GPTModel(cfg, PADDED_VOCAB)
    seen = _hook_outputs({"embedding": model.embedding, **{f"layer{i}": l for i, l in model.layers.items()}})
    model(ids, pos, labels)
    zero_fraction = (seen["embedding"] == 0).float().mean().item()
    assert 0.4 < zero_fraction < 0.6, zero_fraction  # dropout did act
    out["replicated_equal"] = {k: _all_equal_over_tp(v) for k, v in seen.items()}

    # Split region (attention probabilities): make every head identical, so the
    # heads of both ranks compute the same context unless their masks differ.
    cfg = tiny_cfg(parallel__tensor_model_parallel_size=2, model__attention_dropout=0.5)
    mpu.model_parallel_seed(1234)
    model = GPTModel(cfg, PADDED_VOCAB)
    contexts = {}
    for i, layer in model.layers.items():
        qkv = layer.self_attention.query_key_value
        g = torch.Generator().manual_seed(int(i))
        head_w = torch.randn(qkv.weight.shape[0] // layer.self_attention.local_heads,
                             qkv.weight.shape[1], generator=g) * 0.3
        with torch.no_grad():
            qkv.weight.copy_(head_w.repeat(layer.self_attention.local_heads, 1))
        layer.self_attention.dense.register_forward_pre_hook(
            lambda _m, args, i=i: contexts.__setitem__(i, args[0].detach().clone()))
    model.eval()
    model(ids, pos, labels)
    out["split_equal_eval"] = _all_equal_over_tp(contexts["0"])
    model.train()
    model(ids, pos, labels)
    out["split_equal_train"] = _all_equal_over_tp(contexts["0"])

    # Sequence parallelism splits the embedding dropout region too: with the two
    # halves of the sequence identical (zero position embeddings), the shards of
    # both ranks match before dropout and must not after it.
    cfg = tiny_cfg(parallel__tensor_model_parallel_size=2, parallel__sequence_parallel=True,
                   model__hidden_dropout=0.5)
    mpu.model_parallel_seed(1234)
    model = GPTModel(cfg, PADDED_VOCAB)
    with torch.no_grad():
        model.embedding.position_embeddings.weight.zero_()
    half = ids[:, :8]
    twin = torch.cat([half, half], dim=1)
    seen = _hook_outputs({"embedding": model.embedding})
    model.eval()
    model(twin, pos, labels)
    out["sp_embedding_equal_eval"] = _all_equal_over_tp(seen["embedding"])
    model.train()
    model(twin, pos, labels)
    out["sp_embedding_equal_train"] = _all_equal_over_tp(seen["embedding"])
    mpu.destroy_model_parallel()
    return out


def _check_recompute_bits():
    """Recompute full / selective at TP=2 with SP and dropout: bit-identical to none."""
    mpu.initialize_model_parallel(2)
    results = {}
    for mode in ("none", "full", "selective"):
        cfg = tiny_cfg(parallel__tensor_model_parallel_size=2, parallel__sequence_parallel=True,
                       model__hidden_dropout=0.3, model__attention_dropout=0.3,
                       training__recompute=mode)
        mpu.model_parallel_seed(77)
        model = GPTModel(cfg, PADDED_VOCAB)
        ids, pos, labels = batch(VOCAB)
        loss = model(ids, pos, labels)
        loss.mean().backward()
        results[mode] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    loss, grads = results["none"]
    identical = {}
    for mode in ("full", "selective"):
        l2, g2 = results[mode]
        identical[mode] = torch.equal(loss, l2) and all(torch.equal(g, g2[n]) for n, g in grads.items())
    mpu.destroy_model_parallel()
    return identical


def _check_pipeline_stages(family="gpt"):
    """TP=2 x PP=2 with 2 virtual stages: each chunk's layers, weights and outputs
    match the TP=1 model's, names use global layer indices, the tied embeddings agree
    (the untied output layer lives on the last stage only, with no tied copy)."""
    make_cfg = FAMILIES[family][0]
    cfg1 = make_cfg(model__num_layers=4)
    full = GPTModel(cfg1, PADDED_VOCAB)
    ids, pos, labels = _batch(family)
    hidden = _hook_outputs({"embedding": full.embedding, **{f"layer{i}": l for i, l in full.layers.items()}})
    with torch.no_grad():
        ref_loss = full(ids, pos, labels)
    # ref_in[i]: the input of layer i (the output of layer i-1, or the embedding).
    ref_in = [hidden["embedding"]] + [hidden[f"layer{i}"] for i in range(4)]
    full_params = dict(full.named_parameters())

    mpu.initialize_model_parallel(2, 2, virtual_pipeline_model_parallel_size=2)
    cfg = make_cfg(model__num_layers=4, parallel__tensor_model_parallel_size=2,
                   parallel__pipeline_model_parallel_size=2,
                   parallel__virtual_pipeline_model_parallel_size=2)
    chunks = []
    for v in range(2):
        mpu.set_virtual_pipeline_model_parallel_rank(v)
        pre, post = mpu.is_pipeline_first_stage(), mpu.is_pipeline_last_stage()
        chunk = GPTModel(cfg, PADDED_VOCAB, pre_process=pre, post_process=post)
        start, end = chunk.layer_range
        assert [int(i) for i in chunk.layers] == list(range(start, end))
        for n, p in chunk.named_parameters():
            assert torch.equal(_gather_full(p, p.detach()), full_params[n]), n
        if family == "llama":
            assert hasattr(chunk, "embedding") == pre and hasattr(chunk, "output_layer") == post
            assert not any(getattr(p, "tied_embedding", False) for p in chunk.parameters())
        elif pre or post:
            w = chunk.word_embeddings_weight()
            assert w.tied_embedding
            assert getattr(w, "shared_embedding", False) == (post and not pre)
        with torch.no_grad():
            if not pre:
                chunk.set_input_tensor(ref_in[start])
            got = chunk(ids, pos, labels)
        want = ref_loss if post else ref_in[end]
        _assert_close(got, want, f"chunk pp={mpu.get_pipeline_model_parallel_rank()} vp={v}")
        chunks.append((start, end, pre, post))
    mpu.destroy_model_parallel()
    return chunks


def _all_checks():
    torch.manual_seed(0)
    return {"equivalence": _check_equivalence(), "dropout": _check_dropout_regions(),
            "recompute": _check_recompute_bits(), "pipeline": _check_pipeline_stages(),
            "llama": _check_equivalence("llama"), "llama pipeline": _check_pipeline_stages("llama")}


def test_model_tensor_and_pipeline_parallel_equivalence():
    results = run_distributed(_all_checks, 4)
    for rank, r in enumerate(results):
        eq = r["equivalence"]
        assert set(eq) == {"TP=1", "TP=1 frozen", "TP=2", "TP=2 SP", "TP=4", "padding"}
        assert eq["padding"] == [2, 4]
        assert set(r["llama"]) == {"TP=1", "TP=1 frozen", "TP=2", "TP=2 SP"}
        for family, eq in (("gpt", eq), ("llama", r["llama"])):
            ref, frozen = eq["TP=1"], eq["TP=1 frozen"]
            for name in set(eq) - {"TP=1", "TP=1 frozen", "padding"}:
                assert len(eq[name]) == STEPS
                for step, (got, want) in enumerate(zip(eq[name], ref)):
                    assert abs(got - want) <= 1e-5 * abs(want), (rank, family, name, step, eq[name], ref)
            # The SGD steps moved the later losses by over 100 times that tolerance, so a
            # wrong gradient at any TP size would have shown in them.
            assert frozen[0] == ref[0], (family, frozen, ref)
            for step in range(1, STEPS):
                assert abs(ref[step] - frozen[step]) > 1e-3 * abs(frozen[step]), \
                    (family, step, ref, frozen)
        d = r["dropout"]
        assert all(d["replicated_equal"].values()), (rank, d)
        assert d["split_equal_eval"] and not d["split_equal_train"], (rank, d)
        assert d["sp_embedding_equal_eval"] and not d["sp_embedding_equal_train"], (rank, d)
        assert r["recompute"] == {"full": True, "selective": True}, (rank, r["recompute"])
    # Rank r holds pipeline rank (r // 2); chunk v of pipeline rank p holds layer 2v + p.
    assert [r["pipeline"] for r in results] == [r["llama pipeline"] for r in results] == [
        [(0, 1, True, False), (2, 3, False, False)], [(0, 1, True, False), (2, 3, False, False)],
        [(1, 2, False, False), (3, 4, False, True)], [(1, 2, False, False), (3, 4, False, True)]]
