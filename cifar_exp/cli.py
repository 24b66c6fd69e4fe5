"""The command line: argv, environment, printing and exit codes. Core modules return results.

Exit codes: 0 done; 1 the sweep stopped on repeated trial failures; 2 bad input (one line on
stderr, nothing written); 130 interrupted (the same command resumes).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn, Protocol

from cifar_exp.config import (
    DEFAULT_STORAGE,
    DEFAULT_STORE,
    DEFAULT_TRACKING_URI,
    PACKAGE_DIR,
    ConfigError,
    UserError,
    available_sweeps,
    load_sweep,
    mask_credentials,
)


class _Main(Protocol):
    def __call__(self, argv: Sequence[str] | None = None) -> int: ...


def _entry_point(main: _Main) -> _Main:
    """A command: files and folders it creates (journal, databases, caches, artifacts) are never
    writable by group or others, whatever umask the caller has."""

    @functools.wraps(main)
    def command(argv: Sequence[str] | None = None) -> int:
        os.umask(os.umask(0o022) | 0o022)
        return main(argv)

    return command


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2 (argparse prints usage too)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def set_environment(deterministic: bool) -> None:
    """Environment for Keras and its backends; must run before anything imports keras."""
    from cifar_exp.backend import determinism_env

    os.environ.update(determinism_env(deterministic, os.environ))
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    # TensorFlow's C++ log: start-up chatter, and under op determinism a harmless "NodeDef mentions
    # attribute use_unbounded_threadpool" ERROR line per epoch. Python exceptions still surface.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # Several workers share one GPU: no process may take all of its memory up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    # JAX keeps compiled programs (those that took over 1 s to compile) on disk, shared by every
    # worker and run: a trial of a program seen before skips its compilation (the brief measured
    # 15 s of first-epoch compilation for the seed CNN on an H100).
    from cifar_exp.data import cache_dir

    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache_dir() / "jax"))


def provenance() -> dict[str, str]:
    """Where the code came from: the git commit of this checkout and whether it had uncommitted
    changes ("unknown" outside a git checkout), and the versions of the tracking libraries."""
    import importlib.metadata

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(PACKAGE_DIR.parent), *args], capture_output=True, text=True,
                                  timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit or "unknown",
            "git_dirty": "unknown" if commit is None or dirty is None else str(bool(dirty)).lower(),
            **{f"{name.replace('-', '_')}_version": importlib.metadata.version(name)
               for name in ("optuna", "mlflow", "keras-tuner")}}


def _number(kind: type, flag: str, ok: Any, requirement: str):  # type: ignore[no-untyped-def]
    """An argparse type: ``kind(text)`` that satisfies ``ok``, else a one-line error."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes a number, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{flag} must be {requirement}, got {text}")
        return value
    return parse


def _positive(kind: type, flag: str):  # type: ignore[no-untyped-def]
    return _number(kind, flag, lambda v: v > 0, "greater than 0")


_seed = _number(int, "--seed", lambda v: 0 <= v < 2**32, "in [0, 2**32)")
_tolerance = _number(float, "--tolerance", lambda v: v >= 0, "0 or more")  # NaN fails too


def _gpus(text: str) -> tuple[str, ...]:
    gpus = tuple(g.strip() for g in text.split(","))
    if not all(g.isdigit() for g in gpus):
        raise argparse.ArgumentTypeError(f"--gpus {text!r}: give GPU indices separated by commas, e.g. --gpus 0,1")
    return gpus


def sweep_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m cifar_exp.sweep",
                description="Run (or resume) the Optuna study of a sweep; every trial is an MLflow run.")
    p.add_argument("name", nargs="?", help="sweep name (see --list) or path to a sweep .yaml file")
    p.add_argument("--list", action="store_true", help="list the sweeps and exit")
    p.add_argument("--trials", type=_positive(int, "--trials"), help="trial budget of the study")
    p.add_argument("--epochs", type=_positive(int, "--epochs"), help="epochs per trial")
    p.add_argument("--timeout", type=_positive(float, "--timeout"), help="seconds; no trial starts after")
    p.add_argument("--seed", type=_seed, help="the sweep seed (sampler, trial seeds, validation split)")
    p.add_argument("--data", help="'keras', a cifar-10-python.tar.gz, cifar-10-batches-py/, "
                                  "or an image-folder tree or .zip (train/<class>/, test/<class>/)")
    p.add_argument("--train-images", type=_positive(int, "--train-images"),
                   help="train on a class-balanced, seeded subset of this many training images (a quick look)")
    p.add_argument("--storage", default=DEFAULT_STORAGE,
                   help=f"Optuna storage: journal file path or database URL (default {DEFAULT_STORAGE})")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI),
                   help=f"MLflow tracking URI (default $MLFLOW_TRACKING_URI or {DEFAULT_TRACKING_URI})")
    p.add_argument("--workers", type=_positive(int, "--workers"), default=1,
                   help="worker processes sharing the study (default 1)")
    p.add_argument("--gpus", type=_gpus, default=(),
                   help="GPU indices, e.g. 0,1: worker i sees only GPU i mod count (CUDA_VISIBLE_DEVICES)")
    p.add_argument("--engine", choices=("optuna", "keras-tuner"), default="optuna",
                   help="search with Optuna (default) or with KerasTuner's own tuners, tracked the same way")
    p.add_argument("--register", action="store_true",
                   help="when the sweep ends, register its best model (as python -m cifar_exp.register)")
    loudness = p.add_mutually_exclusive_group()
    loudness.add_argument("-q", "--quiet", action="store_true", help="print only the final table and errors")
    loudness.add_argument("-v", "--verbose", action="store_true",
                          help="show the libraries' log lines here instead of in mlruns/logs/NAME.log")
    return p


class Progress:
    """Prints what the workers report: a line per trial start and end; per epoch, on a terminal
    one live status line (rewritten in place), elsewhere (a file, a pipe) one plain line. The
    status carries the best value, the counts, the elapsed time and an estimate of what is left
    (finished trials' mean seconds x trials left / workers). ``quiet``: nothing until the end.

    ``counts`` and ``best`` start from the study's trials so far, so a resume reports them."""

    def __init__(self, metric: str, maximize: bool, finished: int, budget: int | None, workers: int = 1,
                 counts: dict[str, int] | None = None, best: tuple[float, int] | None = None,
                 quiet: bool = False) -> None:
        self.metric, self.maximize = metric, maximize
        self.finished, self.budget, self.workers = finished, budget, workers
        self.counts = {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0, **(counts or {})}
        self.best = best
        self.live = sys.stdout.isatty()
        self.quiet = quiet
        self.started = time.monotonic()
        self.trial_started: dict[int, float] = {}
        self.durations: list[float] = []  # seconds of the trials finished in this run

    def _of(self) -> str:
        return f"{self.finished} of {self.budget}" if self.budget else f"{self.finished}"

    def _clock(self) -> str:
        elapsed = time.monotonic() - self.started
        text = f"{_duration(elapsed)} elapsed"
        if self.budget and self.durations:
            left = max(self.budget - self.finished, 0) * statistics.mean(self.durations) / self.workers
            text += f", about {_duration(left)} left"
        return text

    def _status(self) -> str:
        best = f"best {self.metric}={self.best[0]:.4f} (trial {self.best[1]})" if self.best else "no best yet"
        return (f"{best} | {self.counts['COMPLETE']} complete, {self.counts['PRUNED']} pruned, "
                f"{self.counts['FAIL']} failed | {self._clock()}")

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["kind"]
        if kind == "start":
            self.trial_started[event["trial"]] = time.monotonic()
            params = " ".join(f"{k}={_fmt(v)}" for k, v in event["params"].items())
            self._line(f"trial {event['trial']} started (worker {event['worker']}): {params}")
        elif kind == "epoch":
            seconds = event.get("logs", {}).get("epoch_seconds")
            text = (f"trial {event['trial']} epoch {event['epoch']}/{event['epochs']} "
                    f"{self.metric}={event['value']:.4f}" + (f" ({seconds:.1f} s)" if seconds is not None else ""))
            if self.live and not self.quiet:
                sys.stdout.write(f"\r  {text} | {self._status()}\033[K")
                sys.stdout.flush()
            else:
                self._line(f"  {text}")
        elif kind == "end":
            state = event["state"]
            self.counts[state] = self.counts.get(state, 0) + 1
            if not (str(event.get("reason", "")).startswith("interrupted") or event.get("retried")):  # uncounted
                self.finished += 1
                if event["trial"] in self.trial_started:
                    self.durations.append(time.monotonic() - self.trial_started.pop(event["trial"]))
            detail = ""
            if state == "COMPLETE":
                value = event["value"]
                if self.best is None or (value > self.best[0] if self.maximize else value < self.best[0]):
                    self.best = (value, event["trial"])
                detail = f" {self.metric}={value:.4f} test_accuracy={event['test_accuracy']:.4f}"
            elif event.get("reason"):
                detail = f": {event['reason']}"
            if event.get("degenerate"):
                detail += f" [degenerate: {event['degenerate']}]"
            self._line(f"trial {event['trial']} {state}{detail} [{self._of()}] {self._status()}")
        elif kind == "stale":
            self._line(f"trial {event['trial']} was left running by a worker that is gone: failed, retried once "
                       f"({event['reason']})")

    def _line(self, text: str) -> None:
        if not self.quiet:
            print(("\r\033[K" if self.live else "") + text, flush=True)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _error(exc: BaseException) -> None:
    """The one-line error for the user, with any URL's password hidden."""
    print(f"error: {mask_credentials(str(exc))}", file=sys.stderr)


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
    if args.train_images is not None:
        changes["data"] = dataclasses.replace(changes.get("data", sweep.data), train_images=args.train_images)
    if args.seed is not None:
        changes["sampler"] = dataclasses.replace(sweep.sampler, seed=args.seed)
    return dataclasses.replace(sweep, **changes)


@_entry_point
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
        if args.engine == "keras-tuner" and args.workers != 1:
            raise ConfigError("--engine keras-tuner runs its trials one after another in this process: "
                              "drop --workers")
        if args.engine == "keras-tuner" and args.register:
            raise ConfigError("--register reads the Optuna study: register after an Optuna sweep, or pass a "
                              "model URI to python -m cifar_exp.evaluate")
        set_environment(sweep.deterministic)
        _check_hypermodel(sweep.hypermodel)
        from cifar_exp import data, study, track  # after set_environment: these may import keras

        # Bad input fails here, before anything is written: the servers first (they write nothing
        # when checked), then the data (whose cache is the first write).
        track.check_server(args.tracking_uri)
        if "://" in args.storage:
            study.open_storage(args.storage)
        dataset = data.load(sweep.data.source)
        splits = data.split(dataset, sweep.data.validation_fraction, sweep.sampler.seed, sweep.data.train_images)
        tags = {"data_source": sweep.data.source, "data_checksum": dataset.checksum,
                "command": shlex.join(["python", "-m", "cifar_exp.sweep",
                                       *(argv if argv is not None else sys.argv[1:])]),
                "keras_backend": os.environ["KERAS_BACKEND"], **provenance()}
        sizes = f"{len(splits.y_train)} training / {len(splits.y_val)} validation / {len(splits.y_test)} test images"
        settings = study.Settings(sweep=sweep, storage=args.storage, tracking_uri=args.tracking_uri,
                                  workers=args.workers, gpus=args.gpus, tags=tags, data_checksum=dataset.checksum)
        del dataset, splits  # the workers load their own copy; the parent keeps no arrays
        if args.engine == "keras-tuner":
            return _keras_tuner_main(settings, args)
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # we print our own progress
        if not args.verbose:
            log_file = _library_log(args.storage, sweep.name)
            settings = dataclasses.replace(settings, log_file=str(log_file))
        existing = study.create_study(settings)
        trials = existing.get_trials(deepcopy=False)
        finished = len(study.counted(trials))
        say = (lambda *a, **k: None) if args.quiet else print
        say(f"sweep {sweep.name}: {sweep.description.strip().splitlines()[0] if sweep.description else ''}")
        say(f"study '{sweep.name}' in {mask_credentials(args.storage)}: {finished} trials finished before; "
            f"budget {sweep.trials if sweep.trials else 'none'} trials, "
            f"{sweep.epochs} epochs each on {sizes}, {args.workers} worker(s), seed {sweep.sampler.seed}, "
            f"deterministic kernels {'on' if sweep.deterministic else 'off'}; "
            f"tracking {mask_credentials(args.tracking_uri)}", flush=True)
        if settings.log_file:
            say(f"library log lines (TensorFlow, MLflow, Optuna): {settings.log_file} (-v shows them here)",
                flush=True)
        top = study.best_trials(existing, 1)
        progress = Progress(sweep.objective.metric, sweep.objective.direction == "maximize", finished, sweep.trials,
                            workers=args.workers, quiet=args.quiet,
                            counts={s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL")},
                            best=(float(top[0].value or 0.0), top[0].number) if top else None)
        summary = study.run_sweep(settings, progress)
    except UserError as exc:
        _error(exc)
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
    if args.register:
        try:
            _register(sweep, args.storage, args.data)
        except UserError as exc:
            _error(exc)
            return 2
    return 0


def _check_hypermodel(spec: str) -> None:
    """A sweep's hypermodel module can be found (``ConfigError`` if not), checked without importing
    it, so a typo costs a second and writes nothing; workers import it."""
    if not spec:
        return
    import importlib.util

    module = spec.partition(":")[0]
    try:
        found = importlib.util.find_spec(module) is not None
    except Exception:  # noqa: BLE001 (a parent package that is missing, or fails on import)
        found = False
    if not found:
        raise ConfigError(f"hypermodel {spec}: no module {module} on the Python path: run from the folder that "
                          f"holds it, add that folder to PYTHONPATH, or install it")


def _library_log(storage: str, name: str) -> Path:
    """``logs/NAME.log`` beside the store (``mlruns/`` for a database storage), where the parent's
    and the workers' library log lines go; the parent's go there from now on."""
    import logging

    store = Path(storage).parent if "://" not in storage else DEFAULT_STORE
    path = store / "logs" / f"{name}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for logger in ("mlflow", "optuna", "alembic", "absl", "py.warnings"):
        logging.getLogger(logger).handlers[:] = [handler]
        logging.getLogger(logger).propagate = False
    logging.captureWarnings(True)
    return path


def _keras_tuner_main(settings: Any, args: argparse.Namespace) -> int:
    """``--engine keras-tuner``: the sweep in this process with KerasTuner (see ``tuner``)."""
    from cifar_exp import tuner

    sweep = settings.sweep
    print(f"sweep {sweep.name} with KerasTuner: {sweep.epochs} epochs per trial, seed {sweep.sampler.seed}; "
          f"tracking {settings.tracking_uri}", flush=True)
    progress = Progress(sweep.objective.metric, sweep.objective.direction == "maximize", 0, sweep.trials)
    outcome = tuner.run(settings, progress)
    print(f"{outcome.tuner}: {outcome.counts['COMPLETED']} completed, "
          f"{outcome.counts['FAILED'] + outcome.counts['INVALID']} failed")
    for row in outcome.best:
        params = " ".join(f"{k}={_fmt(v)}" for k, v in row["params"].items())
        print(f"  trial {row['trial']}: {sweep.objective.metric}={row['value']:.4f} {params}")
    print(f"open the MLflow UI: mlflow ui --backend-store-uri {mask_credentials(settings.tracking_uri)} "
          f"(experiment {outcome.experiment_id}; runs tagged engine=keras-tuner)")
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
    print(f"open the MLflow UI: {mask_credentials(track.ui_command(tracking_uri))}")


# ---------------------------------------------------------------------------------------------
# python -m cifar_exp.rerun


def rerun_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m cifar_exp.rerun",
                description="Train a logged trial again from its seed and recorded configuration, into a new "
                            "MLflow run tagged rerun_of, and compare every per-epoch metric with the original.")
    p.add_argument("target", help="a trial's MLflow run id, or a sweep name with --trial N")
    p.add_argument("--trial", type=int, help="trial number in the sweep's study (TARGET is then the sweep name)")
    p.add_argument("--tolerance", type=_tolerance, default=0.0,
                   help="largest allowed |rerun - original| per value (default 0: bit for bit)")
    p.add_argument("--data", help="the data to train on (default: the original's data source); "
                                  "its checksum must be the original's")
    p.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=True,
                   help="deterministic kernels (default on; the original's mode must match to reproduce it)")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help=f"Optuna storage for --trial (default {DEFAULT_STORAGE})")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI),
                   help=f"MLflow tracking URI (default $MLFLOW_TRACKING_URI or {DEFAULT_TRACKING_URI})")
    return p


def _existing_store(tracking_uri: str) -> None:
    if tracking_uri.startswith("sqlite:///"):
        path = tracking_uri.removeprefix("sqlite:///")
        if not os.path.isfile(path):
            raise UserError(f"no MLflow store at {path}: run a sweep first, or pass --tracking-uri")


@_entry_point
def rerun_main(argv: Sequence[str] | None = None) -> int:
    args = rerun_parser().parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep the output a report
    try:
        _existing_store(args.tracking_uri)
        from cifar_exp import reproduce, track  # no keras yet: the original decides the backend

        run_id = args.target
        if args.trial is not None:
            run_id = reproduce.find_trial_run(args.storage, args.target, args.trial)
        track.configure(args.tracking_uri)
        original = reproduce.load_original(run_id)
        # The original's backend unless the user chose one: another backend gives other numbers.
        os.environ.setdefault("KERAS_BACKEND", original.run.tags.get("keras_backend", "tensorflow"))
        set_environment(args.deterministic)
        from cifar_exp import backend, data

        source = args.data if args.data is not None else original.sweep.data.source
        dataset = data.load(source)
        reproduce.check_data(original, source, dataset.checksum)  # before anything is written
        splits = data.split(dataset, original.sweep.data.validation_fraction, original.sweep.sampler.seed,
                            original.sweep.data.train_images)
        backend.use_deterministic_ops(args.deterministic)
        identity = backend.identity()
    except UserError as exc:
        _error(exc)
        return 2
    except KeyboardInterrupt:
        return 130
    epochs = original.sweep.epochs if original.state == "COMPLETE" else original.epochs_logged
    print(f"rerun of trial {original.trial_number} of sweep {original.sweep.name} (run {original.run.run_id}, "
          f"{original.state}): {epochs} of {original.sweep.epochs} epochs, seed {original.seed}, "
          f"deterministic kernels {'on' if args.deterministic else 'off'}")
    for line in reproduce.differences(original, identity, args.deterministic):
        print(f"  differs from the original: {line}")
    command = shlex.join(["python", "-m", "cifar_exp.rerun", *(argv if argv is not None else sys.argv[1:])])
    try:
        outcome = reproduce.rerun(original, splits, identity=identity, deterministic=args.deterministic,
                                  tags={"command": command})
    except KeyboardInterrupt:
        print("interrupted: the rerun's run is marked KILLED", file=sys.stderr)
        return 130
    comparison = reproduce.compare(original, outcome, args.tolerance)
    reproduce.finish(outcome, comparison)
    _print_comparison(comparison)
    print(f"rerun logged as run {outcome.run_id} (tag rerun_of={original.run.run_id})")
    if not comparison.matched:
        print(f"error: the rerun does not reproduce run {original.run.run_id}: "
              f"{comparison.failure or f'{comparison.mismatches} values differ by more than {args.tolerance}'}",
              file=sys.stderr)
        return 1
    return 0


def _diff(pair: tuple[float, float | None]) -> str:
    from cifar_exp.reproduce import same

    before, after = pair
    if after is None:
        return "missing"
    return "=" if same(before, after) else f"{after - before:+.3g}"


def _print_comparison(comparison: Any) -> None:
    """A line per epoch: '=' where the rerun's value is bit-identical, else rerun - original."""
    width = max([12, *(len(m) + 2 for m in comparison.metrics)])
    print("epoch" + "".join(f"{m:>{width}}" for m in comparison.metrics))
    for epoch, row in enumerate(comparison.epochs, 1):
        print(f"{epoch:>5}" + "".join(f"{_diff(row[m]) if m in row else '':>{width}}" for m in comparison.metrics))
    if comparison.test:
        shown = [k for k in ("test_loss", "test_accuracy", "test_macro_f1", "param_count") if k in comparison.test]
        print("test  " + "  ".join(f"{k} {_diff(comparison.test[k])}" for k in shown))
        others = [k for k in comparison.test if k not in shown]
        differing = [f"{k} {_diff(comparison.test[k])}" for k in others if _diff(comparison.test[k]) != "="]
        if others:
            print(f"      {len(others) - len(differing)} of {len(others)} per-class test metrics identical"
                  + (f"; {', '.join(differing)}" if differing else ""))
    total = len(comparison.values())
    if comparison.matched and comparison.max_abs_diff == 0:
        print(f"identical: all {total} values match the original bit for bit")
    elif comparison.matched:
        print(f"within tolerance: all {total} values within {comparison.tolerance} "
              f"(largest difference {comparison.max_abs_diff:.3g})")
    else:
        print(f"differs: {comparison.mismatches} of {total} values differ by more than {comparison.tolerance} "
              f"(largest difference {comparison.max_abs_diff:.3g})")


# ---------------------------------------------------------------------------------------------
# python -m cifar_exp.register / predict / evaluate

DEFAULT_MODEL = "models:/cifar10-lr_dropout@champion"


def _tracking_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI),
                   help=f"MLflow tracking and registry URI (default $MLFLOW_TRACKING_URI or {DEFAULT_TRACKING_URI})")


def _study_arguments(p: argparse.ArgumentParser) -> None:
    """What the commands that read a finished study take: its sweep, and where study and runs are."""
    p.add_argument("name", help="sweep name or path to its .yaml file")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help=f"Optuna storage (default {DEFAULT_STORAGE})")
    _tracking_argument(p)


def _open_store(tracking_uri: str, deterministic: bool) -> None:
    """The preamble of the commands that read a store: the store must exist; then the environment
    (before keras is imported) and the tracking URI."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep the output a report
    _existing_store(tracking_uri)
    set_environment(deterministic)
    from cifar_exp import track

    track.configure(tracking_uri)


def _register(sweep: Any, storage_url: str, data_source: str | None) -> None:
    """Register the study's best model and promote it; prints what happened (the sweep has
    set up the environment and the tracking store)."""
    from cifar_exp import data, registry, track
    from cifar_exp.study import load_existing

    trials = load_existing(storage_url, sweep.name).get_trials(deepcopy=False)
    best = registry.best_trial(trials, sweep.objective.direction == "maximize")
    if data_source is None:  # the data the trial trained on, which --data may have overridden
        data_source = track.get_run(best.user_attrs["mlflow_run_id"]).tags.get("data_source", sweep.data.source)
    test = data.load(data_source)
    promotion = registry.promote(sweep, sweep.model_name, trials, test)
    version = promotion.version
    print(f"{'registered' if version.created else 'already registered:'} {version.name} version {version.version} "
          f"(trial {promotion.trial.number}, run {version.run_id}); alias {registry.CHALLENGER} -> "
          f"version {version.version}")
    if promotion.promoted:
        print(f"alias {registry.CHAMPION} -> version {version.version}: {promotion.reason}")
    else:
        print(f"not promoted to {registry.CHAMPION}: {promotion.reason}")
    print(f"load it with mlflow.pyfunc.load_model('models:/{version.name}@{registry.CHAMPION}')")


@_entry_point
def register_main(argv: Sequence[str] | None = None) -> int:
    p = _Parser(prog="python -m cifar_exp.register",
                description="Register the best completed trial of a sweep's study in the MLflow Model Registry "
                            "(alias challenger) and promote it to champion if it beats the champion on the test set.")
    _study_arguments(p)
    p.add_argument("--data", help="the test data to compare on (default: what the best trial trained on)")
    args = p.parse_args(argv)
    try:
        sweep = load_sweep(args.name)
        _open_store(args.tracking_uri, sweep.deterministic)
        _register(sweep, args.storage, args.data)
    except UserError as exc:
        _error(exc)
        return 2
    return 0


@_entry_point
def report_main(argv: Sequence[str] | None = None) -> int:
    p = _Parser(prog="python -m cifar_exp.report",
                description="Rebuild a study's plots, trials table and cost ledger in its MLflow parent run, from "
                            "storage, without training.")
    _study_arguments(p)
    args = p.parse_args(argv)
    try:
        sweep = load_sweep(args.name)
        _open_store(args.tracking_uri, sweep.deterministic)
        from cifar_exp import study, track

        found = study.load_existing(args.storage, sweep.name)
        parent = found.user_attrs.get("mlflow_parent_run_id")
        if not parent:
            raise UserError(f"study '{sweep.name}' has no MLflow parent run yet: run the sweep first")
        try:  # the epoch budget the study ran with (a --epochs override is on the parent run)
            sweep = dataclasses.replace(sweep, epochs=int(track.get_run(parent).tags.get("epochs", sweep.epochs)))
        except LookupError:
            raise UserError(f"the parent run {parent} of study '{sweep.name}' is not in {args.tracking_uri}: "
                            f"pass the --tracking-uri the sweep used") from None
        skipped = study.publish(found, parent, sweep)
    except UserError as exc:
        _error(exc)
        return 2
    print(f"study '{sweep.name}': {len(found.trials)} trials; report rebuilt in parent run {parent}: "
          f"report.html, trials.csv, trials.html, cost.json and the plots")
    for name, why in skipped.items():
        print(f"  {name} not drawn: {why}")
    return 0


@_entry_point
def ui_main(argv: Sequence[str] | None = None) -> int:
    p = _Parser(prog="python -m cifar_exp.ui",
                description="Start the MLflow UI on this project's store, bound to 127.0.0.1 unless told otherwise.")
    p.add_argument("name", nargs="?", help="a sweep: also print the address of its experiment")
    p.add_argument("--port", type=_number(int, "--port", lambda v: 0 < v < 65536, "in 1..65535"), default=5000,
                   help="port (default 5000)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; see README before exposing it)")
    _tracking_argument(p)
    args = p.parse_args(argv)
    try:
        _existing_store(args.tracking_uri)
        from cifar_exp import track

        track.configure(args.tracking_uri)
        address = f"http://{args.host}:{args.port}"
        experiment = None
        if args.name:
            experiment = track.find_experiment(load_sweep(args.name).name)
            if experiment is None:
                raise UserError(f"no experiment '{args.name}' in {args.tracking_uri}: run the sweep first")
    except UserError as exc:
        _error(exc)
        return 2
    print(f"MLflow UI on {mask_credentials(args.tracking_uri)}: {address}", flush=True)
    if experiment is not None:
        print(f"experiment {args.name}: {address}/#/experiments/{experiment}", flush=True)
    # The server replaces this process: Ctrl-C and signals reach it directly, no orphan is left.
    # MLflow accepts state changes from every localhost origin: any other program's page on this
    # machine could change the store. Our app (track.create_ui_app) lets only the UI's own pages.
    origins = {address, f"http://localhost:{args.port}", f"http://127.0.0.1:{args.port}"}
    os.environ[track.UI_ORIGINS_ENV] = ",".join(sorted(origins))
    os.execv(sys.executable, [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", args.tracking_uri,
                              "--host", args.host, "--port", str(args.port), "--app-name", "cifar-exp-ui"])
    return 0  # not reached


@_entry_point
def compare_main(argv: Sequence[str] | None = None) -> int:
    p = _Parser(prog="python -m cifar_exp.compare",
                description="The best trials of a sweep as a table, and one PNG overlaying their validation curves.")
    _study_arguments(p)
    p.add_argument("--top", type=_positive(int, "--top"), default=5, help="how many trials (default 5)")
    p.add_argument("--out", help="the PNG to write (default mlruns/NAME-top-K.png, beside the store)")
    args = p.parse_args(argv)
    try:
        sweep = load_sweep(args.name)
        _existing_store(args.tracking_uri)
        from cifar_exp import plots, study, track

        track.configure(args.tracking_uri)
        best = study.best_trials(study.load_existing(args.storage, sweep.name), args.top)
        if not best:
            raise UserError(f"study '{sweep.name}' has no complete trial yet")
    except UserError as exc:
        _error(exc)
        return 2
    metric = sweep.objective.metric
    names = sorted({key for t in best for key in t.params})
    header = ["rank", "trial", metric, "test_accuracy", "epochs", "seconds", *names]
    rows = []
    curves = {}
    for rank, t in enumerate(best, 1):
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else float("nan")
        test = t.user_attrs.get("test_accuracy", float("nan"))
        rows.append([str(rank), str(t.number), f"{t.value:.4f}", f"{test:.4f}", str(t.user_attrs.get("epochs_run", "")),
                     f"{seconds:.1f}", *(_fmt(t.params[n]) if n in t.params else "-" for n in names)])
        run_id = t.user_attrs.get("mlflow_run_id")
        if run_id:
            curves[f"trial {t.number}"] = track.metric_history(run_id, metric)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    for line in (header, *rows):
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)))
    out = args.out or str(DEFAULT_STORE / f"{sweep.name}-top-{args.top}.png")  # nothing lands in a checkout
    plots.curves_png(curves, metric, out, f"{sweep.name}: {metric} of the {len(best)} best trials")
    print(f"wrote {out}")
    return 0


@_entry_point
def predict_main(argv: Sequence[str] | None = None) -> int:
    p = _Parser(prog="python -m cifar_exp.predict",
                description="Top-k classes with probabilities for image files (any size; resized to the model's "
                            "input), from a logged or registered model.")
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model URI (default {DEFAULT_MODEL})")
    p.add_argument("--top-k", type=_positive(int, "--top-k"), default=3, help="classes per image (default 3)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _tracking_argument(p)
    args = p.parse_args(argv)
    try:
        _open_store(args.tracking_uri, deterministic=False)
        from cifar_exp import registry

        model, names = registry.load(args.model)
        images = registry.read_images(args.images, tuple(model.input_shape[1:3]))
        ranked = registry.top_k(registry.probabilities(model, images), names, args.top_k)
    except UserError as exc:
        _error(exc)
        return 2
    if args.json:
        import json

        print(json.dumps([{"image": image, "predictions": [{"class": c, "probability": p} for c, p in top]}
                          for image, top in zip(args.images, ranked, strict=True)], indent=2))
        return 0
    width = max(len("image"), *(len(i) for i in args.images))
    print(f"{'image':<{width}}  {'rank':>4}  {'class':<12} probability")
    for image, top in zip(args.images, ranked, strict=True):
        for rank, (name, prob) in enumerate(top, 1):
            print(f"{image if rank == 1 else '':<{width}}  {rank:>4}  {name:<12} {prob:.4f}")
    return 0


@_entry_point
def evaluate_main(argv: Sequence[str] | None = None) -> int:
    p = _Parser(prog="python -m cifar_exp.evaluate",
                description="Evaluate a logged or registered model on the test set in a fresh MLflow run, with "
                            "the artifacts of a trial (confusion matrix, classification report, prediction grid).")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"model URI (default {DEFAULT_MODEL})")
    p.add_argument("--data", help="test data (default: the data the model's run trained on)")
    _tracking_argument(p)
    args = p.parse_args(argv)
    try:
        _open_store(args.tracking_uri, deterministic=False)
        from cifar_exp import data, registry, track

        try:
            source_run = track.model_run_id(args.model)
        except Exception as exc:
            raise UserError(f"cannot find {args.model}: {str(exc).splitlines()[0]}") from None
        run = track.get_run(source_run) if source_run else None
        source = args.data or (run.tags.get("data_source") if run else None) or "keras"
        test = data.load(source)
        experiment = run.experiment_id if run else track.experiment_id("evaluations")
        run_id, metrics = registry.evaluate(args.model, test, experiment, {
            "source_run_id": source_run or "", "data_source": source, "data_checksum": test.checksum})
    except UserError as exc:
        _error(exc)
        return 2
    print(f"{args.model} on {len(test.y_test)} test images of {source}: test_accuracy {metrics['test_accuracy']:.4f}"
          f", test_loss {metrics['test_loss']:.4f}, test_macro_f1 {metrics['test_macro_f1']:.4f}")
    print(f"evaluation run {run_id} (experiment {experiment}): confusion_matrix.png, classification_report.json, "
          f"prediction_grid.png")
    return 0
