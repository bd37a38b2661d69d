"""Optional packages: import one on first use, or say in one line which extra installs it.

The core install stays small; reading Parquet or zstd JSONL (``[data]``), logging to
Weights & Biases (``[wandb]``) and the lm-evaluation-harness model (``[eval]``) each
need a package the user may not have. Asking for that feature without it is a
mistake the user can fix, so it is a ``UserError`` naming the package and the extra.
"""
import importlib

from megatron.errors import UserError


class MissingDependencyError(UserError, ImportError):
    """An optional package a requested feature needs is not installed."""


def require(module, extra, purpose):
    """Import and return ``module``; if it is not installed, raise MissingDependencyError
    naming ``purpose`` and the setup.py ``extra`` that installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != module.split(".")[0]:
            raise  # the package is there but something it imports is not: not ours to hide
        raise MissingDependencyError(f"{purpose} needs the Python package {module.split('.')[0]!r}, "
                                     f"which is not installed (pip install -e .[{extra}])") from None
