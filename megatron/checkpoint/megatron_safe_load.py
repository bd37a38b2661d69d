"""Read a Megatron-LM `model_optim_rng.pt` with `torch.load(weights_only=True)`.

Megatron-LM's files hold a few non-tensor objects besides tensors and plain
containers: the `args` (an `argparse.Namespace` whose values include
`signal.Signals` and Megatron-Core enums), numpy RNG states, the rerun state
machine's enums, Transformer Engine's `BytesIO` extra state. The allow-list
below is the one Megatron-Core 0.16.1 itself registers
(`megatron/core/safe_globals.py`) and nothing more. Megatron-Core's own classes
are not importable here (our package is also named `megatron`), so each is
read into a stand-in that only records what was stored: nothing of theirs runs.
Any other type is refused in one line naming it.
"""
import argparse
import io
import pathlib
import pickle
import re
import signal
import types

import numpy as np
import torch

from megatron.checkpoint.files import CheckpointError


class MegatronObject:
    """A Megatron-Core enum member or config object read from a checkpoint: the class
    name it was saved under (``megatron_class``) and its stored value or fields.

    Enums arrive as ``cls(value)``, dataclasses as ``cls.__new__(cls)`` plus a field
    dict; both only set attributes."""
    megatron_class = None

    def __init__(self, value=None):
        self.value = value

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.value = state

    def __repr__(self):
        return f"{self.megatron_class}({self.__dict__})"


def _stand_in(qualified_name):
    cls = type(qualified_name.rsplit(".", 1)[1], (MegatronObject,),
               {"megatron_class": qualified_name, "__module__": __name__})
    return cls, qualified_name


# megatron/core/safe_globals.py of 0.16.1, the Megatron-Core entries by name.
_MEGATRON_CORE_CLASSES = (
    "megatron.core.enums.ModelType",
    "megatron.core.optimizer.optimizer_config.OptimizerConfig",
    "megatron.core.optimizer.OptimizerConfig",
    "megatron.core.rerun_state_machine.RerunDiagnostic",
    "megatron.core.rerun_state_machine.RerunMode",
    "megatron.core.rerun_state_machine.RerunState",
    "megatron.core.transformer.enums.AttnBackend",
    "megatron.core.transformer.enums.CudaGraphScope",
)
_NUMPY_RECONSTRUCT = np._core.multiarray._reconstruct if hasattr(np, "_core") else \
    np.core.multiarray._reconstruct

SAFE_GLOBALS = [
    argparse.Namespace, types.SimpleNamespace, pathlib.PosixPath, signal.Signals, io.BytesIO,
    np.ndarray, np.dtype, type(np.dtype(np.uint32)),
    _NUMPY_RECONSTRUCT,
    # numpy 1.x wrote the same function under its old module name.
    (_NUMPY_RECONSTRUCT, "numpy.core.multiarray._reconstruct"),
    (_NUMPY_RECONSTRUCT, "numpy._core.multiarray._reconstruct"),
] + [_stand_in(name) for name in _MEGATRON_CORE_CLASSES]

_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def load_megatron_file(path):
    """The dict saved in Megatron-LM rank file ``path`` (on the CPU, weights only, the
    allow-list above); CheckpointError in one line for a missing or unreadable file or
    one holding any other type."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"Megatron-LM checkpoint file {path} is missing") from None
    except pickle.UnpicklingError as e:
        found = _UNSUPPORTED_GLOBAL.search(str(e))
        if found:
            raise CheckpointError(
                f"Megatron-LM checkpoint file {path} holds an object of type {found.group(1)}, "
                f"which is not among the types a Megatron-LM checkpoint may hold (weights-only "
                f"loading); refusing to unpickle it") from None
        raise CheckpointError(f"cannot read Megatron-LM checkpoint {path}: "
                              f"{_first_line(e)}") from None
    except Exception as e:
        raise CheckpointError(f"cannot read Megatron-LM checkpoint {path}: "
                              f"{_first_line(e)}") from None


def _first_line(error):
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    # torch's weights-only message opens with advice; the cause is the line after
    # "WeightsUnpickler error:" (or on it).
    for i, ln in enumerate(lines):
        if "WeightsUnpickler error" in ln:
            rest = ln.split("WeightsUnpickler error:", 1)[-1].strip()
            return rest or (lines[i + 1] if i + 1 < len(lines) else ln)
    return lines[0] if lines else type(error).__name__
