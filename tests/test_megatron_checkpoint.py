"""Megatron-LM checkpoints in and out (tools/convert_megatron.py), against files Megatron wrote.

Fixtures (tests/fixtures/): `megatron_core_gpt/` is a GPT checkpoint written by
megatron-core 0.16.1 (TP=1, local layer spec, exact GeLU) with the logits of its own
forward pass; `megatron_lm/{core_llama,legacy_gpt}/` were written by Megatron-LM
core_v0.16.1's save_checkpoint at TP=2 x PP=2 (the first x VP=2: RoPE, RMSNorm, SwiGLU,
2 query groups, no biases, untied output; the second the legacy model with the fused
tanh GeLU), with their pipeline's logits (tests/fixtures/megatron_lm/make_fixtures.py).
Imported, our forward gives those logits at TP=1, TP=2 and PP=2; exported and
re-imported the tensors are bit-identical; training resumes from an import.
"""
import argparse
import datetime
import io
import os
import signal

import pytest
import torch

from tests.dist_harness import run_distributed

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
CORE = os.path.join(FIXTURES, "megatron_core_gpt")
CORE_FILE = os.path.join(CORE, "torch", "iter_0000010", "mp_rank_00", "model_optim_rng.pt")
REAL = os.path.join(FIXTURES, "megatron_lm")
QUIET = dict(log=lambda *_: None)


def _expected(root):
    return torch.load(os.path.join(root, "expected_logits.pt"), weights_only=True)


def _logits(ckpt, tokens):
    from megatron.inference.loader import load_inference_model
    return load_inference_model(ckpt, device=torch.device("cpu")).logits(tokens)


def _model_state(root):
    """Our merged model state of the checkpoint under ``root``."""
    from megatron.checkpoint import CheckpointShards, merge_model_state
    return merge_model_state(CheckpointShards(root))


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    from megatron.checkpoint.megatron_lm import import_from_megatron
    out = str(tmp_path_factory.mktemp("mlm") / "tp1")
    import_from_megatron(os.path.join(CORE, "torch"), out, **QUIET)
    return out


def test_import_megatron_core_fixture_gives_its_logits(imported):
    from megatron.config import load_config
    exp = _expected(CORE)
    logits = _logits(imported, exp["tokens"])
    assert logits.shape == exp["logits"].shape == (2, 32, 512)
    assert (logits - exp["logits"]).abs().max() < 1e-5
    cfg = load_config(os.path.join(imported, "config.yaml"), ["training.train_iters=1"])
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length) == (2, 64, 4, 32)
    assert (m.activation, m.position_embedding_type, m.normalization) == ("gelu", "learned", "LayerNorm")
    assert m.num_query_groups is None and m.add_bias_linear and not m.untie_embeddings_and_output_weights
    assert (cfg.tokenizer.type, cfg.tokenizer.vocab_size) == ("NullTokenizer", 511)
    assert sorted(os.listdir(imported)) == ["config.yaml", "iter_0000010",
                                            "latest_checkpointed_iteration.txt"]


def _forward_at_layouts(roots, tokens):
    """Full logits of ``tokens`` from each checkpoint ``roots[name] = (root, tp, pp)``, loaded
    by the training loader at that layout (2 ranks: TP=2, or two pipeline stages)."""
    from megatron import mpu
    from megatron.checkpoint import load_checkpoint
    from megatron.config import load_config
    from megatron.model import GPTModel
    from megatron.mpu import p2p_communication as p2p
    out = {}
    for name, (root, tp, pp) in roots.items():
        cfg = load_config(os.path.join(root, "config.yaml"), [
            "training.train_iters=1", f"parallel.tensor_model_parallel_size={tp}",
            f"parallel.pipeline_model_parallel_size={pp}"])
        mpu.initialize_model_parallel(tp, pp)
        model = GPTModel(cfg, 512, pre_process=mpu.is_pipeline_first_stage(),
                         post_process=mpu.is_pipeline_last_stage(), vocab_size=512)
        load_checkpoint(cfg, [model], None, None, root=root, load_optimizer=False, load_rng=False)
        model.eval()
        spec = p2p.TensorSpec(p2p.pipeline_tensor_shape(tokens.shape[1], tokens.shape[0],
                                                        cfg.model.hidden_size),
                              torch.float32, torch.device("cpu"))
        with torch.no_grad():
            if not mpu.is_pipeline_first_stage():
                model.set_input_tensor(p2p.recv_forward(spec))
            result = model(tokens)
            if mpu.is_pipeline_last_stage():
                out[name] = mpu.gather_from_tensor_model_parallel_region(result)
            else:
                p2p.send_forward(result, spec)
        mpu.destroy_model_parallel()
    return out


def test_import_resharded_to_tp2_and_pp2_gives_the_logits(tmp_path):
    from megatron.checkpoint.megatron_lm import import_from_megatron
    roots = {}
    for name, tp, pp in (("tp2", 2, 1), ("pp2", 1, 2)):
        roots[name] = (str(tmp_path / name), tp, pp)
        import_from_megatron(os.path.join(CORE, "torch"), roots[name][0], tp=tp, pp=pp, **QUIET)
    assert sorted(os.listdir(tmp_path / "tp2" / "iter_0000010")) == ["manifest.json", "mp_rank_00",
                                                                     "mp_rank_01"]
    assert sorted(os.listdir(tmp_path / "pp2" / "iter_0000010")) == [
        "manifest.json", "mp_rank_00_000", "mp_rank_00_001"]
    exp = _expected(CORE)
    results = run_distributed(_forward_at_layouts, 2, roots, exp["tokens"], timeout=300)
    for name in roots:
        logits = [r[name] for r in results if r and name in r]
        assert logits, name
        for got in logits:
            assert (got - exp["logits"]).abs().max() < 1e-5, name


@pytest.mark.parametrize("kind", ["core_llama", "legacy_gpt"])
def test_import_multi_rank_megatron_lm_checkpoints(tmp_path, kind):
    """TP=2 x PP=2 files written by Megatron-LM's own save_checkpoint (args with enums and
    signals, numpy RNG states): merged, our model gives Megatron's pipeline logits."""
    from megatron.checkpoint.megatron_lm import MegatronCheckpoint, import_from_megatron
    src = MegatronCheckpoint(os.path.join(REAL, kind, "torch"))
    assert (src.tp, src.pp, src.vp, src.legacy) == (2, 2, 2 if kind == "core_llama" else 1,
                                                   kind == "legacy_gpt")
    head = src.files[(0, 0)]
    assert head["args"].exit_signal == signal.SIGTERM
    assert head["args"].attention_backend.megatron_class == \
        "megatron.core.transformer.enums.AttnBackend"
    assert head["rng_state"][0]["np_rng_state"][0] == "MT19937"
    out = str(tmp_path / "ours")
    import_from_megatron(os.path.join(REAL, kind, "torch"), out, **QUIET)
    exp = _expected(os.path.join(REAL, kind))
    assert (_logits(out, exp["tokens"]) - exp["logits"]).abs().max() < 1e-5
    from megatron.config import load_config
    m = load_config(os.path.join(out, "config.yaml"), ["training.train_iters=1"]).model
    if kind == "core_llama":
        assert (m.position_embedding_type, m.normalization, m.activation, m.num_query_groups,
                m.add_bias_linear, m.untie_embeddings_and_output_weights, m.ffn_hidden_size) == \
            ("rope", "RMSNorm", "swiglu", 2, False, True, 48)
    else:
        assert m.activation == "gelu_tanh"  # the bias-GeLU fusion was on


@pytest.mark.parametrize("impl", ["local", "transformer_engine"])
def test_export_and_reimport_are_bit_identical(imported, tmp_path, impl):
    from megatron.checkpoint.megatron_lm import export_to_megatron, import_from_megatron
    from megatron.checkpoint.megatron_safe_load import load_megatron_file
    mlm = str(tmp_path / "mlm")
    export_to_megatron(imported, mlm, transformer_impl=impl, **QUIET)
    ours = load_megatron_file(os.path.join(mlm, "iter_0000010", "mp_rank_00", "model_optim_rng.pt"))
    theirs = load_megatron_file(CORE_FILE)
    want = theirs["model"] if impl == "local" else _te_names(theirs["model"])
    assert set(ours["model"]) == set(want)
    for name, t in want.items():
        if torch.is_tensor(t) and t.dtype != torch.uint8:
            assert torch.equal(ours["model"][name], t), name
    a = ours["args"]
    for key in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                "padded_vocab_size", "vocab_size", "tokenizer_type", "make_vocab_size_divisible_by",
                "max_position_embeddings", "tensor_model_parallel_size",
                "pipeline_model_parallel_size", "bias_gelu_fusion", "swiglu",
                "untie_embeddings_and_output_weights", "position_embedding_type", "normalization"):
        assert getattr(a, key) == getattr(theirs["args"], key), key
    assert (ours["iteration"], ours["checkpoint_version"], a.transformer_impl) == (10, 3.0, impl)
    back = str(tmp_path / "back")
    import_from_megatron(mlm, back, **QUIET)
    first, second = _model_state(imported), _model_state(back)
    assert list(first) == list(second)
    assert all(torch.equal(first[n], second[n]) for n in first)


def test_export_to_tp2_pp2_vp2_and_back_is_bit_identical(tmp_path):
    """Our Llama-style import re-exported at another Megatron layout (ranks, local layer
    indices, the tied/untied output layer) and imported again."""
    from megatron.checkpoint.megatron_lm import export_to_megatron, import_from_megatron
    first = str(tmp_path / "first")
    import_from_megatron(os.path.join(REAL, "core_llama", "torch"), first, **QUIET)
    for name, sizes in (("tp2pp2vp2", (2, 2, 2)), ("tp4", (4, 1, 1))):
        mlm = str(tmp_path / f"mlm_{name}")
        export_to_megatron(first, mlm, *sizes, transformer_impl="local", **QUIET)
        back = str(tmp_path / f"back_{name}")
        import_from_megatron(mlm, back, **QUIET)
        a, b = _model_state(first), _model_state(back)
        assert list(a) == list(b) and all(torch.equal(a[n], b[n]) for n in a), name
    assert sorted(os.listdir(tmp_path / "mlm_tp2pp2vp2" / "iter_0000005")) == [
        "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    # The args Megatron-LM compares or reads on load agree with the ones it saved itself.
    from megatron.checkpoint.megatron_safe_load import load_megatron_file
    rank = os.path.join("iter_0000005", "mp_rank_00_000", "model_optim_rng.pt")
    ours = load_megatron_file(str(tmp_path / "mlm_tp2pp2vp2" / rank))["args"]
    theirs = load_megatron_file(os.path.join(REAL, "core_llama", "torch", rank))["args"]
    for key in ("add_position_embedding", "use_rotary_position_embeddings",
                "position_embedding_type", "normalization", "swiglu", "group_query_attention",
                "num_query_groups", "ffn_hidden_size", "add_bias_linear", "add_qkv_bias",
                "untie_embeddings_and_output_weights", "virtual_pipeline_model_parallel_size",
                "padded_vocab_size"):
        assert getattr(ours, key) == getattr(theirs, key), key


def _te_names(model):
    """The fixture's local-spec state in Transformer Engine layer-spec names, by Megatron-Core's
    own map between the two (gpt_layer_specs.py, sharded_state_dict_keys_map): the pre-norms
    fused into linear_qkv / linear_fc1, and core_attention's extra state."""
    out = {}
    for name, t in model.items():
        name = name.replace(".input_layernorm.", ".self_attention.linear_qkv.layer_norm_")
        name = name.replace(".pre_mlp_layernorm.", ".mlp.linear_fc1.layer_norm_")
        out[name] = t
        if name.endswith("linear_proj._extra_state"):
            out[name.replace("linear_proj", "core_attention")] = None
    return out


def _write_megatron(root, state, iteration=10):
    d = os.path.join(root, f"iter_{iteration:07d}", "mp_rank_00")
    os.makedirs(d)
    torch.save(state, os.path.join(d, "model_optim_rng.pt"))
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(iteration))


def test_transformer_engine_names_import_like_local_ones(imported, tmp_path):
    from megatron.checkpoint.megatron_lm import import_from_megatron
    from megatron.checkpoint.megatron_safe_load import load_megatron_file
    state = load_megatron_file(CORE_FILE)
    te = _te_names(state["model"])
    # Transformer Engine's extra states: empty uint8 tensors (recent versions) or, in older
    # ones, a BytesIO holding torch.save(None) when FP8 is off.
    for i, name in enumerate(n for n in te if n.endswith("_extra_state")):
        if i % 2:
            te[name] = io.BytesIO()
            torch.save(None, te[name])
        else:
            te[name] = torch.empty(0, dtype=torch.uint8)
    state["model"] = te
    src = str(tmp_path / "te")
    _write_megatron(src, state)
    out = str(tmp_path / "ours")
    import_from_megatron(src, out, **QUIET)
    a, b = _model_state(imported), _model_state(out)
    assert list(a) == list(b) and all(torch.equal(a[n], b[n]) for n in a)


def test_activation_follows_the_saved_args():
    from megatron.checkpoint.megatron_args import megatron_activation

    def act(legacy=False, **kw):
        return megatron_activation(argparse.Namespace(**kw), legacy)
    assert act(bias_gelu_fusion=False, bias_activation_fusion=False, openai_gelu=False) == "gelu"
    assert act(bias_gelu_fusion=True) == "gelu_tanh"
    assert act(bias_activation_fusion=True) == "gelu_tanh"
    assert act() == "gelu_tanh"  # no fusion flag saved: Megatron-LM's default, fusion on
    assert act(bias_gelu_fusion=True, add_bias_linear=False) == "gelu"  # never fused without biases
    assert act(swiglu=True, bias_gelu_fusion=True) == "swiglu"
    # openai_gelu / onnx_safe: read by the legacy model only.
    assert act(openai_gelu=True, bias_gelu_fusion=False) == "gelu"
    assert act(True, openai_gelu=True, bias_gelu_fusion=False) == "gelu_tanh"
    assert act(True, onnx_safe=True, bias_gelu_fusion=True) == "gelu"


def test_refusals_are_one_line(tmp_path, capsys):
    import tools.convert_megatron as cli
    from megatron.checkpoint.megatron_safe_load import load_megatron_file
    base = load_megatron_file(CORE_FILE)

    def refused(name, state=None, setup=None):
        src = str(tmp_path / name)
        if state is not None:
            _write_megatron(src, state)
        if setup:
            setup(src)
        assert cli.main(["import", "--load-dir", src, "--save-dir", str(tmp_path / f"{name}_out")]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
        return err

    # A type outside Megatron's own allow-list is never unpickled.
    assert "datetime.date" in refused("unsafe", {**base, "when": datetime.date(2024, 1, 1)})
    assert "num_experts=8" in refused("moe", {**base, "args": argparse.Namespace(
        **{**vars(base["args"]), "num_experts": 8})})
    assert "q_layernorm" in refused("qknorm", {**base, "model": {
        **base["model"], "decoder.layers.0.self_attention.q_layernorm.weight": torch.ones(16)}})
    assert "holds no saved args" in refused("noargs", {k: v for k, v in base.items() if k != "args"})

    def torch_dist(src):
        os.makedirs(os.path.join(src, "iter_0000010"))
        open(os.path.join(src, "iter_0000010", "__0_0.distcp"), "w").close()
        open(os.path.join(src, "latest_checkpointed_iteration.txt"), "w").write("10")
    assert "torch_dist" in refused("dist", setup=torch_dist)


def test_old_legacy_qkv_orders_become_per_head():
    """Legacy files of checkpoint version 0 stored QKV rows as [3, np, hn], version 1.0 as
    [np, hn, 3] (Megatron-LM's fix_query_key_value_ordering); ours is [np, 3, hn]."""
    from megatron.checkpoint.megatron_names import fix_old_qkv
    heads, hn, h = 2, 3, 5
    per_head = torch.randn(heads, 3, hn, h)
    v0 = per_head.transpose(0, 1).reshape(-1, h)
    v1 = per_head.permute(0, 2, 1, 3).reshape(-1, h)
    assert torch.equal(fix_old_qkv(v0, 0, heads), per_head.reshape(-1, h))
    assert torch.equal(fix_old_qkv(v1, 1, heads), per_head.reshape(-1, h))
    bias = torch.randn(heads, 3, hn)
    assert torch.equal(fix_old_qkv(bias.transpose(0, 1).reshape(-1), 0, heads), bias.reshape(-1))


def test_expected_names_are_the_models():
    from megatron.checkpoint.megatron_names import expected_names
    from megatron.model import GPTModel
    from tests.helpers.model import llama_cfg, tiny_cfg
    for cfg in (tiny_cfg(), llama_cfg()):
        model_cfg = {k: getattr(cfg.model, k) for k in vars(cfg.model)}
        assert expected_names(model_cfg) == list(GPTModel(cfg, 128).state_dict())


def test_training_resumes_from_an_import(imported, tmp_path, capsys):
    """Two iterations from the imported iteration 10: the first step's loss is the imported
    model's loss on that batch, and the optimizer starts fresh (said in one line)."""
    import functools

    import pretrain_gpt
    from megatron.config import load_config
    from megatron.inference.loader import load_inference_model
    from megatron.training import pretrain
    from megatron.initialize import destroy_megatron
    from tests.helpers.training import make_corpus
    prefix = make_corpus(str(tmp_path / "corpus"))
    cfg = load_config(os.path.join(imported, "config.yaml"), [
        f"checkpoint.load={imported}", f"data.data_path=[{prefix}]", "data.split=100,0,0",
        "training.train_iters=12", "training.micro_batch_size=2", "training.global_batch_size=2",
        "training.eval_iters=0", "training.device=cpu", "model.hidden_dropout=0.0",
        "model.attention_dropout=0.0", "logging.log_interval=1",
        "logging.memory_report=false"])  # its dry run would pass fake batches through `step`
    batches = []

    def step(data_iterator, model):
        batch = next(data_iterator)
        batches.append(batch)
        return pretrain_gpt.forward_step(iter([batch]), model, device=torch.device("cpu"))
    try:
        history = pretrain(cfg, functools.partial(pretrain_gpt.model_provider, cfg, 512),
                           functools.partial(pretrain_gpt.datasets_provider, eod=511), step)
    finally:
        destroy_megatron()  # the layout and the default group: later tests start without one
    out = capsys.readouterr().out
    assert "no optimizer state in it; starting a fresh optimizer from the loaded weights" in out
    assert sorted(history["train_losses"]) == [11, 12]
    im = load_inference_model(imported, device=torch.device("cpu"))
    first = batches[0]
    with torch.no_grad():
        per_token = im.model(first["tokens"], first["position_ids"], labels=first["labels"])
    mask = first["loss_mask"].float()
    expected = float((per_token * mask).sum() / mask.sum())
    assert abs(history["train_losses"][11] - expected) < 1e-5
