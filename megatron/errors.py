"""The one base class of errors a user can fix.

A bad config, a missing or corrupt data file, a checkpoint that does not fit, a
tokenizer that cannot be built, a request the server refuses: each is raised as
a subclass of ``UserError`` whose message is one line naming the values
involved. ``pretrain_gpt.py`` and the tools catch this one type and print that
line without a traceback (``megatron.cli.run``); any other exception is a bug
and keeps its traceback. Subclasses also derive from the builtin class their
callers have always caught (``ValueError``, ``RuntimeError``, ...).

``mpu`` imports nothing of ``megatron``, so its ``ModelParallelConfigError``
(a plain ``ValueError``) stands alone; ``initialize_megatron`` re-raises it as a
``ConfigError``, and the config validation catches the same layouts before
that anyway.
"""


class UserError(Exception):
    """An error the user can fix; its message is one line naming the values involved."""
