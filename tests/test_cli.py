"""megatron.cli, the runner of pretrain_gpt.py and the tools: a user error prints one line
and exits 1, any other error keeps its traceback, and the process group is torn down
either way."""
import os
import subprocess
import sys

import pytest
import torch

from megatron import mpu
from megatron.cli import command
from megatron.config import ConfigError
from megatron.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def one_process_world(monkeypatch):
    """A body that brings up a gloo world of one and TP=1 groups, as the tools do."""
    from megatron.initialize import init_distributed
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)  # restored after the test

    def up():
        init_distributed(torch.device("cpu"))
        mpu.initialize_model_parallel(1, 1)
        assert mpu.is_distributed() and mpu.model_parallel_is_initialized()
    yield up
    if mpu.model_parallel_is_initialized():  # only if the runner failed to
        mpu.destroy_model_parallel()
    mpu.destroy_process_group()


def test_user_error_is_one_line_exit_1_and_the_group_is_torn_down(one_process_world, capsys):
    @command
    def main(argv=None):
        one_process_world()
        raise ConfigError(f"model.hidden_size={argv[0]} is not divisible by 3\nsecond line")

    assert main(["32"]) == 1
    assert capsys.readouterr().err == "error: model.hidden_size=32 is not divisible by 3\n"
    assert not mpu.is_distributed() and not mpu.model_parallel_is_initialized()


def test_a_bug_keeps_its_traceback_and_the_group_is_torn_down(one_process_world, capsys):
    @command
    def main(argv=None):
        one_process_world()
        torch.zeros(2) + torch.zeros(3)  # a RuntimeError from inside torch: a bug, not the user's

    with pytest.raises(RuntimeError, match="size of tensor"):
        main([])
    assert capsys.readouterr().err == ""
    assert not mpu.is_distributed() and not mpu.model_parallel_is_initialized()


def test_which_errors_print_one_line(tmp_path, capsys):
    def failing(error):
        @command
        def main(argv=None):
            raise error
        return main

    missing = str(tmp_path / "missing.txt")
    cases = [(UserError("plain user error"), "plain user error"),
             (FileNotFoundError(2, "No such file or directory", missing),
              f"[Errno 2] No such file or directory: '{missing}'"),
             (OSError(28, "No space left on device"), "[Errno 28] No space left on device"),
             (mpu.RanksFailedError("saving failed on rank 2 (its error is in that rank's output)"),
              "saving failed on rank 2 (its error is in that rank's output)"),
             (UserError(""), "UserError('')")]
    for error, line in cases:
        assert failing(error)() == 1
        assert capsys.readouterr().err == f"error: {line}\n"
    for bug in (ValueError("deep inside"), KeyError("x"), RuntimeError("rank 0 only")):
        with pytest.raises(type(bug)):
            failing(bug)()
    assert capsys.readouterr().err == ""


def test_exit_codes_and_interrupts(capsys):
    assert command(lambda argv: None)() == 0
    assert command(lambda argv: 3)() == 3
    assert command(lambda argv: len(argv))(["a", "b"]) == 2

    def interrupted(argv=None):
        raise KeyboardInterrupt
    assert command(interrupted=("interrupted: no output written"))(interrupted)() == 130
    assert capsys.readouterr().err == "interrupted: no output written\n"
    with pytest.raises(KeyboardInterrupt):  # a tool that does not ask keeps Python's default
        command(interrupted)()


def test_a_tool_fails_fast_as_a_process():
    # Importing the runner imports no torch, so a bad argument costs no torch start-up; the
    # tool's error is one line on stderr and exit status 1.
    code = "import sys, megatron.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "False", out.stderr
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "merge_datasets.py"),
                        "--input", os.path.join(ROOT, "no-such-dir"), "--output-prefix", "x"],
                       capture_output=True, text=True, cwd=os.path.dirname(ROOT))
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == f"error: input directory not found: {os.path.join(ROOT, 'no-such-dir')}\n"
