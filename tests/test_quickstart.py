"""The quickstart path end to end, shrunk: preprocess the embedded corpus on first use,
train a few iterations with the real tokenizer, evaluate, save, print a sample."""
import gzip
import os
import subprocess
import sys

from megatron import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_config_end_to_end(tmp_path):
    # A slice of the embedded corpus keeps preprocessing quick; the config is the quickstart's.
    small = tmp_path / "kjv_small.jsonl"
    with gzip.open(os.path.join(ROOT, "data", "kjv.jsonl.gz"), "rt") as f:
        small.write_text("".join(line for _, line in zip(range(40), f)))
    prefix = str(tmp_path / "kjv_text_document")
    save = str(tmp_path / "ck")
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), "--config",
           os.path.join(ROOT, "configs", "gpt2_tiny.yaml"),
           f"data.data_path=[{prefix}]", f"data.preprocess_input={small}",
           "data.split=90,10,0", "model.num_layers=1", "model.hidden_size=32",
           "model.num_attention_heads=2", "model.seq_length=32", "training.micro_batch_size=2",
           "training.train_iters=3", "optimizer.lr_warmup_iters=1", "training.eval_iters=1", "training.sample_tokens=4",
           "logging.log_interval=1", f"checkpoint.save={save}", "logging.tensorboard_dir=null"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    log = out.stdout + out.stderr
    assert out.returncode == 0, log
    assert os.path.exists(prefix + ".bin") and os.path.exists(prefix + ".idx")
    assert "validation loss at iteration 3" in log
    assert "sample from the final model:\nIn the beginning" in log
    assert checkpoint.read_latest_iteration(save) == 3
