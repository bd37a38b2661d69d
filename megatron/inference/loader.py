"""Build an evaluation-mode GPTModel from a checkpoint of any TP / PP layout.

The checkpoint's shards are merged in memory (megatron.checkpoint.reshard) and
the model is built at this process's tensor-parallel size: 1 for a plain
process, the world size when the tools run under torchrun
(``init_inference_parallel``).
Pipeline parallelism is not used for inference: every layer lives on each rank.
"""
import os

import torch

from megatron import mpu
from megatron.checkpoint import CheckpointError
from megatron.checkpoint.reshard import (WORD_EMBEDDINGS_KEY, CheckpointShards, merge_model_state,
                                         resize_vocab_tensors, split_tensor, target_padded_vocab)
from megatron.utils import DTYPES


class InferenceModel:
    """A loaded model with what inference needs: ``model`` (GPTModel, eval mode),
    ``cfg`` (Config from the checkpoint), ``tokenizer``, ``device``, ``iteration``,
    ``vocab_size`` (the tokenizer's, unpadded) and ``max_sequence_length``."""

    def __init__(self, model, cfg, tokenizer, device, iteration):
        self.model, self.cfg, self.tokenizer, self.device = model, cfg, tokenizer, device
        self.iteration = iteration
        self.vocab_size = tokenizer.vocab_size
        self.max_sequence_length = cfg.model.max_position_embeddings or cfg.model.seq_length

    @torch.no_grad()
    def logits(self, tokens, inference_params=None):
        """Full-vocabulary logits [b, s, vocab_size] (fp32) of ``tokens`` [b, s] on the device.

        Positions continue after the cached ones when ``inference_params`` is given.
        """
        out = self.model(tokens.to(self.device), inference_params=inference_params)
        if mpu.get_tensor_model_parallel_world_size() > 1:
            out = mpu.gather_from_tensor_model_parallel_region(out)
        return out[..., :self.vocab_size].float()


def init_inference_parallel(device=None):
    """Under torchrun (WORLD_SIZE > 1): create the process group and use every rank
    for tensor parallelism. Returns the TP size (1 for a plain process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and not mpu.is_distributed():
        return 1
    from megatron.initialize import init_distributed, select_device
    init_distributed(device or select_device("auto"))
    world = mpu.get_global_world_size()
    if not mpu.model_parallel_is_initialized():
        mpu.initialize_model_parallel(world, 1)
    return mpu.get_tensor_model_parallel_world_size()


def _config_from_checkpoint(shards):
    from megatron.config import Config, ConfigError
    try:
        cfg = Config.from_dict(shards.config)
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {shards.root}: its stored config is not valid: {e}") from None
    return cfg


def build_tokenizer_for(cfg, root):
    """The checkpoint's tokenizer, or CheckpointError naming the missing file."""
    from megatron.tokenizer import build_tokenizer
    try:
        return build_tokenizer(cfg.tokenizer)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"checkpoint {root}: cannot build its tokenizer ({e}); run from the "
                              f"directory the tokenizer paths are relative to") from None


def load_inference_model(load_dir, device=None, dtype=None, iteration=None, tokenizer=None):
    """Load the checkpoint under ``load_dir`` (latest iteration unless given) for inference.

    ``dtype``: "fp32" / "fp16" / "bf16" or None for the checkpoint's precision
    (fp32 on CPU, where half-precision matmuls are slow).
    """
    from megatron.initialize import select_device
    from megatron.model import GPTModel
    device = device or select_device("auto")
    shards = CheckpointShards(load_dir, iteration)
    cfg = _config_from_checkpoint(shards)
    tokenizer = tokenizer or build_tokenizer_for(cfg, load_dir)
    tp = mpu.get_tensor_model_parallel_world_size()
    tp_rank = mpu.get_tensor_model_parallel_rank()
    if mpu.get_pipeline_model_parallel_world_size() != 1:
        raise CheckpointError("inference runs without pipeline parallelism (every rank holds "
                              "all layers); initialize model parallelism with PP=1")
    full = merge_model_state(shards)
    if tokenizer.vocab_size > full[WORD_EMBEDDINGS_KEY].shape[0]:
        raise CheckpointError(f"tokenizer vocabulary {tokenizer.vocab_size} exceeds the "
                              f"checkpoint's {full[WORD_EMBEDDINGS_KEY].shape[0]} embedding rows")
    rows = target_padded_vocab(tokenizer.vocab_size, cfg.model.make_vocab_size_divisible_by, tp)
    resize_vocab_tensors(full, rows)  # the word embedding and an untied output layer

    p = cfg.parallel
    p.tensor_model_parallel_size, p.pipeline_model_parallel_size = tp, 1
    p.virtual_pipeline_model_parallel_size = None
    p.sequence_parallel = False  # one new token at a time cannot be split over ranks
    cfg.training.recompute, cfg.training.compile = "none", False
    # Build on the meta device: the weights come from the checkpoint anyway. The
    # model masks the padding logits (the padding depends on TP), so the gathered
    # logits and anything sampled from them only ever cover real ids.
    with torch.device("meta"):
        model = GPTModel(cfg, rows, vocab_size=tokenizer.vocab_size)
    state = {n: split_tensor(n, t, tp, tp_rank, shards.config) for n, t in full.items()}
    missing = [n for n in model.state_dict() if n not in state]
    if missing:
        raise CheckpointError(f"checkpoint {load_dir} lacks {missing[:3]}")
    model.load_state_dict(state, assign=True, strict=True)
    if dtype is None:
        dtype = cfg.training.precision if device.type == "cuda" else "fp32"
    model = model.to(device=device, dtype=DTYPES[dtype])
    model.eval()
    return InferenceModel(model, cfg, tokenizer, device, shards.iteration)
