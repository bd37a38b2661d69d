"""The one base class of errors a user can fix, and the rule for what prints as one line.

A bad config, a missing or corrupt data file, a checkpoint that does not fit, a
tokenizer that cannot be built, a request the server refuses, an evaluation or
generation setting out of range: each is raised as a subclass of ``UserError``
whose message is one line naming the values involved. Subclasses also derive
from the builtin class their callers have always caught (``ValueError``,
``RuntimeError``, ...). Raise them where the user's input is checked (``--data
X does not exist``), not by re-wrapping a builtin error deep inside.

``pretrain_gpt.py`` and every tool run through ``megatron.cli``, which prints
``error: <first line>`` and exits 1 for:

- ``UserError``;
- ``OSError``: a path that is missing or unwritable, a full disk, a port in
  use; its message names the path, and a traceback would add nothing;
- ``mpu.RanksFailedError``: raised by ``mpu.fail_together`` on the ranks whose
  part succeeded; the rank that failed prints its own error.

Any other exception (a plain ``ValueError`` or ``RuntimeError`` from torch, a
``KeyError``) is a bug and keeps its traceback.

``mpu`` imports nothing of ``megatron``, so its errors stand alone:
``ModelParallelConfigError`` (a plain ``ValueError``) is re-raised as a
``ConfigError`` by ``initialize_megatron`` (and the config validation catches
the same layouts before that anyway); ``RanksFailedError`` is named by the
runner itself.
"""


class UserError(Exception):
    """An error the user can fix; its message is one line naming the values involved."""
