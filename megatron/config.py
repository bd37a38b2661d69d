"""Typed configuration: dataclass sections loaded from YAML, overridden by `section.key=value`.

Every field carries its documentation in `metadata["doc"]`; `docs/config.md` is
generated from it (`python -m megatron.config --markdown`). Validation runs
before any process group exists, so a wrong layout fails in one clear line.
"""
import dataclasses
import difflib
import math
import sys
import typing
from dataclasses import dataclass, field
from typing import List, Optional

import yaml

from megatron.errors import UserError


class ConfigError(UserError, ValueError):
    """A user-caused configuration error; its message is one line naming the values."""


def _f(default, doc):
    """A dataclass field with its documentation (lists get a fresh copy each time)."""
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass
class ModelConfig:
    """Model shape: GPT-2 by default; the options after layernorm_epsilon give today's
    decoders (Llama family), see docs/models.md."""
    num_layers: int = _f(12, "Number of transformer layers.")
    hidden_size: int = _f(768, "Hidden size h of the transformer.")
    num_attention_heads: int = _f(12, "Number of attention heads; must divide hidden_size.")
    ffn_hidden_size: Optional[int] = _f(None, "Hidden size of the MLP; None means 4 x hidden_size.")
    seq_length: int = _f(1024, "Sequence length of a training sample in tokens.")
    max_position_embeddings: Optional[int] = _f(
        None, "Number of learned position embeddings; None means seq_length.")
    make_vocab_size_divisible_by: int = _f(
        128, "The vocabulary is padded to a multiple of this times the tensor-parallel size.")
    hidden_dropout: float = _f(0.1, "Dropout on embeddings and residual branches.")
    attention_dropout: float = _f(0.1, "Dropout on attention probabilities.")
    init_method_std: float = _f(0.02, "Standard deviation of the normal weight init; output "
                                      "projections are further scaled by 1/sqrt(2 x num_layers).")
    layernorm_epsilon: float = _f(1e-5, "Epsilon of every LayerNorm (or RMSNorm).")
    # Today's decoder (Llama family): each option is Megatron-LM's flag of the same name;
    # the defaults are GPT-2's. docs/models.md gives each one's formula.
    position_embedding_type: str = _f(
        "learned", "learned (a trained absolute position table, GPT-2) or rope (rotary "
                   "embeddings applied to q and k; no position table).")
    rotary_base: int = _f(10000, "RoPE base theta: frequencies base^(-2i/d) (Llama 2: 10000, "
                                 "Llama 3: 500000).")
    rotary_percent: float = _f(1.0, "Fraction of each head's dims that RoPE rotates (the first "
                                    "ones); the rotated count must be even.")
    normalization: str = _f("LayerNorm", "LayerNorm (GPT-2) or RMSNorm (Llama: no mean, no bias).")
    activation: str = _f(
        "gelu_tanh", "MLP activation: gelu_tanh (GPT-2's tanh approximation), gelu (exact erf) "
                     "or swiglu (silu(x W_gate) * x W_up; ffn_hidden_size is the width of each).")
    num_query_groups: Optional[int] = _f(
        None, "Grouped-query attention: K/V heads shared by groups of query heads; null means "
              "one group per head (multi-head), 1 multi-query. Must divide num_attention_heads "
              "and be divisible by tensor_model_parallel_size.")
    add_bias_linear: bool = _f(True, "Biases in the attention and MLP linears (false: Llama).")
    untie_embeddings_and_output_weights: bool = _f(
        False, "An output layer of its own (output_layer.weight) instead of the word embedding.")

    def query_groups(self):
        """The number of K/V head groups: num_query_groups, or one per head when null."""
        return self.num_query_groups or self.num_attention_heads

    def rotary_dim(self):
        """How many dims of each head RoPE rotates: head_dim x rotary_percent."""
        return int(self.hidden_size // self.num_attention_heads * self.rotary_percent)


@dataclass
class TokenizerConfig:
    """Which tokenizer turns text into ids."""
    type: str = _f("GPT2BPETokenizer", "Tokenizer kind: GPT2BPETokenizer, SentencePieceTokenizer, "
                                       "HuggingFaceTokenizer (tokenizer.json) or NullTokenizer.")
    vocab_file: Optional[str] = _f(None, "GPT-2 BPE vocab.json path.")
    merge_file: Optional[str] = _f(None, "GPT-2 BPE merges.txt path.")
    tokenizer_model: Optional[str] = _f(
        None, "SentencePiece .model or Hugging Face tokenizer.json path.")
    vocab_size: Optional[int] = _f(None, "Vocabulary size (NullTokenizer only; the EOD id is vocab_size - 1).")


@dataclass
class DataConfig:
    """Where training data comes from and how samples are built."""
    data_path: List[str] = _f([], "Dataset prefixes (files PREFIX.bin/.idx): [prefix] or "
                                  "[w1, prefix1, w2, prefix2, ...] to blend with weights.")
    split: str = _f("969,30,1", "Train,valid,test proportions of the documents.")
    data_cache_path: Optional[str] = _f(
        None, "Directory for cached sample indices; None means beside the data.")
    preprocess_input: Optional[str] = _f(
        None, "JSONL (optionally .gz) to preprocess into data_path when its files are absent.")
    reset_position_ids: bool = _f(False, "Restart position ids after each end-of-document token.")
    eod_mask_loss: bool = _f(False, "Mask the loss on end-of-document tokens.")
    num_workers: int = _f(0, "DataLoader worker processes.")


@dataclass
class TrainingConfig:
    """The training loop: batch sizes, length, precision, evaluation, sampling."""
    micro_batch_size: int = _f(4, "Samples per micro batch on one data-parallel rank.")
    global_batch_size: Optional[int] = _f(
        None, "Samples per optimizer step over all DP ranks; None means micro_batch_size x DP. "
              "Gradients are accumulated over global / (micro x DP) micro batches.")
    train_iters: Optional[int] = _f(None, "Number of optimizer steps (this or train_samples).")
    train_samples: Optional[int] = _f(None, "Number of training samples (this or train_iters).")
    seed: int = _f(1234, "Random seed of python, numpy, torch and the model-parallel RNG.")
    precision: str = _f("fp32", "Parameter and compute dtype: fp32, fp16 or bf16.")
    recompute: str = _f("none", "Activation recomputation: none, full or selective.")
    compile: bool = _f(False, "Compile each transformer layer with torch.compile.")
    eval_interval: int = _f(1000, "Validate every this many iterations (and at the end).")
    eval_iters: int = _f(10, "Micro-batch groups (global batches) per validation.")
    exit_interval: Optional[int] = _f(
        None, "Save (if checkpoint.save) and exit when the iteration is a multiple of this.")
    exit_duration_in_mins: Optional[float] = _f(
        None, "Save (if checkpoint.save) and exit after this many minutes of training.")
    max_nonfinite_losses: int = _f(10, "Stop after this many consecutive non-finite losses.")
    device: str = _f("auto", "auto (CUDA when available, else CPU), cpu or cuda.")
    sample_prompt: Optional[str] = _f(
        None, "After training, print a continuation of this prompt from the final model.")
    sample_tokens: int = _f(32, "Number of tokens to generate for sample_prompt.")
    sample_top_k: int = _f(1, "Top-k for the sample: 1 is greedy; sampling is seeded by seed.")
    hardware: Optional[str] = _f(
        None, "Hardware profile for the log's MFU: a name from megatron/planning/hardware.yaml "
              "(V100-32GB, A100-80GB, H100-80GB, H200) or a profiles .yaml file; None: MFU "
              "against a GEMM peak measured on the device at the first log line.")
    distributed_timeout_minutes: float = _f(
        10.0, "Minutes a collective waits for another rank before the run fails with a one-line "
            "error (a hung or stopped rank); also the launch rendezvous' limit. Fractions allowed.")


@dataclass
class OptimizerConfig:
    """AdamW, learning-rate schedule and loss scaling."""
    lr: float = _f(1e-4, "Peak learning rate.")
    min_lr: float = _f(0.0, "Learning rate at the end of the decay.")
    weight_decay: float = _f(0.01, "AdamW weight decay (not applied to biases and norms).")
    adam_beta1: float = _f(0.9, "Adam beta1.")
    adam_beta2: float = _f(0.999, "Adam beta2.")
    adam_eps: float = _f(1e-8, "Adam epsilon.")
    clip_grad: float = _f(1.0, "Clip the global gradient norm to this (0 disables).")
    lr_warmup_iters: int = _f(0, "Linear warmup iterations from 0 to lr.")
    lr_decay_iters: Optional[int] = _f(None, "Iterations of decay to min_lr; None means train_iters.")
    lr_decay_style: str = _f("cosine", "Decay after warmup: cosine, linear or constant.")
    loss_scale: Optional[float] = _f(
        None, "Static loss scale; None means dynamic scaling for fp16 (unused for fp32/bf16).")
    initial_loss_scale: float = _f(2.0 ** 32, "Initial dynamic loss scale.")
    min_loss_scale: float = _f(1.0, "Lowest dynamic loss scale.")
    loss_scale_window: int = _f(1000, "Steps without overflow before the dynamic scale doubles.")
    hysteresis: int = _f(2, "Overflows tolerated before the dynamic scale halves.")


@dataclass
class ParallelConfig:
    """Tensor, pipeline and data parallel layout."""
    tensor_model_parallel_size: int = _f(1, "Tensor-parallel size TP.")
    pipeline_model_parallel_size: int = _f(1, "Pipeline-parallel size PP.")
    virtual_pipeline_model_parallel_size: Optional[int] = _f(
        None, "Model chunks per pipeline rank (interleaved schedule); None means 1.")
    sequence_parallel: bool = _f(False, "Split LayerNorm/dropout activations along the sequence "
                                        "over TP ranks (no-op when TP is 1).")
    distributed_optimizer: bool = _f(False, "Shard optimizer state over data-parallel ranks.")
    accumulate_allreduce_grads_in_fp32: bool = _f(
        True, "Keep the DP grad buffer in fp32 whatever the parameter dtype.")


@dataclass
class CheckpointConfig:
    """Saving and loading checkpoints."""
    save: Optional[str] = _f(None, "Directory to save checkpoints to; None disables saving.")
    load: Optional[str] = _f(None, "Directory to resume from (its latest checkpoint) if it has one.")
    save_interval: Optional[int] = _f(None, "Save every this many iterations (and at the end).")
    keep_last_n: Optional[int] = _f(None, "Keep only the newest n checkpoints; None keeps all. "
                                    "Each save is read back and checked first; one that does not "
                                    "verify removes nothing.")
    verify: bool = _f(True, "Check every checkpoint file against its iteration's manifest.json "
                            "(size and xxh3_64 checksum) before loading it; false skips the "
                            "checksums (huge files). A file that is missing or does not unpickle "
                            "still makes the run fall back to an older checkpoint.")


@dataclass
class LoggingConfig:
    """Console, TensorBoard and Weights & Biases logging."""
    log_interval: int = _f(10, "Print the training line every this many iterations.")
    tensorboard_dir: Optional[str] = _f(None, "TensorBoard event directory; None disables it.")
    wandb_project: Optional[str] = _f(None, "Weights & Biases project (Megatron-LM's --wandb-project); None "
                                            "disables W&B. Needs the [wandb] extra; WANDB_MODE=offline works.")
    wandb_exp_name: Optional[str] = _f(None, "Weights & Biases run name (--wandb-exp-name); None lets W&B pick.")
    wandb_save_dir: Optional[str] = _f(None, "Directory of the local W&B run files (--wandb-save-dir); None = "
                                             "<checkpoint.save>/wandb, or ./wandb without a save directory.")
    memory_report: bool = _f(
        True, "After the first iteration, log each rank role's measured peak tensor memory "
              "beside the dry run's prediction (docs/dry_run.md); the prediction runs one "
              "step on fake tensors before training starts.")


SECTIONS = {
    "model": ModelConfig,
    "tokenizer": TokenizerConfig,
    "data": DataConfig,
    "training": TrainingConfig,
    "optimizer": OptimizerConfig,
    "parallel": ParallelConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
}

ENUMS = {
    ("training", "precision"): ("fp32", "fp16", "bf16"),
    ("training", "recompute"): ("none", "full", "selective"),
    ("training", "device"): ("auto", "cpu", "cuda"),
    ("optimizer", "lr_decay_style"): ("cosine", "linear", "constant"),
    ("model", "position_embedding_type"): ("learned", "rope"),
    ("model", "normalization"): ("LayerNorm", "RMSNorm"),
    ("model", "activation"): ("gelu_tanh", "gelu", "swiglu"),
}


@dataclass
class Config:
    """The whole configuration: one dataclass per section."""
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self):
        """Plain nested dict of builtin types (YAML/checkpoint friendly)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        """Build a Config from a nested dict, checking names and types (no cross-field checks)."""
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a mapping of sections, got {type(d).__name__}")
        sections = {}
        for name, values in d.items():
            if name not in SECTIONS:
                raise ConfigError(f"unknown config section '{name}'{_suggest(name, SECTIONS)}")
            if values is None:
                values = {}
            if not isinstance(values, dict):
                raise ConfigError(f"config section '{name}' must be a mapping, got {values!r}")
            sections[name] = _build_section(name, values)
        return cls(**sections)

    def to_yaml(self):
        """The resolved configuration as YAML text."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    # Derived values used by the training loop.
    def data_parallel_size(self, world_size):
        """DP = world size / (TP x PP)."""
        p = self.parallel
        return world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size)

    def num_microbatches(self, world_size):
        """Micro batches per DP rank per optimizer step."""
        dp = self.data_parallel_size(world_size)
        return self.training.global_batch_size // (self.training.micro_batch_size * dp)


def _suggest(name, candidates):
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(candidates)})"


def _type_ok(value, tp):
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin in (list, List):
        (inner,) = typing.get_args(tp) or (object,)
        return isinstance(value, list) and all(_type_ok(v, inner) for v in value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp is bool:
        return isinstance(value, bool)
    return isinstance(value, tp)


def _type_name(tp):
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin in (list, List):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return tp.__name__


def _coerce(section, key, value, tp):
    """Check a value against the field type; accept a scalar for a list of str."""
    if typing.get_origin(tp) in (list, List) and isinstance(value, (str, int, float)) \
            and not isinstance(value, bool):
        value = [str(value)]
    if typing.get_origin(tp) in (list, List) and isinstance(value, list):
        # Blend weights are numbers in YAML; data_path holds them as strings.
        value = [str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
                 for v in value]
    wants_float = tp is float or (typing.get_origin(tp) is typing.Union and float in typing.get_args(tp))
    if wants_float and isinstance(value, str):
        # YAML 1.1 reads '3e-4' (no dot) as a string; accept it as the float it means.
        try:
            value = float(value)
        except ValueError:
            pass
    if not _type_ok(value, tp):
        raise ConfigError(f"{section}.{key}={value!r} has the wrong type: expected {_type_name(tp)}")
    if tp is float or (typing.get_origin(tp) is typing.Union and float in typing.get_args(tp)
                       and isinstance(value, int)):
        value = float(value)
    return value


def _build_section(name, values):
    cls = SECTIONS[name]
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"unknown config key '{name}.{key}'{_suggest(key, hints)}")
        kwargs[key] = _coerce(name, key, value, hints[key])
    return cls(**kwargs)


def apply_overrides(d, overrides):
    """Apply `section.key=value` strings (YAML scalar typing) to a nested dict in place."""
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        path, text = item.split("=", 1)
        section, key = path.split(".", 1)
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section '{section}' in override '{item}'"
                              f"{_suggest(section, SECTIONS)}")
        try:
            value = yaml.safe_load(text) if text != "" else None
        except yaml.YAMLError:
            value = text
        d.setdefault(section, {})
        if d[section] is None:
            d[section] = {}
        d[section][key] = value
    return d


def finalize(cfg, world_size=1):
    """Fill derived defaults and run cross-field checks for a run on `world_size` processes.

    Raises ConfigError naming the numbers involved. Call before creating process groups.
    """
    m, t, p, o = cfg.model, cfg.training, cfg.parallel, cfg.optimizer
    for (section, key), allowed in ENUMS.items():
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            raise ConfigError(f"{section}.{key}={value!r} is not one of {', '.join(allowed)}")
    positive = [("model", "num_layers"), ("model", "hidden_size"), ("model", "num_attention_heads"),
                ("model", "seq_length"), ("training", "micro_batch_size"),
                ("parallel", "tensor_model_parallel_size"), ("parallel", "pipeline_model_parallel_size"),
                ("logging", "log_interval"), ("training", "eval_interval"),
                ("training", "max_nonfinite_losses")]
    for section, key in positive:
        value = getattr(getattr(cfg, section), key)
        if value < 1:
            raise ConfigError(f"{section}.{key}={value} must be at least 1")
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(f"model.hidden_size={m.hidden_size} is not divisible by "
                          f"model.num_attention_heads={m.num_attention_heads}")
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    vp = p.virtual_pipeline_model_parallel_size or 1
    if m.num_attention_heads % tp:
        raise ConfigError(f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
                          f"parallel.tensor_model_parallel_size={tp}")
    _check_decoder_options(m, tp)
    if m.num_layers % (pp * vp):
        raise ConfigError(f"model.num_layers={m.num_layers} is not divisible by "
                          f"pipeline_model_parallel_size x virtual_pipeline_model_parallel_size "
                          f"= {pp} x {vp} = {pp * vp}")
    if p.virtual_pipeline_model_parallel_size is not None and pp < 2 and vp > 1:
        raise ConfigError(f"parallel.virtual_pipeline_model_parallel_size={vp} needs "
                          f"parallel.pipeline_model_parallel_size > 1, got {pp}")
    if world_size % (tp * pp):
        raise ConfigError(f"world size {world_size} is not divisible by tensor x pipeline "
                          f"model parallel size = {tp} x {pp} = {tp * pp}")
    dp = world_size // (tp * pp)
    if t.global_batch_size is None:
        t.global_batch_size = t.micro_batch_size * dp
    if t.global_batch_size < 1 or t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(f"training.global_batch_size={t.global_batch_size} is not divisible by "
                          f"micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp} "
                          f"= {t.micro_batch_size * dp} (world size {world_size}, TP {tp}, PP {pp})")
    num_micro = t.global_batch_size // (t.micro_batch_size * dp)
    if vp > 1 and num_micro % pp:
        # The interleaved schedule runs the micro batches in groups of PP per model chunk.
        raise ConfigError(f"the interleaved schedule (parallel.virtual_pipeline_model_parallel_size"
                          f"={vp}) needs the micro batches per step, global_batch_size / "
                          f"(micro_batch_size x data-parallel size) = {t.global_batch_size} / "
                          f"({t.micro_batch_size} x {dp}) = {num_micro}, to be a multiple of "
                          f"parallel.pipeline_model_parallel_size={pp}")
    if m.max_position_embeddings is None:
        m.max_position_embeddings = m.seq_length
    if m.seq_length > m.max_position_embeddings:
        raise ConfigError(f"model.seq_length={m.seq_length} exceeds "
                          f"model.max_position_embeddings={m.max_position_embeddings}")
    if m.ffn_hidden_size is None:
        m.ffn_hidden_size = 4 * m.hidden_size
    if m.ffn_hidden_size % tp:
        raise ConfigError(f"model.ffn_hidden_size={m.ffn_hidden_size} is not divisible by "
                          f"parallel.tensor_model_parallel_size={tp}")
    if p.sequence_parallel and tp == 1:
        # Sequence parallelism splits over TP ranks: with one rank it means nothing.
        p.sequence_parallel = False
    if p.sequence_parallel and m.seq_length % tp:
        raise ConfigError(f"model.seq_length={m.seq_length} is not divisible by "
                          f"parallel.tensor_model_parallel_size={tp} (needed by sequence_parallel)")
    if t.hardware is not None:
        from megatron.planning.hardware import HardwareError, get_profile
        try:
            get_profile(t.hardware).peak(t.precision)
        except HardwareError as e:
            raise ConfigError(f"training.hardware={t.hardware!r}: {e}") from None
    if t.train_iters is None and t.train_samples is None:
        raise ConfigError("set training.train_iters or training.train_samples (both are null)")
    if t.train_samples is not None:
        iters = math.ceil(t.train_samples / t.global_batch_size)
        if t.train_iters is not None and t.train_iters != iters:
            raise ConfigError(f"training.train_iters={t.train_iters} contradicts "
                              f"training.train_samples={t.train_samples} / global_batch_size="
                              f"{t.global_batch_size} = {iters} iterations; set only one")
        t.train_iters = iters
    if t.train_iters < 0:
        raise ConfigError(f"training.train_iters={t.train_iters} must not be negative")
    if o.lr_decay_iters is None:
        o.lr_decay_iters = t.train_iters
    if o.lr_decay_style != "constant" and o.lr_decay_iters < o.lr_warmup_iters:
        raise ConfigError(f"optimizer.lr_decay_iters={o.lr_decay_iters} is shorter than "
                          f"optimizer.lr_warmup_iters={o.lr_warmup_iters} (lr_decay_iters "
                          f"defaults to training.train_iters={t.train_iters})")
    if o.min_lr > o.lr:
        raise ConfigError(f"optimizer.min_lr={o.min_lr} exceeds optimizer.lr={o.lr}")
    if not t.distributed_timeout_minutes > 0:
        raise ConfigError(f"training.distributed_timeout_minutes={t.distributed_timeout_minutes} "
                          f"must be positive")
    if cfg.checkpoint.keep_last_n is not None and cfg.checkpoint.keep_last_n < 1:
        raise ConfigError(f"checkpoint.keep_last_n={cfg.checkpoint.keep_last_n} must be at least 1")
    return cfg


def _read_yaml(path):
    try:
        with open(path) as f:
            d = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"config file {path} must be a mapping of sections, got "
                          f"{type(d).__name__}")
    return d


def _check_decoder_options(m, tp):
    """Cross-field checks of the Llama-family options (grouped-query attention, RoPE)."""
    if m.num_query_groups is not None:
        groups = m.num_query_groups
        if groups < 1 or m.num_attention_heads % groups:
            raise ConfigError(f"model.num_attention_heads={m.num_attention_heads} is not divisible "
                              f"by model.num_query_groups={groups}")
        if groups % tp:
            # K/V heads are split over TP by whole groups; replicating a group on
            # several ranks is not supported.
            raise ConfigError(f"model.num_query_groups={groups} is not divisible by "
                              f"parallel.tensor_model_parallel_size={tp}")
    if m.position_embedding_type == "rope":
        head_dim = m.hidden_size // m.num_attention_heads
        if not 0.0 < m.rotary_percent <= 1.0:
            raise ConfigError(f"model.rotary_percent={m.rotary_percent} must be in (0, 1]")
        if m.rotary_dim() < 2 or m.rotary_dim() % 2:
            raise ConfigError(f"RoPE rotates head_dim x rotary_percent = {head_dim} x "
                              f"{m.rotary_percent} = {m.rotary_dim()} dims, which must be even "
                              f"and at least 2")
        if m.rotary_base < 1:
            raise ConfigError(f"model.rotary_base={m.rotary_base} must be at least 1")


def load_config(path=None, overrides=(), world_size=None):
    """Read YAML at `path` (None: defaults), apply overrides, check names and types.

    `path` may be a list of files: each later one is an overlay whose fields replace the
    earlier ones' key by key (e.g. a layout written by tools/plan_layout.py --emit).
    With `world_size` given, also fill derived defaults and run the cross-field
    checks (`finalize`). Raises ConfigError with a one-line message.
    """
    d = {}
    paths = [] if path is None else [path] if isinstance(path, str) else list(path)
    for p in paths:
        for section, values in _read_yaml(p).items():
            if isinstance(values, dict) and isinstance(d.get(section), dict):
                d[section].update(values)
            else:
                d[section] = values
    apply_overrides(d, list(overrides))
    cfg = Config.from_dict(d)
    if world_size is not None:
        finalize(cfg, world_size)
    return cfg


def markdown():
    """The config reference (docs/config.md) generated from the field docs."""
    lines = ["# Configuration reference", "",
             "Generated by `python -m megatron.config --markdown > docs/config.md`; do not edit.",
             "Set a field in YAML under its section, or override it on the command line as",
             "`section.key=value` (YAML typing: `training.train_iters=100`, "
             "`data.data_path=[a,b]`, `checkpoint.load=null`).", ""]
    for name, cls in SECTIONS.items():
        lines += [f"## `{name}`", "", (cls.__doc__ or "").strip(), "",
                  "| field | type | default | meaning |", "| --- | --- | --- | --- |"]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = f.default
            else:
                default = f.default_factory()
            lines.append(f"| `{f.name}` | {_type_name(hints[f.name])} | `{default!r}` | "
                         f"{f.metadata['doc']} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] == ["--markdown"]:
        sys.stdout.write(markdown())
    else:
        sys.exit("usage: python -m megatron.config --markdown")
