"""bench/throughput.py on the Llama block: the hand-written baseline (bench/baseline_llama.py)
computes our model's loss on the same weights, the FLOPs count query groups and SwiGLU, and
configs/llama_tiny.yaml (BPE files, no tokenizer.vocab_size) runs with its baseline."""
import os
import subprocess
import sys

import torch

from megatron.planning.flops import gpt_flops_per_iteration
from tests.helpers.model import batch, llama_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))


def test_flops_count_query_groups_and_swiglu():
    from megatron.config import load_config
    gpt2 = load_config(os.path.join(ROOT, "configs", "gpt2_tiny.yaml"), [], world_size=1).model
    llama = load_config(os.path.join(ROOT, "configs", "llama_tiny.yaml"), [], world_size=1).model
    args = (16, 128, 4, 128, 8192)

    def model_flops_options(m):
        return {"num_attention_heads": m.num_attention_heads, "num_query_groups": m.num_query_groups,
                "gated_mlp": m.activation == "swiglu"}
    # llama_tiny's layer has GPT-2's 12 h^2 weights (QKV 2 h^2 with 2 of 4 groups, SwiGLU 9 h^2)
    assert gpt_flops_per_iteration(*args, llama.ffn_hidden_size, **model_flops_options(llama)) == \
        gpt_flops_per_iteration(*args, gpt2.ffn_hidden_size, **model_flops_options(gpt2))
    plain = gpt_flops_per_iteration(*args, 384)
    assert gpt_flops_per_iteration(*args, 384, gated_mlp=True) - plain == 3 * 16 * 128 * 4 * 2 * 128 * 384
    mqa = gpt_flops_per_iteration(*args, 384, num_attention_heads=4, num_query_groups=1)
    assert plain - mqa == 3 * 16 * 128 * 4 * 2 * (2 * 128 * 128 - 2 * 128 * 32)


def test_baseline_llama_is_our_model_on_the_same_weights():
    """Same weights in the hand-written model (fused [q; k; v] and [gate; up] linears, nn.RMSNorm,
    SDPA with grouped K/V): the same loss and logits, so the two do the same work."""
    import baseline_llama
    from megatron.checkpoint.hf_llama import split_qkv
    from megatron.model import GPTModel
    vocab = 256
    for untie in (True, False):
        cfg = llama_cfg(model__ffn_hidden_size=96, model__untie_embeddings_and_output_weights=untie)
        m = cfg.model
        ours = GPTModel(cfg, vocab)
        base = baseline_llama.Llama(vocab, m.seq_length, m.num_layers, m.num_attention_heads,
                                    m.hidden_size, m.query_groups(), m.ffn_hidden_size,
                                    m.rotary_base, m.layernorm_epsilon, tie=not untie)
        s = ours.state_dict()
        with torch.no_grad():
            base.tok_embeddings.weight.copy_(s["embedding.word_embeddings.weight"])
            base.norm.weight.copy_(s["final_layernorm.weight"] + 0.1)  # not the ones it starts at
            ours.final_layernorm.weight.add_(0.1)
            if untie:
                base.output.weight.copy_(s["output_layer.weight"])
            for i, layer in enumerate(base.layers):
                p = f"layers.{i}."
                layer.attention.wqkv.weight.copy_(torch.cat(split_qkv(
                    s[p + "self_attention.query_key_value.weight"], m.num_attention_heads, m.query_groups())))
                layer.attention.wo.weight.copy_(s[p + "self_attention.dense.weight"])
                layer.feed_forward.w13.weight.copy_(s[p + "mlp.dense_h_to_4h.weight"])
                layer.feed_forward.w2.weight.copy_(s[p + "mlp.dense_4h_to_h.weight"])
                layer.attention_norm.weight.copy_(s[p + "input_layernorm.weight"])
                layer.ffn_norm.weight.copy_(s[p + "post_attention_layernorm.weight"])
        ids, pos, labels = batch(vocab)
        loss = ours(ids, pos, labels=labels).mean()
        torch.testing.assert_close(base(ids, labels), loss, rtol=1e-5, atol=1e-6)
        assert sum(p.numel() for p in base.parameters()) == sum(p.numel() for p in ours.parameters())


def test_throughput_runs_llama_tiny_with_its_baseline():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "throughput.py"),
         os.path.join(ROOT, "configs", "llama_tiny.yaml"), "model.num_layers=2", "model.hidden_size=64",
         "model.ffn_hidden_size=128", "model.seq_length=32", "training.micro_batch_size=2",
         "--iters", "1", "--rounds", "2", "--gemm-size", "256"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(2 query groups)" in proc.stdout and "block llama" in proc.stdout
    assert "baseline skipped" not in proc.stdout
    f = {k: float(v) for k, v in (kv.split("=") for kv in proc.stdout.strip().splitlines()[-1].split())}
    assert f["baseline_ratio"] > 0 and f["tokens_per_s"] > 0
    # the GPT-2 BPE tokenizer's 8192 ids; two query groups of 4 heads, SwiGLU
    flops = gpt_flops_per_iteration(2, 32, 2, 64, 8192, 128, num_attention_heads=4,
                                    num_query_groups=2, gated_mlp=True)
    expected_mfu = flops / (f["ms_per_iter"] / 1e3) / (f["peak_gflops"] * 1e9)
    assert abs(f["mfu"] - expected_mfu) <= 0.002 + 0.01 * expected_mfu
