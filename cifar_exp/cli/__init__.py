"""The command line: ``cifar-exp COMMAND`` (and ``python -m cifar_exp.COMMAND``), its arguments
and its one error boundary. What each command does is in ``commands``.

Exit codes: 0 done; 1 the sweep stopped on repeated trial failures (or a rerun did not
reproduce); 2 bad input (one line on stderr, nothing written; ``CIFAR_EXP_DEBUG=1`` adds the
traceback); 130 interrupted (the same command resumes).
"""

from __future__ import annotations

import argparse
import atexit
import errno
import gc
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from cifar_exp.cli import commands, results
from cifar_exp.config import (
    DEFAULT_STORAGE,
    DEFAULT_SWEEP,
    DEFAULT_TRACKING_URI,
    UserError,
    check_storage,
    check_tracking_uri,
    mask_credentials,
)

DEFAULT_MODEL = f"models:/cifar10-{DEFAULT_SWEEP}@champion"  # the main job's champion

# A command's last step was the interpreter's final garbage collection over every object that
# MLflow, Optuna, SQLAlchemy and matplotlib made: 3.1 s after a 2-trial sweep had printed its
# table, 1.3 s for their imports alone (this 2-core machine). Frozen objects are left out of that
# collection; the operating system takes the memory back. Handlers registered before this one
# (logging's flush) still run after it.
atexit.register(gc.freeze)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2 (argparse prints usage too)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _number(kind: type, flag: str, ok: Callable[[Any], bool], requirement: str) -> Callable[[str], Any]:
    """An argparse type: ``kind(text)`` that satisfies ``ok``, else a one-line error."""
    def parse(text: str) -> Any:
        try:
            if not text.isascii():  # int() and float() read other scripts' digits: '٥' is 5 to them
                raise ValueError(text)
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes a number, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{flag} must be {requirement}, got {text}")
        return value
    return parse


def _positive(kind: type, flag: str) -> Callable[[str], Any]:
    return _number(kind, flag, lambda v: v > 0, "greater than 0")


def _gpus(text: str) -> tuple[str, ...]:
    gpus = tuple(g.strip() for g in text.split(","))
    if not all(g.isascii() and g.isdigit() for g in gpus):
        raise argparse.ArgumentTypeError(f"--gpus {text!r}: give GPU indices separated by commas, e.g. --gpus 0,1")
    return gpus


def _tracking(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI),
                   help=f"MLflow tracking and registry URI (default $MLFLOW_TRACKING_URI or {DEFAULT_TRACKING_URI})")


def _storage(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage", default=DEFAULT_STORAGE,
                   help=f"Optuna storage: journal file path or database URL (default {DEFAULT_STORAGE})")


def _study(p: argparse.ArgumentParser) -> None:
    """What the commands that read a finished study take: its sweep, and where study and runs are."""
    p.add_argument("name", help="sweep name or path to its .yaml file")
    _storage(p)
    _tracking(p)


def _sweep(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="sweep name (see --list) or path to a sweep .yaml file")
    p.add_argument("--list", action="store_true", help="list the sweeps and exit")
    p.add_argument("--trials", type=_positive(int, "--trials"), help="trial budget of the study")
    p.add_argument("--epochs", type=_positive(int, "--epochs"), help="epochs per trial")
    p.add_argument("--timeout", type=_positive(float, "--timeout"), help="seconds; no trial starts after")
    p.add_argument("--warm-start", metavar="OTHER[:K]",
                   help="start with the K (default 5) best trials of the sweep OTHER's study (same storage)")
    p.add_argument("--seed", type=_number(int, "--seed", lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
                   help="the sweep seed (sampler, trial seeds, validation split)")
    p.add_argument("--data", help="'keras', a cifar-10-python.tar.gz, cifar-10-batches-py/, "
                                  "or an image-folder tree or .zip (train/<class>/, test/<class>/)")
    p.add_argument("--train-images", type=_positive(int, "--train-images"),
                   help="train on a class-balanced, seeded subset of this many training images (a quick look)")
    _storage(p)
    _tracking(p)
    p.add_argument("--workers", type=_positive(int, "--workers"), default=1,
                   help="worker processes sharing the study (default 1)")
    p.add_argument("--gpus", type=_gpus, default=(),
                   help="GPU indices, e.g. 0,1: worker i sees only GPU i mod count (CUDA_VISIBLE_DEVICES)")
    p.add_argument("--engine", choices=("optuna", "keras-tuner"), default="optuna",
                   help="search with Optuna (default) or with KerasTuner's own tuners, tracked the same way")
    p.add_argument("--register", action="store_true",
                   help="when the sweep ends, register its best model (as the register command)")
    loudness = p.add_mutually_exclusive_group()
    loudness.add_argument("-q", "--quiet", action="store_true", help="print only the final table and errors")
    loudness.add_argument("-v", "--verbose", action="store_true",
                          help="show the libraries' log lines here instead of in mlruns/logs/NAME.log")


def _rerun(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="a trial's MLflow run id, or a sweep name with --trial N")
    p.add_argument("--trial", type=int, help="trial number in the sweep's study (TARGET is then the sweep name)")
    p.add_argument("--tolerance", type=_number(float, "--tolerance", lambda v: v >= 0, "0 or more"), default=0.0,
                   help="largest allowed |rerun - original| per value (default 0: bit for bit)")
    p.add_argument("--data", help="the data to train on (default: the original's data source); "
                                  "its checksum must be the original's")
    p.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=True,
                   help="deterministic kernels (default on; the original's mode must match to reproduce it)")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help=f"Optuna storage for --trial (default {DEFAULT_STORAGE})")
    _tracking(p)


def _register(p: argparse.ArgumentParser) -> None:
    _study(p)
    p.add_argument("--data", help="the test data to compare on (default: what the best trial trained on)")
    p.add_argument("--pick", metavar="METRIC",
                   help="choose the front member best in METRIC (default: the first objective's best)")
    p.add_argument("--where", action="append", default=[], metavar="COND",
                   help="only front members meeting COND, e.g. 'latency_ms<=2' (repeatable, or comma-separated)")
    p.add_argument("--seeds", type=_number(int, "--seeds", lambda v: 0 <= v <= 1000, "0, or 2 to 1000"), metavar="N",
                   help="retrain the best candidates with N more seeds each and promote on their means "
                        "(default: the sweep's confirm_seeds; 0: the one seed the sweep ran)")


def _gc(p: argparse.ArgumentParser) -> None:
    _study(p)
    p.add_argument("--keep", type=_positive(int, "--keep"), metavar="K",
                   help="how many of the best trials keep their models (default: the sweep's keep_models)")


def _ui(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="a sweep: also print the address of its experiment")
    p.add_argument("--port", type=_number(int, "--port", lambda v: 0 < v < 65536, "in 1..65535"), default=5000,
                   help="port (default 5000)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; see README before exposing it)")
    _tracking(p)


def _compare(p: argparse.ArgumentParser) -> None:
    _study(p)
    p.add_argument("--top", type=_positive(int, "--top"), default=5, help="how many trials (default 5)")
    p.add_argument("--out", help="the PNG to write (default mlruns/NAME-top-K.png, beside the store)")


def _predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model URI (default {DEFAULT_MODEL})")
    p.add_argument("--top-k", type=_positive(int, "--top-k"), default=3, help="classes per image (default 3)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _tracking(p)


def _evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"model URI (default {DEFAULT_MODEL})")
    p.add_argument("--data", help="test data (default: the data the model's run trained on)")
    _tracking(p)


@dataclass(frozen=True)
class Command:
    """A command: its arguments, the function that runs it (argv parsed; returns the exit code),
    what it does, and that in a few words (its line in ``cifar-exp --help``)."""

    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str
    summary: str


# The commands, a table of real functions (each a verb in cli.commands or cli.results).
COMMANDS: dict[str, Command] = {
    "sweep": Command(_sweep, commands.sweep_command,
                     "Run (or resume) the Optuna study of a sweep; every trial is an MLflow run.",
                     "run or resume a sweep"),
    "rerun": Command(_rerun, commands.rerun_command,
                     "Train a logged trial again from its seed and recorded configuration, into a new MLflow run "
                     "tagged rerun_of, and compare every per-epoch metric with the original.",
                     "train a logged trial again and compare it"),
    "register": Command(_register, results.register_command,
                        "Register the best completed trial of a sweep's study in the MLflow Model Registry (alias "
                        "challenger) and promote it to champion if it beats the champion on the test set.",
                        "register the best model, promote it if better"),
    "report": Command(_study, results.report_command,
                      "Rebuild a study's plots, trials table and cost ledger in its MLflow parent run, from storage, "
                      "without training.", "rebuild a study's report"),
    "compare": Command(_compare, results.compare_command,
                       "The best trials of a sweep as a table, and one PNG overlaying their validation curves.",
                       "the best trials side by side"),
    "gc": Command(_gc, results.gc_command,
                  "Delete the logged models of all but the K best trials of a sweep's study (never a registered "
                  "version's, never a running trial's) and print the bytes freed; runs, metrics and other artifacts "
                  "stay.", "delete all but the best trials' models"),
    "ui": Command(_ui, results.ui_command,
                  "Start the MLflow UI on this project's store, bound to 127.0.0.1 unless told otherwise.",
                  "the MLflow UI on this project's store"),
    "predict": Command(_predict, results.predict_command,
                       "Top-k classes with probabilities for image files (any size; resized to the model's input), "
                       "from a logged or registered model.", "classify image files"),
    "evaluate": Command(_evaluate, results.evaluate_command,
                        "Evaluate a logged or registered model on the test set in a fresh MLflow run, with the "
                        "artifacts of a trial (confusion matrix, classification report, prediction grid).",
                        "a fresh test-set evaluation of a model"),
}


def parser(command: str, prog: str | None = None) -> argparse.ArgumentParser:
    """The parser of one command, as ``python -m cifar_exp.COMMAND`` shows it."""
    found = COMMANDS[command]
    p = _Parser(prog=prog or f"python -m cifar_exp.{command}", description=found.description)
    found.arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``cifar-exp COMMAND [ARGS]``: every command of the project under one name."""
    p = _Parser(prog="cifar-exp", description="Optuna sweeps of Keras CIFAR-10 classifiers, tracked in MLflow.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for name, found in COMMANDS.items():
        found.arguments(sub.add_parser(name, help=found.summary, description=found.description))
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    return _run(args.command, args, ["cifar-exp", *argv])


def command(name: str, argv: Sequence[str] | None = None) -> int:
    """``python -m cifar_exp.NAME [ARGS]``: the command ``name`` with its own program name."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return _run(name, parser(name).parse_args(argv), ["python", "-m", f"cifar_exp.{name}", *argv])


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
