"""Pretrain a GPT model: `[torchrun ...] python pretrain_gpt.py --config X.yaml [--config overlay.yaml] [section.key=value ...]`.

Thin entry point: it supplies the model, the datasets and the forward step to
`megatron.training.pretrain`. `--print-config` prints the resolved YAML and exits;
`--dry-run [--world-size W] [--rank R]` runs one step of rank R of a W-rank job on fake
tensors and prints its memory, collectives and FLOPs (docs/dry_run.md).
"""
import argparse
import functools
import os
import sys

from megatron.cli import command


def model_provider(cfg, padded_vocab, pre_process=True, post_process=True, vocab_size=None):
    """GPTModel for one pipeline chunk.

    ``vocab_size`` is the tokenizer's (unpadded) vocabulary size, whose padding
    logits the model masks; None builds the tokenizer of ``cfg.tokenizer`` to
    learn it, so that the loss never depends on the TP-dependent padding (if it
    cannot be built, nothing is masked and a warning says so).
    """
    from megatron.model import GPTModel
    if vocab_size is None:
        from megatron.tokenizer import build_tokenizer
        try:
            vocab_size = build_tokenizer(cfg.tokenizer).vocab_size
        except (ValueError, OSError) as e:
            import warnings
            warnings.warn(f"cannot build the tokenizer to learn the true vocabulary size ({e}); "
                          f"the {padded_vocab} padded logits are not masked")
    return GPTModel(cfg, padded_vocab, pre_process=pre_process, post_process=post_process,
                    vocab_size=vocab_size)


def datasets_provider(cfg, train_valid_test_num_samples, eod):
    """Train/valid/test GPT datasets over `data.data_path` (None for an empty split)."""
    from megatron.data.gpt_dataset import build_train_valid_test_datasets
    return build_train_valid_test_datasets(cfg.data, cfg.model.seq_length, cfg.training.seed,
                                           train_valid_test_num_samples, eod)


def forward_step(data_iterator, model, device=None):
    """Run one micro batch; the loss is the loss-mask weighted mean of the per-token loss."""
    batch = next(data_iterator) if data_iterator is not None else None
    tokens = batch["tokens"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    loss_mask = batch["loss_mask"].to(device, non_blocking=True).float()
    position_ids = batch["position_ids"].to(device, non_blocking=True)
    output = model(tokens, position_ids, labels=labels)

    def loss_func(output_tensor):
        loss = (output_tensor.float().view(-1) * loss_mask.view(-1)).sum() / loss_mask.sum().clamp(min=1)
        return loss, {"lm loss": loss.detach()}

    return output, loss_func


def _device_for(cfg):
    from megatron.initialize import select_device
    return select_device(cfg.training.device)


def _dry_run(cfg, args):
    """``--dry-run``: this script's model and forward step, on fake tensors (CPU)."""
    import torch
    from megatron.dryrun import vocab_size_of
    from megatron.dryrun.console import run
    from megatron.tokenizer import padded_vocab_size
    vocab = args.vocab_size or vocab_size_of(cfg)
    padded = padded_vocab_size(vocab, cfg.model.make_vocab_size_divisible_by,
                               cfg.parallel.tensor_model_parallel_size)
    run(cfg, args, model_provider=functools.partial(model_provider, cfg, padded, vocab_size=vocab),
        forward_step_func=functools.partial(forward_step, device=torch.device("cpu")),
        vocab_size=vocab)
    return 0


@command
def main(argv=None):
    """Parse arguments, build the providers and train; user errors exit with one line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, action="append",
                        help="YAML config file; repeat it to add overlays (a later file's "
                             "fields replace the earlier ones', e.g. tools/plan_layout.py --emit)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration as YAML and exit")
    parser.add_argument("--dry-run", action="store_true",
                        help="run one training step of a rank of a --world-size job on fake "
                             "tensors and print its memory, collectives and FLOPs "
                             "(docs/dry_run.md), then exit")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    from megatron.dryrun.console import add_arguments
    add_arguments(parser, world_size_default=int(os.environ.get("WORLD_SIZE", "1")))
    args = parser.parse_args(argv)

    # torch is imported only after the config is known good: errors come back fast.
    from megatron.config import load_config
    if args.dry_run:
        return _dry_run(load_config(args.config, args.overrides), args)
    cfg = load_config(args.config, args.overrides,
                      world_size=int(os.environ.get("WORLD_SIZE", "1")))
    if args.print_config:
        sys.stdout.write(cfg.to_yaml())
        return 0
    from megatron.training import pretrain
    from megatron.tokenizer import build_tokenizer, padded_vocab_size
    tokenizer = build_tokenizer(cfg.tokenizer)
    padded = padded_vocab_size(tokenizer.vocab_size, cfg.model.make_vocab_size_divisible_by,
                               cfg.parallel.tensor_model_parallel_size)
    device = _device_for(cfg)
    pretrain(cfg,
             functools.partial(model_provider, cfg, padded, vocab_size=tokenizer.vocab_size),
             functools.partial(datasets_provider, eod=tokenizer.eod),
             functools.partial(forward_step, device=device),
             tokenizer=tokenizer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
