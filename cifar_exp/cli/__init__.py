"""The command line: ``cifar-exp COMMAND`` (and ``python -m cifar_exp COMMAND``; the main job also
as ``python -m cifar_exp.sweep NAME``) and its one error boundary. Each command is a module of
``cli`` (``sweep``, ``rerun``, ``register``, ...): its arguments, and ``run``, which calls the
library and prints; the library decides.

Exit codes (``cluster.Exit``, the contract a scheduler reads): 0 done; 1 the sweep stopped on
repeated trial failures (or a rerun did not reproduce); 2 bad input (one line on stderr, nothing
written; ``CIFAR_EXP_DEBUG=1`` adds the traceback); 130 interrupted by SIGINT or SIGTERM (the
running trial's retry resumes from its checkpoint when the same command runs again)."""

from __future__ import annotations

import argparse
import atexit
import errno
import gc as python_gc
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

from cifar_exp.cli import compare, dashboard, evaluate, gc, launch, predict, register, report, rerun, sweep, ui
from cifar_exp.config import UserError, check_storage, check_tracking_uri, mask_credentials

# A command's last step was the interpreter's final garbage collection over every object that
# MLflow, Optuna, SQLAlchemy and matplotlib made: 3.1 s after a 2-trial sweep had printed its
# table, 1.3 s for their imports alone (this 2-core machine). Frozen objects are left out of that
# collection; the operating system takes the memory back. Handlers registered before this one
# (logging's flush) still run after it.
atexit.register(python_gc.freeze)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2 (argparse prints usage too)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


@dataclass(frozen=True)
class Command:
    """A command: its arguments, the function that runs it (argv parsed; returns the exit code),
    what it does, and that in a few words (its line in ``cifar-exp --help``)."""

    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str
    summary: str


class _CommandList(argparse.HelpFormatter):
    """argparse measures the commands' column one indent short, so ``dashboard`` wrapped to a line
    of its own: a command and its summary on one line each."""

    def add_argument(self, action: argparse.Action) -> None:
        super().add_argument(action)
        if action.help is not argparse.SUPPRESS and isinstance(action, argparse._SubParsersAction):
            longest = max((len(self._format_action_invocation(a)) for a in action._get_subactions()), default=0)
            self._action_max_length = max(self._action_max_length,
                                          longest + self._current_indent + self._indent_increment)


# The commands, a module of ``cli`` each, in the order ``cifar-exp --help`` lists them.
COMMANDS: dict[str, Command] = {
    "sweep": Command(sweep.add_arguments, sweep.run, sweep.DESCRIPTION, sweep.SUMMARY),
    "rerun": Command(rerun.add_arguments, rerun.run, rerun.DESCRIPTION, rerun.SUMMARY),
    "register": Command(register.add_arguments, register.run, register.DESCRIPTION, register.SUMMARY),
    "report": Command(report.add_arguments, report.run, report.DESCRIPTION, report.SUMMARY),
    "compare": Command(compare.add_arguments, compare.run, compare.DESCRIPTION, compare.SUMMARY),
    "gc": Command(gc.add_arguments, gc.run, gc.DESCRIPTION, gc.SUMMARY),
    "ui": Command(ui.add_arguments, ui.run, ui.DESCRIPTION, ui.SUMMARY),
    "dashboard": Command(dashboard.add_arguments, dashboard.run, dashboard.DESCRIPTION, dashboard.SUMMARY),
    "predict": Command(predict.add_arguments, predict.run, predict.DESCRIPTION, predict.SUMMARY),
    "evaluate": Command(evaluate.add_arguments, evaluate.run, evaluate.DESCRIPTION, evaluate.SUMMARY),
    "launch": Command(launch.add_arguments, launch.run, launch.DESCRIPTION, launch.SUMMARY),
}


def parser(command: str, prog: str | None = None) -> argparse.ArgumentParser:
    """The parser of one command, as ``cifar-exp COMMAND`` (or ``prog``) shows it."""
    found = COMMANDS[command]
    p = _Parser(prog=prog or f"cifar-exp {command}", description=found.description)
    found.arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``cifar-exp COMMAND [ARGS]``: every command of the project under one name."""
    p = _Parser(prog="cifar-exp", description="Optuna sweeps of Keras CIFAR-10 classifiers, tracked in MLflow.",
                formatter_class=_CommandList)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for name, found in COMMANDS.items():
        found.arguments(sub.add_parser(name, help=found.summary, description=found.description))
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    return _run(args.command, args, ["cifar-exp", *argv])


def command(name: str, argv: Sequence[str] | None = None) -> int:
    """``python -m cifar_exp.NAME [ARGS]``: the command ``name`` with its own program name."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = f"python -m cifar_exp.{name}"
    return _run(name, parser(name, prog).parse_args(argv), [*prog.split(), *argv])


def _run(name: str, args: argparse.Namespace, command_line: list[str]) -> int:
    """The one error boundary: a ``UserError`` anywhere is one line on stderr and exit 2, Ctrl-C
    before a command handles it is 130. Files and folders a command creates (journal,
    databases, caches, artifacts) are never writable by group or others, whatever the umask."""
    os.umask(os.umask(0o022) | 0o022)
    # A log handler that cannot write (a full disk) prints a traceback of its own per record.
    logging.raiseExceptions = False
    args.command_line = command_line
    try:
        if getattr(args, "tracking_uri", None) is not None:
            check_tracking_uri(args.tracking_uri)
        if getattr(args, "storage", None) is not None:
            check_storage(args.storage)
        return int(COMMANDS[name].run(args))
    except UserError as exc:
        if os.environ.get("CIFAR_EXP_DEBUG") == "1":
            traceback.print_exception(exc, chain=True)
        print(f"error: {mask_credentials(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        problem = disk_problem(exc)
        if problem is None:
            raise
        if os.environ.get("CIFAR_EXP_DEBUG") == "1":
            traceback.print_exception(exc, chain=True)
        print(f"error: {mask_credentials(problem)}", file=sys.stderr)
        return 2


_FULL = (errno.ENOSPC, errno.EDQUOT)
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


def disk_problem(exc: BaseException) -> str | None:
    """The one line for ``exc`` if it (or an exception it was raised from) is a full disk or a
    store that cannot be written (OSError, or SQLite's own words), else None."""
    seen: BaseException | None = exc
    while seen is not None:
        text = str(seen).lower()
        if isinstance(seen, OSError) and seen.errno in _FULL + _READ_ONLY:
            where = f" {seen.filename}" if seen.filename else ""
            what = "the disk is full" if seen.errno in _FULL else "the store is not writable"
            return (f"cannot write{where}: {what} ({os.strerror(seen.errno)}): free space or make the store writable "
                    f"(or pass --storage and --tracking-uri elsewhere), then run the same command again")
        if "database or disk is full" in text or "readonly database" in text:
            what = "the disk is full" if "full" in text else "the database is read-only"
            return (f"cannot write the MLflow store: {what} (SQLite: {str(seen).splitlines()[0][:120]}): free space or "
                    f"make the store writable (or pass --tracking-uri elsewhere), then run the same command again")
        seen = seen.__cause__ or seen.__context__
    return None


def sweep_main(argv: Sequence[str] | None = None) -> int:
    return command("sweep", argv)
