"""Helpers that more than one test file uses; test modules import from here, never
from each other (tests/test_house_rules.py checks it).

- ``training``: the synthetic corpus, the tiny GPT's overrides and a pretrain() call
  (training, resume, checkpoint, conversion, torchrun tests), the re-sharding layout.
- ``bpe_checkpoint``: a small trained GPT-2 BPE checkpoint at any TP x PP layout
  (generation, evaluation, Hugging Face, server and conversion tests).
- ``model``: a tiny GPT config, its Llama-style twin (``llama_cfg``) and a random batch
  (model, TP model, collectives tests).
- ``data``: an indexed dataset whose tokens are their own positions (dataset tests).
- ``tiny_tp``: a tiny tensor-parallel model with its batches, optimizer config and
  training iterations (optimizer, clipping, mixed-precision, distributed-optimizer tests).
- ``wandb_records``: the config and history rows of a W&B offline run file (W&B test).
- ``optimizer_launch``: the one 4-process launch whose per-rank results those optimizer
  tests check.
- ``tp_launch`` with ``tp_layer_checks`` and ``tp_cross_entropy_checks``: the one
  4-process launch of the mpu tests (layers and mappings, cross entropy, dropout masks).
- ``collectives``: the collectives a layer and a training step must issue (the
  collectives test, the dry-run tests).
- ``dry_run_checks``: the dry run's validation layouts, measured on gloo and predicted
  on fakes, and the runtime memory report's run (dry-run tests).

The multi-process launcher itself is ``tests/dist_harness.py``. Functions run by it
live at module level here so that spawn can pickle them by name.
"""
