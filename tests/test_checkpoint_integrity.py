"""Checkpoint integrity (issue 12, item 3): manifests, verification, fallback to an older
checkpoint, keep_last_n, tools/checkpoint_verify.py and the offline readers.

One straight run saves iterations 2, 4 and 6; each case copies it as a run that
stopped at 4, damages it and resumes to 6: the resumed losses must equal the
straight run's from the iteration it fell back to, bit for bit.
"""
import contextlib
import io
import os
import shutil
import struct
import zipfile

import pytest
import torch

from tests.dist_harness import run_distributed
from tests.helpers.training import make_corpus, run_pretrain, tiny_overrides

ITERS = 6
MODEL = os.path.join("mp_rank_00", "model_optim_rng.pt")


def _iter(root, it):
    return os.path.join(root, f"iter_{it:07d}")


def truncate(path):
    """Cut the file to half its size (a torn write)."""
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def flip_tensor_byte(path):
    """Flip one byte in the middle of the largest tensor's data in a torch.save zip file."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)  # the local header's name and extra-field lengths
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        pos = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(pos)
        byte = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([byte ^ 0x10]))


def stopped_at_4(straight, dest):
    """A copy of the straight run as if it had stopped after saving iteration 4."""
    os.makedirs(dest)
    for it in (2, 4):
        shutil.copytree(_iter(straight, it), _iter(dest, it))
    with open(os.path.join(dest, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("4\n")
    return dest


def _resume(prefix, root, **extra):
    """Resume from `root` to ITERS; (losses, the warnings printed, the error or None)."""
    out, error, losses = io.StringIO(), None, None
    with contextlib.redirect_stdout(out):
        try:
            losses = run_pretrain(tiny_overrides(prefix, **{
                "training.train_iters": ITERS, "checkpoint.load": root, **extra}))["train_losses"]
        except Exception as e:  # noqa: BLE001 - the test checks which and its message
            error = f"{type(e).__name__}: {e}"
    warnings = [line for line in out.getvalue().splitlines() if "warning" in line]
    return {"losses": losses, "warnings": warnings, "error": error}


def _single_process_cases(workdir):
    from megatron.checkpoint import files
    from megatron.checkpoint import save_load
    prefix = make_corpus(os.path.join(workdir, "corpus"))
    straight = os.path.join(workdir, "straight")
    common = {"training.eval_iters": 0, "data.split": "100,0,0", "logging.log_interval": 100}
    base = run_pretrain(tiny_overrides(prefix, **{
        **common, "training.train_iters": ITERS, "checkpoint.save": straight,
        "checkpoint.save_interval": 2}))["train_losses"]
    results = {"straight": base}

    def case(name, damage, **extra):
        root = stopped_at_4(straight, os.path.join(workdir, name))
        damage(root)
        results[name] = _resume(prefix, root, **common, **extra)

    case("truncated", lambda r: truncate(os.path.join(_iter(r, 4), MODEL)))
    case("flipped", lambda r: flip_tensor_byte(os.path.join(_iter(r, 4), MODEL)))
    case("flipped_unverified", lambda r: flip_tensor_byte(os.path.join(_iter(r, 4), MODEL)),
         **{"checkpoint.verify": False})
    case("garbage_latest", lambda r: open(os.path.join(r, "latest_checkpointed_iteration.txt"),
                                          "w").write("\x00garbage"))
    case("none_left", lambda r: (truncate(os.path.join(_iter(r, 2), MODEL)),
                                 flip_tensor_byte(os.path.join(_iter(r, 4), MODEL))))
    case("no_manifest", lambda r: os.remove(os.path.join(_iter(r, 4), "manifest.json")))
    # The flipped byte is inside tensor data: torch.load alone takes it silently.
    flipped = torch.load(os.path.join(_iter(os.path.join(workdir, "flipped"), 4), MODEL),
                         weights_only=True)["model"]
    good = torch.load(os.path.join(_iter(straight, 4), MODEL), weights_only=True)["model"]
    results["flip_changed"] = [k for k in good if not torch.equal(good[k], flipped[k])]

    # keep_last_n=1 and a save whose file the file system tears after it was written:
    # the read-back fails, so iteration 2 (the newest that verifies) stays.
    real_write = files.atomic_write

    def tearing_write(path, obj):
        entry = real_write(path, obj)
        if f"iter_{4:07d}.tmp" in path and path.endswith("model_optim_rng.pt"):
            truncate(path)
        return entry
    torn = os.path.join(workdir, "torn")
    save_load.files.atomic_write = tearing_write
    try:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            run_pretrain(tiny_overrides(prefix, **{
                **common, "training.train_iters": 4, "checkpoint.save": torn,
                "checkpoint.save_interval": 2, "checkpoint.keep_last_n": 1}))
    finally:
        save_load.files.atomic_write = real_write
    results["torn_kept"] = files.list_checkpoints(torn)
    results["torn_save_warnings"] = [w for w in out.getvalue().splitlines() if "warning" in w]
    results["torn"] = _resume(prefix, torn, **common, **{
        "checkpoint.save": torn, "checkpoint.save_interval": 2, "checkpoint.keep_last_n": 1})
    results["torn_kept_after"] = files.list_checkpoints(torn)
    return results


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("integrity"))
    (result,) = run_distributed(_single_process_cases, 1, workdir)
    return workdir, result


def _assert_resumed_from(result, straight, start):
    assert result["error"] is None, result["error"]
    assert sorted(result["losses"]) == list(range(start + 1, ITERS + 1)), result["losses"]
    for i in range(start + 1, ITERS + 1):
        assert result["losses"][i] == straight[i], (i, result["losses"][i], straight[i])


def test_truncated_file_falls_back_to_previous_iteration(single):
    _, r = single
    _assert_resumed_from(r["truncated"], r["straight"], 2)
    (warning,) = r["truncated"]["warnings"]
    assert "iteration 4" in warning and "iteration 2" in warning and MODEL in warning
    assert "truncated" in warning


def test_flipped_byte_fails_checksum_and_falls_back(single):
    _, r = single
    assert len(r["flip_changed"]) == 1  # torch.load would have taken the damaged tensor
    _assert_resumed_from(r["flipped"], r["straight"], 2)
    (warning,) = r["flipped"]["warnings"]
    assert "fails its checksum" in warning and "iteration 2" in warning


def test_verify_false_skips_the_checksums(single):
    _, r = single
    result = r["flipped_unverified"]
    assert result["error"] is None and sorted(result["losses"]) == [5, 6]  # took iteration 4
    assert result["warnings"] == []


def test_garbage_latest_file_falls_back_to_newest_on_disk(single):
    _, r = single
    _assert_resumed_from(r["garbage_latest"], r["straight"], 4)
    assert any("garbage" in w and "not an iteration number" in w
               for w in r["garbage_latest"]["warnings"])


def test_no_good_checkpoint_left_fails_in_one_line(single):
    workdir, r = single
    error = r["none_left"]["error"]
    assert error.startswith("CheckpointError: no checkpoint under") and "\n" not in error
    assert "iteration 4:" in error and "fails its checksum" in error
    assert "iteration 2:" in error and "truncated" in error


def test_checkpoint_without_manifest_loads_unverified(single):
    _, r = single
    _assert_resumed_from(r["no_manifest"], r["straight"], 4)
    assert any("no manifest.json" in w and "unverified" in w for w in r["no_manifest"]["warnings"])


def test_keep_last_n_keeps_newest_verified_checkpoint(single):
    _, r = single
    assert r["torn_kept"] == [2, 4]  # the torn save of 4 pruned nothing
    assert any("does not verify" in w and "keep_last_n" in w for w in r["torn_save_warnings"])
    _assert_resumed_from(r["torn"], r["straight"], 2)
    assert r["torn_kept_after"] == [6]  # good saves prune again


def test_checkpoint_verify_tool(single, capsys):
    from tools.checkpoint_verify import main
    workdir, _ = single
    assert main([os.path.join(workdir, "straight")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["iteration 2", "iteration 4",
                                                      "iteration 6 (latest)"]
    assert all("OK (1 files" in line for line in lines)
    assert main([os.path.join(workdir, "truncated")]) == 1  # the latest (4) is bad
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("iteration 2: OK")
    assert lines[1].startswith("iteration 4 (latest): FAILED") and "truncated" in lines[1]
    assert main([os.path.join(workdir, "garbage_latest")]) == 1
    assert "not an iteration number" in capsys.readouterr().out


def test_offline_readers_refuse_a_corrupt_file(single, tmp_path):
    from megatron.checkpoint import CheckpointError, CheckpointShards, convert_checkpoint
    workdir, _ = single
    flipped = os.path.join(workdir, "flipped")
    with pytest.raises(CheckpointError, match="fails its checksum"):
        convert_checkpoint(flipped, str(tmp_path / "out"), 1, 1)
    assert not os.path.exists(tmp_path / "out")
    assert CheckpointShards(flipped, verify=False).iteration == 4  # skipped on request
    # The converter's own output carries a manifest that verifies.
    convert_checkpoint(os.path.join(workdir, "straight"), str(tmp_path / "tp2"), 2, 1)
    from megatron.checkpoint import verify_iteration
    assert verify_iteration(str(tmp_path / "tp2" / "iter_0000006")).startswith("OK (2 files")


def _tp2_missing_rank_folder(workdir):
    """TP=2: iteration 4 loses mp_rank_01 (rank 1's folder only); both ranks resume from 2."""
    rank = torch.distributed.get_rank()
    prefix = os.path.join(workdir, "corpus")
    if rank == 0:
        make_corpus(prefix)
    torch.distributed.barrier()
    common = {"training.eval_iters": 0, "data.split": "100,0,0", "logging.log_interval": 100,
              "parallel.tensor_model_parallel_size": 2}
    straight = os.path.join(workdir, "straight")
    base = run_pretrain(tiny_overrides(prefix, **{
        **common, "training.train_iters": 4, "checkpoint.save": straight,
        "checkpoint.save_interval": 2}))["train_losses"]
    damaged = os.path.join(workdir, "damaged")
    if rank == 0:
        shutil.copytree(straight, damaged)
        shutil.rmtree(os.path.join(_iter(damaged, 4), "mp_rank_01"))
    torch.distributed.barrier()
    resumed = _resume(prefix, damaged, **common, **{"training.train_iters": 4})
    return {"straight": base, "resumed": resumed}


def test_missing_rank_folder_every_rank_falls_back_together(tmp_path):
    results = run_distributed(_tp2_missing_rank_folder, 2, str(tmp_path))
    for r in results:
        assert r["resumed"]["error"] is None, r["resumed"]["error"]
        assert sorted(r["resumed"]["losses"]) == [3, 4]
        for i in (3, 4):
            assert r["resumed"]["losses"][i] == r["straight"][i]
    (warning,) = results[0]["resumed"]["warnings"]  # printed by rank 0 for rank 1's file
    assert "mp_rank_01" in warning and "is missing" in warning and "iteration 2" in warning
