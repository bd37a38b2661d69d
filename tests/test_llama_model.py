"""The Llama-style decoder options on one process: names and shapes, parity with Hugging Face's
LlamaForCausalLM (logits and every gradient, restarting positions, GQA and multi-query),
RoPE's relative-position property and partial rotation, the exact erf GeLU, recompute
bit-identity, and key-value cached generation equal to the full forward."""
import pytest
import torch
import torch.nn.functional as F

from megatron import mpu
from megatron.model import GPTModel
from megatron.model.rotary import RotaryEmbedding
from tests.helpers.model import LLAMA_OPTIONS, batch, llama_cfg, reset_positions, tiny_cfg

VOCAB = 256
FFN = 96  # SwiGLU width of each of gate and up (Llama sizes it about 8h/3)


def test_names_shapes_and_marks():
    cfg = llama_cfg(model__ffn_hidden_size=FFN)
    model = GPTModel(cfg, VOCAB)
    h, heads, groups, hn = 64, 4, 2, 16
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    expected = {"embedding.word_embeddings.weight": (VOCAB, h), "final_layernorm.weight": (h,),
                "output_layer.weight": (VOCAB, h)}
    for i in range(2):
        expected.update({
            f"layers.{i}.input_layernorm.weight": (h,),
            f"layers.{i}.self_attention.query_key_value.weight": ((heads + 2 * groups) * hn, h),
            f"layers.{i}.self_attention.dense.weight": (h, h),
            f"layers.{i}.post_attention_layernorm.weight": (h,),
            f"layers.{i}.mlp.dense_h_to_4h.weight": (2 * FFN, h),
            f"layers.{i}.mlp.dense_4h_to_h.weight": (h, FFN)})
    assert shapes == expected  # no position table, no biases, RMSNorm without bias
    out = model.output_layer.weight
    assert out.tensor_model_parallel and out.partition_dim == 0
    assert model.output_weight() is out and out is not model.word_embeddings_weight()
    assert not any(getattr(p, "tied_embedding", False) for p in model.parameters())
    assert model.layers["0"].mlp.dense_h_to_4h.weight.partition_stride == 2
    # the untied output layer starts from its own seed, not from the word embedding
    assert not torch.equal(out, model.word_embeddings_weight())
    assert abs(out.std().item() / cfg.model.init_method_std - 1) < 0.05


def _to_hf_llama(model, cfg, vocab):
    """A transformers LlamaForCausalLM holding our weights: our per-group QKV rows and
    [gate; up] split into q/k/v_proj and gate/up_proj (the layouts docs/models.md gives)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    m = cfg.model
    h, heads, groups = m.hidden_size, m.num_attention_heads, m.query_groups()
    hn, per_group = h // heads, heads // groups
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=h, intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=heads, num_key_value_heads=groups,
        rms_norm_eps=m.layernorm_epsilon, rope_theta=float(m.rotary_base),
        max_position_embeddings=m.seq_length, tie_word_embeddings=False, attention_bias=False,
        mlp_bias=False, hidden_act="silu", attn_implementation="eager")).eval()
    mapping = {"model.embed_tokens.weight": ("embedding.word_embeddings.weight", None),
               "model.norm.weight": ("final_layernorm.weight", None),
               "lm_head.weight": ("output_layer.weight", None)}

    def qkv_part(index, width):  # rows [ng, per_group + 2, hn] -> one of q, k, v
        def get(t):
            t = t.view(groups, per_group + 2, hn, -1)[:, index:index + width]
            return t.reshape(-1, t.shape[-1])
        return get
    for i in range(m.num_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        mapping.update({
            q + "input_layernorm.weight": (p + "input_layernorm.weight", None),
            q + "self_attn.q_proj.weight": (p + "self_attention.query_key_value.weight",
                                            qkv_part(0, per_group)),
            q + "self_attn.k_proj.weight": (p + "self_attention.query_key_value.weight",
                                            qkv_part(per_group, 1)),
            q + "self_attn.v_proj.weight": (p + "self_attention.query_key_value.weight",
                                            qkv_part(per_group + 1, 1)),
            q + "self_attn.o_proj.weight": (p + "self_attention.dense.weight", None),
            q + "post_attention_layernorm.weight": (p + "post_attention_layernorm.weight", None),
            q + "mlp.gate_proj.weight": (p + "mlp.dense_h_to_4h.weight", lambda t: t.chunk(2)[0]),
            q + "mlp.up_proj.weight": (p + "mlp.dense_h_to_4h.weight", lambda t: t.chunk(2)[1]),
            q + "mlp.down_proj.weight": (p + "mlp.dense_4h_to_h.weight", None)})
    ours = dict(model.named_parameters())
    with torch.no_grad():
        for hf_name, p in hf.named_parameters():
            our_name, fn = mapping[hf_name]
            p.copy_((fn or (lambda t: t))(ours[our_name].detach()))
    return hf, mapping


@pytest.mark.parametrize("groups", [2, 1])
def test_matches_huggingface_llama_forward_and_grads(groups):
    """GQA (2 groups of 2 heads) and multi-query (1 group): our logits, loss and every
    gradient equal transformers' Llama on the same weights, with positions that restart
    mid-sequence (RoPE follows the given position ids)."""
    cfg = llama_cfg(model__ffn_hidden_size=FFN, model__num_query_groups=groups)
    model = GPTModel(cfg, VOCAB)
    hf, mapping = _to_hf_llama(model, cfg, VOCAB)
    ids, _, labels = batch(VOCAB)
    pos = reset_positions(2, 16, [5, 11])
    logits_hf = hf(input_ids=ids, position_ids=pos).logits
    torch.testing.assert_close(model(ids, pos), logits_hf, rtol=1e-5, atol=1e-5)
    loss = model(ids, pos, labels=labels)
    loss_hf = F.cross_entropy(logits_hf.reshape(-1, VOCAB), labels.reshape(-1),
                              reduction="none").reshape(2, 16)
    torch.testing.assert_close(loss, loss_hf, rtol=1e-5, atol=1e-6)
    # the restarting positions matter (RoPE does not ignore them): far beyond the tolerance
    assert (model(ids, None, labels=labels) - loss).abs().max() > 1e-4
    loss.mean().backward()
    loss_hf.mean().backward()
    grads = {}
    for hf_name, p in hf.named_parameters():
        our_name, _ = mapping[hf_name]
        grads.setdefault(our_name, []).append(p.grad)
    ours = dict(model.named_parameters())
    for name, parts in grads.items():
        if name.endswith("query_key_value.weight"):
            q, k, v = parts  # back into our per-group rows
            hn, h = 16, 64
            want = torch.cat([q.view(groups, -1, hn, h), k.view(groups, 1, hn, h),
                              v.view(groups, 1, hn, h)], dim=1).reshape(-1, h)
        else:
            want = torch.cat(parts)
        torch.testing.assert_close(ours[name].grad, want, rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")


def test_rope_depends_on_relative_positions_and_rotates_only_its_dims():
    from megatron.fused_kernels import rotary_embedding
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 9, 1, 3, 16, generator=g).unbind(0)  # [s, b, heads, hn]
    pos = torch.arange(9).unsqueeze(0)

    def scores(shift, rotary):
        cos, sin = rotary(pos + shift)
        return torch.einsum("sbhd,tbhd->bhst", rotary_embedding(q, cos, sin),
                            rotary_embedding(k, cos, sin))
    full = RotaryEmbedding(16, 10000)
    torch.testing.assert_close(scores(0, full), scores(37, full), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(scores(0, full), torch.einsum("sbhd,tbhd->bhst", q, k), atol=1e-2)
    # rotary_percent 0.5: the first 8 dims rotate, the last 8 pass through unchanged
    cos, sin = RotaryEmbedding(8, 500000)(pos + 3)
    out = rotary_embedding(q, cos, sin)
    assert torch.equal(out[..., 8:], q[..., 8:]) and not torch.allclose(out[..., :8], q[..., :8])
    # an orthogonal rotation: norms of the rotated pairs are kept
    torch.testing.assert_close(out.norm(dim=-1), q.norm(dim=-1))
    model = GPTModel(llama_cfg(model__rotary_percent=0.5, model__rotary_base=500000), VOCAB)
    assert model.rotary.rotary_dim == 8 and model.rotary.base == 500000


def test_exact_erf_gelu_and_bias_free_linears():
    """activation: gelu is x * Phi(x) (not the tanh approximation); add_bias_linear: false
    leaves every linear without a bias, the GPT-2 block otherwise unchanged."""
    cfg = tiny_cfg(model__activation="gelu", model__add_bias_linear=False)
    model = GPTModel(cfg, VOCAB)
    assert not any(n.endswith("dense.bias") or "dense_h_to_4h.bias" in n or "4h_to_h.bias" in n
                   or "query_key_value.bias" in n for n, _ in model.named_parameters())
    assert "embedding.position_embeddings.weight" in model.state_dict()
    assert "final_layernorm.bias" in model.state_dict()
    mlp = model.layers["0"].mlp
    x = torch.randn(5, 2, 64) * 3
    with torch.no_grad():
        out, bias = mlp(x)
        first = x @ mlp.dense_h_to_4h.weight.t()
        want = F.gelu(first) @ mlp.dense_4h_to_h.weight.t()
        tanh = F.gelu(first, approximate="tanh") @ mlp.dense_4h_to_h.weight.t()
    assert bias is None
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(out, tanh, rtol=1e-6, atol=1e-6)


def test_recompute_full_and_selective_are_bit_identical_with_dropout():
    drop = dict(model__hidden_dropout=0.2, model__attention_dropout=0.3)
    ids, _, labels = batch(VOCAB)
    pos = reset_positions(2, 16, [7])
    results = {}
    for mode in ("none", "full", "selective"):
        model = GPTModel(llama_cfg(**drop, training__recompute=mode), VOCAB)
        mpu.model_parallel_seed(5)
        loss = model(ids, pos, labels=labels)
        loss.mean().backward()
        results[mode] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    loss, grads = results["none"]
    for mode in ("full", "selective"):
        l2, g2 = results[mode]
        assert torch.equal(loss, l2), mode
        for name, g in grads.items():
            assert torch.equal(g, g2[name]), (mode, name)


def test_kv_cache_follows_positions_and_is_sized_by_groups():
    """Incremental decoding with the key-value cache (prompt, then one token at a time) gives
    the full forward's logits: RoPE positions continue after the cached ones, and the cache
    holds num_query_groups K/V heads."""
    from megatron.model.inference_params import InferenceParams
    model = GPTModel(llama_cfg(), VOCAB).eval()
    ids, _, _ = batch(VOCAB, b=1)
    with torch.no_grad():
        full = model(ids)
        cache = InferenceParams(1, 16)
        steps = [model(ids[:, :9], inference_params=cache)]
        cache.advance(9)
        for t in range(9, 16):
            steps.append(model(ids[:, t:t + 1], inference_params=cache))
            cache.advance(1)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    k_cache, _ = cache.key_value_memory[model.layers["0"].self_attention]
    assert k_cache.shape == (1, LLAMA_OPTIONS["num_query_groups"], 16, 16)


def test_config_checks_name_the_values():
    from megatron.config import ConfigError, load_config

    def check(*overrides, world_size=1):
        return load_config(None, ["training.train_iters=1", "model.hidden_size=64",
                                  "model.num_attention_heads=8", *overrides], world_size=world_size)
    cfg = check()
    m = cfg.model  # the defaults are GPT-2's block
    assert (m.position_embedding_type, m.normalization, m.activation, m.num_query_groups,
            m.add_bias_linear, m.untie_embeddings_and_output_weights, m.rotary_base,
            m.rotary_percent) == ("learned", "LayerNorm", "gelu_tanh", None, True, False, 10000, 1.0)
    assert m.query_groups() == 8
    for overrides, world, words in [
            (["model.num_query_groups=3"], 1, ["num_attention_heads=8", "num_query_groups=3"]),
            (["model.num_query_groups=2", "parallel.tensor_model_parallel_size=4"], 4,
             ["num_query_groups=2", "tensor_model_parallel_size=4"]),
            (["model.position_embedding_type=rope", "model.rotary_percent=0.1"], 1,
             ["8 x 0.1 = 0", "even"]),
            (["model.position_embedding_type=rope", "model.hidden_size=40",
              "model.num_attention_heads=8"], 1, ["5 x 1.0 = 5"]),
            (["model.normalization=rmsnorm"], 1, ["'rmsnorm'", "RMSNorm"]),
            (["model.activation=silu"], 1, ["'silu'", "swiglu"]),
            (["model.position_embedding_type=alibi"], 1, ["'alibi'", "rope"])]:
        with pytest.raises(ConfigError) as e:
            check(*overrides, world_size=world)
        msg = str(e.value)
        assert "\n" not in msg and all(w in msg for w in words), (overrides, msg)
    ok = check("model.num_query_groups=4", "parallel.tensor_model_parallel_size=4",
               "model.position_embedding_type=rope", "model.rotary_percent=0.5", world_size=4)
    assert ok.model.rotary_dim() == 4
