"""Config: YAML + overrides, name/type errors with suggestions, cross-field checks, docs."""
import os
import subprocess
import sys

import pytest

from megatron.config import Config, ConfigError, load_config, markdown

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(overrides, world_size=1):
    return load_config(None, ["training.train_iters=10"] + overrides, world_size=world_size)


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  num_layers: 2\n  hidden_size: 64\n  num_attention_heads: 4\n"
                    "training:\n  train_iters: 5\n")
    cfg = load_config(str(path), ["model.num_layers=4", "optimizer.lr=3e-4",
                                  "data.data_path=[0.5,a,0.5,b]", "checkpoint.save=null"],
                      world_size=1)
    assert cfg.model.num_layers == 4 and cfg.model.hidden_size == 64
    assert cfg.optimizer.lr == pytest.approx(3e-4) and isinstance(cfg.optimizer.lr, float)
    assert cfg.data.data_path == ["0.5", "a", "0.5", "b"]
    assert cfg.checkpoint.save is None
    # derived defaults
    assert cfg.model.ffn_hidden_size == 256 and cfg.model.max_position_embeddings == cfg.model.seq_length
    assert cfg.training.global_batch_size == cfg.training.micro_batch_size
    assert cfg.optimizer.lr_decay_iters == 5
    # round trip through a dict
    assert Config.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("override,needles", [
    ("model.hiden_size=3", ["model.hiden_size", "hidden_size"]),
    ("modle.num_layers=3", ["modle", "'model'"]),
    ("training.micro_batch_sise=3", ["micro_batch_sise", "micro_batch_size"]),
])
def test_unknown_key_names_closest(override, needles):
    with pytest.raises(ConfigError) as e:
        _cfg([override])
    for n in needles:
        assert n in str(e.value)


@pytest.mark.parametrize("override,needles", [
    ("model.hidden_size=abc", ["model.hidden_size", "'abc'", "int"]),
    ("training.compile=3", ["training.compile", "bool"]),
    ("optimizer.lr=fast", ["optimizer.lr", "float"]),
    ("model.num_layers=2.5", ["model.num_layers", "2.5", "int"]),
])
def test_wrong_type(override, needles):
    with pytest.raises(ConfigError) as e:
        _cfg([override])
    for n in needles:
        assert n in str(e.value)


@pytest.mark.parametrize("overrides,world,needles", [
    (["model.hidden_size=100", "model.num_attention_heads=3"], 1, ["100", "3"]),
    (["model.num_attention_heads=12", "parallel.tensor_model_parallel_size=5"], 5, ["12", "5"]),
    (["model.num_layers=6", "parallel.pipeline_model_parallel_size=4"], 4, ["6", "4"]),
    (["model.num_layers=8", "parallel.pipeline_model_parallel_size=2",
      "parallel.virtual_pipeline_model_parallel_size=3"], 2, ["8", "2 x 3"]),
    (["training.micro_batch_size=4", "training.global_batch_size=12"], 2, ["12", "4 x 2"]),
    # interleaved schedule: 24 / (2 x 2) = 6 micro batches, not a multiple of PP=4
    (["model.num_layers=8", "parallel.pipeline_model_parallel_size=4",
      "parallel.virtual_pipeline_model_parallel_size=2", "training.micro_batch_size=2",
      "training.global_batch_size=24"], 8,
     ["24 / (2 x 2) = 6", "pipeline_model_parallel_size=4", "virtual_pipeline_model_parallel_size=2"]),
    (["parallel.tensor_model_parallel_size=4"], 6, ["world size 6", "4"]),
    (["model.seq_length=2048", "model.max_position_embeddings=1024"], 1, ["2048", "1024"]),
    (["training.precision=fp8"], 1, ["fp8", "fp16"]),
    (["training.recompute=some"], 1, ["some", "selective"]),
    (["training.train_iters=null"], 1, ["train_iters", "train_samples"]),
    (["optimizer.lr_warmup_iters=20"], 1, ["lr_decay_iters=10", "lr_warmup_iters=20"]),
])
def test_cross_field_checks(overrides, world, needles):
    with pytest.raises(ConfigError) as e:
        _cfg(overrides, world_size=world)
    for n in needles:
        assert n in str(e.value), (str(e.value), n)


def test_sequence_parallel_without_tp_is_noop_and_samples_set_iters():
    cfg = _cfg(["parallel.sequence_parallel=true"])
    assert cfg.parallel.sequence_parallel is False
    cfg = load_config(None, ["training.train_samples=100", "training.micro_batch_size=8"], world_size=2)
    assert cfg.training.global_batch_size == 16 and cfg.training.train_iters == 7


def test_interleaved_schedule_accepts_micro_batches_multiple_of_pp():
    cfg = _cfg(["model.num_layers=8", "parallel.pipeline_model_parallel_size=4",
                "parallel.virtual_pipeline_model_parallel_size=2", "training.micro_batch_size=2",
                "training.global_batch_size=32"], world_size=8)
    assert cfg.num_microbatches(8) == 8
    # without interleaving any number of micro batches is fine
    cfg = _cfg(["model.num_layers=8", "parallel.pipeline_model_parallel_size=4",
                "training.micro_batch_size=2", "training.global_batch_size=24"], world_size=8)
    assert cfg.num_microbatches(8) == 6


def test_shipped_configs_are_valid():
    expect = {"gpt2_345m": (24, 1024, 16, 1), "gpt2_1.2b": (40, 1536, 16, 1),
              "gpt2_2.5b": (54, 1920, 20, 2), "gpt2_4.2b": (64, 2304, 24, 4),
              "gpt2_8.3b": (72, 3072, 32, 8)}
    for name, (layers, hidden, heads, tp) in expect.items():
        cfg = load_config(os.path.join(ROOT, "configs", f"{name}.yaml"), world_size=8 * tp)
        m = cfg.model
        assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length) == (layers, hidden, heads, 1024)
        assert cfg.parallel.tensor_model_parallel_size == tp and cfg.training.precision == "fp16"
    load_config(os.path.join(ROOT, "configs", "gpt2_tiny.yaml"), world_size=1)


def test_shipped_llama_configs_have_the_published_shapes():
    """Llama 2 7B and Llama 3 8B as published (their exact parameter counts, which every
    shape enters), laid out for 8 GPUs; llama_tiny at gpt2_tiny's budget and steps."""
    import torch
    from megatron.model import GPTModel

    def count(cfg, vocab):
        with torch.device("meta"):  # no weights drawn
            return sum(p.numel() for p in GPTModel(cfg, vocab).parameters())
    for name, vocab, groups, ffn, base, seq, params in (
            ("llama2_7b", 32000, None, 11008, 10000, 4096, 6_738_415_616),
            ("llama3_8b", 128256, 8, 14336, 500000, 8192, 8_030_261_248)):
        cfg = load_config(os.path.join(ROOT, "configs", f"{name}.yaml"), world_size=8)
        m = cfg.model
        assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups,
                m.ffn_hidden_size, m.rotary_base, m.seq_length) == (32, 4096, 32, groups, ffn, base, seq)
        assert (m.position_embedding_type, m.normalization, m.activation, m.add_bias_linear,
                m.untie_embeddings_and_output_weights) == ("rope", "RMSNorm", "swiglu", False, True)
        assert cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size \
            * cfg.data_parallel_size(8) == 8
        assert count(cfg, vocab) == params, name
    tiny = load_config(os.path.join(ROOT, "configs", "gpt2_tiny.yaml"), world_size=1)
    twin = load_config(os.path.join(ROOT, "configs", "llama_tiny.yaml"), world_size=1)
    assert twin.training == tiny.training and twin.optimizer == tiny.optimizer
    assert twin.data == tiny.data and twin.tokenizer == tiny.tokenizer
    assert abs(count(twin, 8192) / count(tiny, 8192) - 1) < 0.02


def test_docs_config_md_is_current():
    with open(os.path.join(ROOT, "docs", "config.md")) as f:
        assert f.read() == markdown(), "regenerate: python -m megatron.config --markdown > docs/config.md"


def test_print_config_cli_and_error_line():
    tiny = os.path.join(ROOT, "configs", "gpt2_tiny.yaml")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), "--config", tiny,
                          "--print-config", "model.num_layers=3"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    import yaml
    printed = yaml.safe_load(out.stdout)
    assert printed["model"]["num_layers"] == 3
    assert printed["model"]["ffn_hidden_size"] == 4 * printed["model"]["hidden_size"]
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), "--config", tiny,
                          "model.hiden_size=3"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode != 0
    assert "Traceback" not in bad.stderr and "hidden_size" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
