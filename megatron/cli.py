"""The one runner of ``pretrain_gpt.py`` and the tools: errors as one line, teardown always.

A tool decorates its ``main(argv=None)`` with ``@command`` (or
``@command(interrupted="...")``); the decorated ``main`` returns the process
exit code, so ``sys.exit(main())`` runs it and tests call ``main([...])``:

- the body's return value (None = 0) is the exit code;
- an error the user can fix (see ``megatron.errors``) prints
  ``error: <first line of its message>`` on stderr and gives 1; any other
  exception keeps its traceback;
- with ``interrupted`` set, Ctrl-C prints that line and gives 130;
- in every case the process group is torn down (``destroy_megatron``) if the
  body brought one up.

Importing this module imports neither torch nor the rest of megatron: a tool
that fails on its arguments fails fast.
"""
import functools
import sys

from megatron.errors import UserError


def one_line_errors():
    """The exception types printed as one line: ``UserError``, ``OSError`` (a path that is
    missing or unwritable, a full disk, a port in use: its message names it), and mpu's
    ``RanksFailedError`` (another rank failed; its own error is in that rank's output)."""
    kinds = [UserError, OSError]
    collectives = sys.modules.get("megatron.mpu.collectives")  # never imports torch itself
    if collectives is not None:
        kinds.append(collectives.RanksFailedError)
    return tuple(kinds)


def first_line(error):
    """The first line of ``str(error)``, or its repr when the message is empty."""
    return (str(error).strip().splitlines() or [repr(error)])[0]


def teardown():
    """Destroy the model-parallel groups and the default process group, if any exist.

    Without ``megatron.mpu`` imported this process never made a group (only mpu creates
    one), so torch is not imported just to learn that."""
    if "megatron.mpu" in sys.modules:
        from megatron.initialize import destroy_megatron
        destroy_megatron()


def run(body, argv=None, interrupted=None):
    """Run ``body(argv)`` as a command line and return its exit code (see the module doc)."""
    try:
        code = body(argv)
        return 0 if code is None else code
    except Exception as e:
        if not isinstance(e, one_line_errors()):
            raise
        print(f"error: {first_line(e)}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        print(interrupted, file=sys.stderr, flush=True)
        return 130
    finally:
        teardown()


def command(body=None, *, interrupted=None):
    """Decorator: ``main(argv=None)`` runs ``body`` through ``run`` and returns the exit code.

    Use as ``@command`` or ``@command(interrupted="interrupted: ...")`` (Ctrl-C -> 130)."""
    def wrap(fn):
        @functools.wraps(fn)
        def main(argv=None):
            return run(fn, argv, interrupted=interrupted)
        return main
    return wrap(body) if body is not None else wrap
