"""The command line: argv, environment, printing and exit codes. Core modules return results.

Exit codes: 0 done; 1 the sweep stopped on repeated trial failures; 2 bad input (one line on
stderr, nothing written); 130 interrupted (the same command resumes).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from cifar_exp.config import (
    DEFAULT_STORAGE,
    DEFAULT_TRACKING_URI,
    ConfigError,
    UserError,
    available_sweeps,
    load_sweep,
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2 (argparse prints usage too)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def set_environment() -> None:
    """Environment for Keras and its backends; must run before anything imports keras."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
    # Several workers share one GPU: no process may take all of its memory up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")


def _positive(kind: type, flag: str):  # type: ignore[no-untyped-def]
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes a number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{flag} must be greater than 0, got {text}")
        return value
    return parse


def sweep_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m cifar_exp.sweep",
                description="Run (or resume) the Optuna study of a sweep; every trial is an MLflow run.")
    p.add_argument("name", nargs="?", help="sweep name (see --list) or path to a sweep .yaml file")
    p.add_argument("--list", action="store_true", help="list the sweeps and exit")
    p.add_argument("--trials", type=_positive(int, "--trials"), help="trial budget of the study")
    p.add_argument("--epochs", type=_positive(int, "--epochs"), help="epochs per trial")
    p.add_argument("--timeout", type=_positive(float, "--timeout"), help="seconds; no trial starts after")
    p.add_argument("--data", help="'keras', a cifar-10-python.tar.gz, cifar-10-batches-py/, "
                                  "or an image-folder tree or .zip (train/<class>/, test/<class>/)")
    p.add_argument("--storage", default=DEFAULT_STORAGE,
                   help=f"Optuna storage: journal file path or database URL (default {DEFAULT_STORAGE})")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI),
                   help=f"MLflow tracking URI (default $MLFLOW_TRACKING_URI or {DEFAULT_TRACKING_URI})")
    p.add_argument("--workers", type=_positive(int, "--workers"), default=1,
                   help="worker processes sharing the study (default 1)")
    return p


class Progress:
    """Prints what the workers report: a line per trial start and end; on a terminal, a live
    status line per epoch."""

    def __init__(self, metric: str, maximize: bool, finished: int, budget: int | None) -> None:
        self.metric, self.maximize = metric, maximize
        self.finished, self.budget = finished, budget
        self.counts = {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0}
        self.best: tuple[float, int] | None = None
        self.live = sys.stdout.isatty()

    def _of(self) -> str:
        return f"{self.finished} of {self.budget}" if self.budget else f"{self.finished}"

    def _status(self) -> str:
        best = f"best {self.metric}={self.best[0]:.4f} (trial {self.best[1]})" if self.best else "no best yet"
        return (f"{best} | {self.counts['COMPLETE']} complete, {self.counts['PRUNED']} pruned, "
                f"{self.counts['FAIL']} failed")

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["kind"]
        if kind == "start":
            params = " ".join(f"{k}={_fmt(v)}" for k, v in event["params"].items())
            self._line(f"trial {event['trial']} started (worker {event['worker']}): {params}")
        elif kind == "epoch" and self.live:
            sys.stdout.write(f"\r  trial {event['trial']} epoch {event['epoch']}/{event['epochs']} "
                             f"{self.metric}={event['value']:.4f} | {self._status()}\033[K")
            sys.stdout.flush()
        elif kind == "end":
            state = event["state"]
            self.counts[state] = self.counts.get(state, 0) + 1
            if not str(event.get("reason", "")).startswith("interrupted"):  # those do not count
                self.finished += 1
            detail = ""
            if state == "COMPLETE":
                value = event["value"]
                if self.best is None or (value > self.best[0] if self.maximize else value < self.best[0]):
                    self.best = (value, event["trial"])
                detail = f" {self.metric}={value:.4f} test_accuracy={event['test_accuracy']:.4f}"
            elif event.get("reason"):
                detail = f": {event['reason']}"
            self._line(f"trial {event['trial']} {state}{detail} [{self._of()}] {self._status()}")

    def _line(self, text: str) -> None:
        print(("\r\033[K" if self.live else "") + text, flush=True)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _apply_overrides(args: argparse.Namespace) -> Any:
    sweep = load_sweep(args.name)
    changes: dict[str, Any] = {}
    for key in ("trials", "epochs", "timeout"):
        if getattr(args, key) is not None:
            changes[key] = getattr(args, key)
    if args.data is not None:
        changes["data"] = dataclasses.replace(sweep.data, source=args.data)
    return dataclasses.replace(sweep, **changes)


def sweep_main(argv: Sequence[str] | None = None) -> int:
    args = sweep_parser().parse_args(argv)
    try:
        if args.list:
            for name, path in available_sweeps().items():
                try:
                    description = load_sweep(str(path)).description.strip().splitlines()[0]
                except (UserError, IndexError) as exc:
                    description = f"(invalid: {exc})" if isinstance(exc, UserError) else ""
                print(f"{name:<20} {description}")
            return 0
        if not args.name:
            raise ConfigError(f"name a sweep: python -m cifar_exp.sweep NAME "
                              f"(available: {', '.join(available_sweeps())})")
        sweep = _apply_overrides(args)
        set_environment()
        from cifar_exp import data, study  # after set_environment: these may import keras

        dataset = data.load(sweep.data.source)  # bad --data fails here, before anything is written
        data.split(dataset, sweep.data.validation_fraction, sweep.sampler.seed)
        tags = {"data_source": sweep.data.source, "data_checksum": dataset.checksum,
                "command": shlex.join(["python", "-m", "cifar_exp.sweep",
                                       *(argv if argv is not None else sys.argv[1:])]),
                "keras_backend": os.environ["KERAS_BACKEND"]}
        del dataset  # the workers load their own copy; the parent keeps no arrays
        settings = study.Settings(sweep=sweep, storage=args.storage, tracking_uri=args.tracking_uri,
                                  workers=args.workers, tags=tags)
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # we print our own progress
        existing = study.create_study(settings)
        finished = len(study.counted(existing.get_trials(deepcopy=False)))
        print(f"sweep {sweep.name}: {sweep.description.strip().splitlines()[0] if sweep.description else ''}")
        print(f"study '{sweep.name}' in {args.storage}: {finished} trials finished before; "
              f"budget {sweep.trials if sweep.trials else 'none'} trials, "
              f"{sweep.epochs} epochs each, {args.workers} worker(s); tracking {args.tracking_uri}", flush=True)
        progress = Progress(sweep.objective.metric, sweep.objective.direction == "maximize", finished, sweep.trials)
        summary = study.run_sweep(settings, progress)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before the workers started: nothing ran yet
        print("interrupted before any trial started", file=sys.stderr)
        return 130
    _print_summary(summary, sweep.objective.metric, args.tracking_uri)
    if summary.interrupted:
        print("interrupted: run the same command to resume the sweep", file=sys.stderr)
        return 130
    if summary.stop_reason:
        print(f"error: {summary.stop_reason}", file=sys.stderr)
        return 1
    return 0


def _print_summary(summary: Any, metric: str, tracking_uri: str) -> None:
    from cifar_exp import track

    counts = ", ".join(f"{n} {s.lower()}" for s, n in summary.counts.items() if n)
    print(f"\nstudy '{summary.study_name}': {counts or 'no trials'}")
    if summary.best:
        print(f"{'rank':>4} {'trial':>5} {metric:>12} {'test_accuracy':>13}  params")
        for rank, t in enumerate(summary.best, 1):
            params = " ".join(f"{k}={_fmt(v)}" for k, v in t.params.items())
            test = t.user_attrs.get("test_accuracy")
            print(f"{rank:>4} {t.number:>5} {t.value:>12.4f} {test if test is None else f'{test:.4f}':>13}  {params}")
        print(f"best run: {summary.best[0].user_attrs.get('mlflow_run_id')} "
              f"(experiment {summary.experiment_id}, parent run {summary.parent_run_id})")
    print(f"open the MLflow UI: {track.ui_command(tracking_uri)}")
