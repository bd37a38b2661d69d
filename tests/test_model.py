"""GPT model on one process: shapes, names, init statistics, parity with Hugging Face
GPT-2, recompute bit-identity, torch.compile, stage layer ranges, layout errors."""
import math

import pytest
import torch
import torch.nn.functional as F

from megatron import mpu
from megatron.model import GPTModel
from megatron.model.gpt_model import check_model_layout
from megatron.model.utils import stage_layer_range
from tests.helpers.model import batch, tiny_cfg


def expected_names(num_layers):
    names = {"embedding.word_embeddings.weight", "embedding.position_embeddings.weight",
             "final_layernorm.weight", "final_layernorm.bias"}
    for i in range(num_layers):
        for sub in ("input_layernorm", "self_attention.query_key_value", "self_attention.dense",
                    "post_attention_layernorm", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"):
            names |= {f"layers.{i}.{sub}.weight", f"layers.{i}.{sub}.bias"}
    return names


def test_shapes_names_and_marks():
    cfg = tiny_cfg(model__num_layers=3)
    model = GPTModel(cfg, 256)
    assert set(model.state_dict()) == expected_names(3)
    ids, pos, labels = batch(256)
    loss = model(ids, pos, labels=labels)
    assert loss.shape == (2, 16) and loss.dtype == torch.float32
    logits = model(ids, pos)
    assert logits.shape == (2, 16, 256)
    # The loss is the cross entropy of the returned logits.
    ref = F.cross_entropy(logits.reshape(-1, 256), labels.reshape(-1), reduction="none")
    torch.testing.assert_close(loss.reshape(-1), ref, rtol=1e-6, atol=1e-6)
    # Default position ids are 0..s-1.
    torch.testing.assert_close(model(ids, None, labels=labels), loss, rtol=0, atol=0)
    w = model.word_embeddings_weight()
    assert w is model.embedding.word_embeddings.weight and w.tied_embedding
    assert not getattr(w, "shared_embedding", False)
    assert all(hasattr(p, "tensor_model_parallel") for p in model.parameters())
    # No sequence parallelism at TP=1: nothing needs a TP grad all-reduce.
    assert not any(getattr(p, "sequence_parallel", False) for p in model.parameters())


def test_init_statistics_and_layout_independent_seeding():
    layers, std = 4, 0.02
    cfg = tiny_cfg(model__num_layers=layers, model__hidden_size=256, model__num_attention_heads=8)
    torch.manual_seed(123)
    before = torch.rand(3)
    model = GPTModel(cfg, 1024)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), before), "building the model must not move the caller's RNG"
    scaled = std / math.sqrt(2 * layers)
    for name, p in model.named_parameters():
        p = p.detach()
        if name.endswith("layernorm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        else:
            want = scaled if name.endswith(("self_attention.dense.weight",
                                            "dense_4h_to_h.weight")) else std
            assert abs(p.mean().item()) < 4 * want / math.sqrt(p.numel()), name
            assert abs(p.std().item() / want - 1) < 0.05, (name, p.std().item(), want)
    # Layers are seeded by their global index: different from each other,
    # identical across builds, and independent of the other modules present.
    sd = model.state_dict()
    assert not torch.equal(sd["layers.0.mlp.dense_h_to_4h.weight"], sd["layers.1.mlp.dense_h_to_4h.weight"])
    other = GPTModel(tiny_cfg(model__num_layers=layers, model__hidden_size=256,
                              model__num_attention_heads=8), 1024)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in sd.items())
    reseeded = GPTModel(tiny_cfg(model__num_layers=layers, model__hidden_size=256,
                                 model__num_attention_heads=8, training__seed=7), 1024)
    assert not torch.equal(reseeded.state_dict()["layers.0.mlp.dense_h_to_4h.weight"],
                           sd["layers.0.mlp.dense_h_to_4h.weight"])


def _to_hf(model, cfg, vocab):
    """A transformers GPT2LMHeadModel holding our weights (QKV layout converted)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    m = cfg.model
    h, heads = m.hidden_size, m.num_attention_heads
    hf = GPT2LMHeadModel(GPT2Config(
        vocab_size=vocab, n_positions=m.seq_length, n_embd=h, n_layer=m.num_layers,
        n_head=heads, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, layer_norm_epsilon=m.layernorm_epsilon, bos_token_id=0, eos_token_id=0,
        attn_implementation="eager")).eval()
    ours = dict(model.named_parameters())

    def qkv_to_hf(t):  # ours: rows [np, 3, hn]; HF Conv1D: columns [3, np, hn]
        t = t.reshape(heads, 3, h // heads, *t.shape[1:]).transpose(0, 1).reshape(3 * h, *t.shape[1:])
        return t.t() if t.dim() == 2 else t

    mapping = {"transformer.wte.weight": ("embedding.word_embeddings.weight", lambda t: t),
               "transformer.wpe.weight": ("embedding.position_embeddings.weight", lambda t: t),
               "transformer.ln_f.weight": ("final_layernorm.weight", lambda t: t),
               "transformer.ln_f.bias": ("final_layernorm.bias", lambda t: t)}
    for i in range(m.num_layers):
        for hf_name, our_name, fn in (
                ("ln_1", "input_layernorm", lambda t: t),
                ("attn.c_attn", "self_attention.query_key_value", qkv_to_hf),
                ("attn.c_proj", "self_attention.dense", lambda t: t.t() if t.dim() == 2 else t),
                ("ln_2", "post_attention_layernorm", lambda t: t),
                ("mlp.c_fc", "mlp.dense_h_to_4h", lambda t: t.t() if t.dim() == 2 else t),
                ("mlp.c_proj", "mlp.dense_4h_to_h", lambda t: t.t() if t.dim() == 2 else t)):
            for kind in ("weight", "bias"):
                mapping[f"transformer.h.{i}.{hf_name}.{kind}"] = (f"layers.{i}.{our_name}.{kind}", fn)
    with torch.no_grad():
        for hf_name, p in hf.named_parameters():
            our_name, fn = mapping[hf_name]
            p.copy_(fn(ours[our_name].detach()))
    return hf, mapping


def test_matches_huggingface_gpt2_forward_and_grads():
    cfg = tiny_cfg(model__num_layers=2)
    vocab = 256
    model = GPTModel(cfg, vocab)
    hf, mapping = _to_hf(model, cfg, vocab)
    ids, pos, labels = batch(vocab)
    loss = model(ids, pos, labels=labels)
    logits_hf = hf(input_ids=ids).logits
    loss_hf = F.cross_entropy(logits_hf.reshape(-1, vocab), labels.reshape(-1),
                              reduction="none").reshape(2, 16)
    torch.testing.assert_close(model(ids, pos), logits_hf, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, loss_hf, rtol=1e-5, atol=1e-6)
    loss.mean().backward()
    loss_hf.mean().backward()
    ours = dict(model.named_parameters())
    for hf_name, p in hf.named_parameters():
        our_name, fn = mapping[hf_name]
        # HF ties lm_head to wte, so both sides sum the input and output grads.
        torch.testing.assert_close(fn(ours[our_name].grad), p.grad, rtol=1e-4, atol=1e-6,
                                   msg=lambda msg: f"{our_name}: {msg}")


def _loss_and_grads(cfg, vocab, seed=5):
    model = GPTModel(cfg, vocab)
    model.train()
    mpu.model_parallel_seed(seed)
    ids, pos, labels = batch(vocab)
    loss = model(ids, pos, labels=labels)
    loss.mean().backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_recompute_full_and_selective_are_bit_identical_with_dropout():
    drop = dict(model__hidden_dropout=0.2, model__attention_dropout=0.3)
    loss, grads = _loss_and_grads(tiny_cfg(**drop), 256)
    loss_again, _ = _loss_and_grads(tiny_cfg(**drop, training__seed=99), 256)
    assert not torch.equal(loss, loss_again)  # dropout and init do change with the seed
    nodrop, _ = _loss_and_grads(tiny_cfg(), 256)
    assert not torch.equal(loss, nodrop)  # dropout is active
    for mode in ("full", "selective"):
        l2, g2 = _loss_and_grads(tiny_cfg(**drop, training__recompute=mode), 256)
        assert torch.equal(loss, l2), mode
        for name, g in grads.items():
            assert torch.equal(g, g2[name]), (mode, name)


def test_eval_is_deterministic_and_train_is_not():
    cfg = tiny_cfg(model__hidden_dropout=0.2, model__attention_dropout=0.2)
    model = GPTModel(cfg, 256)
    mpu.model_parallel_seed(1)
    ids, pos, labels = batch(256)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids, pos, labels), model(ids, pos, labels))
        model.train()
        assert not torch.equal(model(ids, pos, labels), model(ids, pos, labels))


def test_pipeline_layer_ranges_and_layout_errors():
    assert stage_layer_range(8, 1, 0) == (0, 8)
    assert [stage_layer_range(8, 2, r) for r in (0, 1)] == [(0, 4), (4, 8)]
    # Interleaved: chunk c = vp_rank * PP + pp_rank holds layers [2c, 2c + 2).
    got = {(r, v): stage_layer_range(8, 2, r, 2, v) for r in (0, 1) for v in (0, 1)}
    assert got == {(0, 0): (0, 2), (1, 0): (2, 4), (0, 1): (4, 6), (1, 1): (6, 8)}
    with pytest.raises(ValueError, match=r"num_layers=6 .* pipeline_model_parallel_size=2 .*"
                                         r"virtual_pipeline_model_parallel_size=2"):
        stage_layer_range(6, 2, 0, 2, 0)
    with pytest.raises(ValueError, match=r"seq_length=15 .* tensor_model_parallel_size=2"):
        check_model_layout(tiny_cfg(model__seq_length=15, parallel__sequence_parallel=True), 256, 2)
    check_model_layout(tiny_cfg(model__seq_length=15), 256, 2)  # fine without SP
    with pytest.raises(ValueError, match=r"num_attention_heads=4 .* tensor_model_parallel_size=8"):
        check_model_layout(tiny_cfg(), 256, 8)
    with pytest.raises(ValueError, match=r"padded_vocab_size=100 .* tensor_model_parallel_size=8"):
        check_model_layout(tiny_cfg(model__num_attention_heads=8), 100, 8)
    with pytest.raises(ValueError, match=r"seq_length=32 exceeds max_position_embeddings=16"):
        GPTModel(tiny_cfg(model__seq_length=32, model__max_position_embeddings=16), 256)


def test_compile_keeps_names_and_loss():
    cfg = tiny_cfg(model__num_layers=1, model__hidden_size=32, model__num_attention_heads=2,
                   model__seq_length=8)
    eager = GPTModel(cfg, 128)
    cfg_c = tiny_cfg(model__num_layers=1, model__hidden_size=32, model__num_attention_heads=2,
                     model__seq_length=8, training__compile=True)
    compiled = GPTModel(cfg_c, 128)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    ids, pos, labels = batch(128, s=8)
    loss = eager(ids, pos, labels)
    loss_c = compiled(ids, pos, labels)
    torch.testing.assert_close(loss_c, loss, rtol=1e-6, atol=1e-6)
    loss.mean().backward()
    loss_c.mean().backward()
    for (name, p), pc in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(pc.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


def _padded_loss_and_grads(padded, vocab_size, true_vocab=1030):
    model = GPTModel(tiny_cfg(), padded, vocab_size=vocab_size)
    ids, pos, labels = batch(true_vocab)
    labels[0, :4] = true_vocab - 1  # the last real id is a target too
    loss = model(ids, pos, labels=labels)
    loss.mean().backward()
    return model, loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_padded_vocabulary_is_masked_so_padding_changes_nothing():
    """Vocabulary 1030 padded to 1152 (TP=1) or 1536 (TP=4 with divisible_by 128): the real
    rows start equal, and with the mask the loss and every real gradient are identical."""
    true_vocab = 1030
    small, loss_small, g_small = _padded_loss_and_grads(1152, true_vocab)
    large, loss_large, g_large = _padded_loss_and_grads(1536, true_vocab)
    w = "embedding.word_embeddings.weight"
    # normal_ of the larger master weight draws the same prefix: real rows start equal.
    assert torch.equal(small.state_dict()[w][:true_vocab], large.state_dict()[w][:true_vocab])
    torch.testing.assert_close(loss_large, loss_small, rtol=1e-6, atol=0)
    for name, g in g_small.items():
        # atol relative to each gradient's scale: the two vocabularies reduce in a different
        # order (and with another thread count, differently again), which rounds near zero.
        atol = 1e-5 * float(g.abs().max())
        if name == w:
            torch.testing.assert_close(g_large[w][:true_vocab], g[:true_vocab], rtol=1e-5, atol=atol)
            # padding rows take no part in the softmax, so they get no gradient
            assert not g[true_vocab:].any() and not g_large[w][true_vocab:].any()
        else:
            torch.testing.assert_close(g_large[name], g, rtol=1e-5, atol=atol, msg=name)
    # The returned logits: -inf exactly on the padding ids, and the loss is their cross entropy.
    ids, pos, labels = batch(true_vocab)
    with torch.no_grad():
        logits = large(ids, pos)
    assert torch.isneginf(logits[..., true_vocab:]).all() and torch.isfinite(logits[..., :true_vocab]).all()
    # Without the mask the padded size leaks into the loss (what the mask fixes).
    _, unmasked_small, _ = _padded_loss_and_grads(1152, None)
    _, unmasked_large, _ = _padded_loss_and_grads(1536, None)
    assert not torch.allclose(unmasked_small, unmasked_large, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="vocab_size=1200 must be in"):
        GPTModel(tiny_cfg(), 1152, vocab_size=1200)


def test_real_embedding_rows_do_not_depend_on_the_padding_for_any_size():
    """CPU normal_ redraws the last 16 values when the count is not a multiple of 16;
    the embedding init must keep the real rows equal anyway (75 x 36 = 2700 values)."""
    cfg = tiny_cfg(model__hidden_size=36)
    rows = {p: GPTModel(cfg, p, vocab_size=75).word_embeddings_weight().detach() for p in (75, 90)}
    assert torch.equal(rows[75], rows[90][:75])
    assert abs(rows[90].std().item() / cfg.model.init_method_std - 1) < 0.05


def test_sampling_never_returns_a_padded_id():
    """Padding rows made to dominate the logits are still never sampled or picked greedily."""
    from megatron.inference.sampling import sample_next
    true_vocab, padded = 200, 256
    model = GPTModel(tiny_cfg(), padded, vocab_size=true_vocab).eval()
    unmasked = GPTModel(tiny_cfg(), padded).eval()
    with torch.no_grad():
        w = model.word_embeddings_weight()
        # Padding rows = 1000 x real rows: huge logits of both signs if they were not masked.
        w[true_vocab:] = 1000.0 * w[:padded - true_vocab]
        unmasked.word_embeddings_weight().copy_(w)
        ids, pos, _ = batch(true_vocab)
        logits, raw = model(ids, pos)[0], unmasked(ids, pos)[0]
    assert (raw.argmax(-1) >= true_vocab).all()  # without the mask padding would win
    torch.testing.assert_close(logits[:, :true_vocab], raw[:, :true_vocab], rtol=0, atol=0)
    gen = torch.Generator().manual_seed(0)
    picked = set()
    for last in logits:
        picked.add(sample_next(last, greedy=True))
        for temperature, top_k, top_p in ((1.0, 0, 0.0), (50.0, 0, 0.0), (5.0, 100, 0.99)):
            picked |= {sample_next(last, False, temperature, top_k, top_p, gen) for _ in range(20)}
    assert max(picked) < true_vocab and len(picked) > 20
