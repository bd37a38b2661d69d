"""Read a W&B offline run (``run-*.wandb``): its config and history rows.

wandb 0.31 reads these files in its Go core only, so the test reads them itself:
a 7-byte header (``:W&B``, magic, version), then the LevelDB log format (32 KiB
blocks; each record: CRC32, little-endian length, type FULL/FIRST/MIDDLE/LAST, data)
holding serialized ``wandb_internal_pb2.Record`` messages.
"""
import glob
import json
import os

_BLOCK = 32768
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _payloads(path):
    data = open(path, "rb").read()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending, out = _HEADER, b"", []
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # a block's tail too short for a record header is padding
            pos += left
            continue
        length = int.from_bytes(data[pos + 4:pos + 6], "little")
        kind = data[pos + 6]
        if kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        body = data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        if kind == _FULL:
            out.append(body)
        elif kind == _FIRST:
            pending = body
        elif kind == _MIDDLE:
            pending += body
        elif kind == _LAST:
            out.append(pending + body)
    return out


def _item_key(item):
    return item.key or "/".join(item.nested_key)


def read_offline_run(save_dir):
    """``(run_dir, config, rows)`` of the one offline run under ``save_dir/wandb``: the
    run's config as a dict (W&B's ``{"value": ...}`` wrappers removed) and the history
    rows (dicts of key -> value, ``_step`` included) in order."""
    from wandb.proto import wandb_internal_pb2 as pb
    runs = glob.glob(os.path.join(save_dir, "wandb", "offline-run-*"))
    assert len(runs) == 1, runs
    files = glob.glob(os.path.join(runs[0], "run-*.wandb"))
    assert len(files) == 1, files
    config, rows = {}, []
    for body in _payloads(files[0]):
        rec = pb.Record()
        rec.ParseFromString(body)
        kind = rec.WhichOneof("record_type")
        updates = (rec.run.config.update if kind == "run" else
                   rec.config.update if kind == "config" else [])
        for item in updates:
            value = json.loads(item.value_json)
            config[_item_key(item)] = value.get("value", value) if isinstance(value, dict) else value
        if kind == "history":
            rows.append({_item_key(i): json.loads(i.value_json) for i in rec.history.item})
    return runs[0], config, rows
