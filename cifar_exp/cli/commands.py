"""What each command does with its parsed arguments (``cli`` parses them and is the error
boundary): the environment (set before anything imports Keras), the calls into the core modules,
and what the terminal shows. A command returns its exit code or raises ``UserError``.

The sweep command's process never imports Keras: it checks the input, then follows the workers.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from cifar_exp.cli.environment import existing_store, library_log, provenance, quiet_keras, set_environment
from cifar_exp.cli.progress import Progress, fmt, print_comparison, print_summary
from cifar_exp.config import ConfigError, Settings, Sweep, UserError, mask_credentials
from cifar_exp.config.goals import WarmStart
from cifar_exp.config.records import StudyAttrs
from cifar_exp.config.sweepfile import TOP_LEVEL_RANGES, available_sweeps, load_sweep
from cifar_exp.config.values import check_range

# ---------------------------------------------------------------------------------------------
# sweep


def _list_sweeps() -> int:
    for name, path in available_sweeps().items():
        try:
            description = load_sweep(str(path)).description.strip().splitlines()[0]
        except (UserError, IndexError) as exc:
            description = f"(invalid: {exc})" if isinstance(exc, UserError) else ""
        print(f"{name:<20} {description}")
    return 0


# A worker's peak resident memory: 1.47 GB training the seed CNN under TensorFlow on a 400-image
# slice (2-core CPU machine, `cifar-exp sweep lr_dropout --workers 2`, ps every second); the whole
# data set adds its 180 MB of arrays.
WORKER_MEMORY_BYTES = 1_700_000_000


def check_workers(workers: int) -> None:
    """``ConfigError`` if this machine cannot hold ``workers`` worker processes: one CPU core each
    (this process's affinity), and ``WORKER_MEMORY_BYTES`` each of the memory available now."""
    import psutil

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if workers > cores:
        raise ConfigError(f"--workers {workers}: this machine gives the sweep {cores} CPU core(s), and each worker "
                          f"process needs one to train: give --workers {cores} or fewer")
    available = psutil.virtual_memory().available
    if workers > 1 and workers * WORKER_MEMORY_BYTES > available:  # one worker always gets its try
        fits = max(1, available // WORKER_MEMORY_BYTES)
        raise ConfigError(f"--workers {workers}: each worker takes about {WORKER_MEMORY_BYTES / 1e9:.1f} GB and "
                          f"{available / 1e9:.1f} GB of memory is available: give --workers {fits} or fewer")


def _with_overrides(args: argparse.Namespace) -> Sweep:
    """The sweep named on the command line, with the flags that override its file."""
    check_workers(args.workers)
    if args.engine == "keras-tuner" and args.workers != 1:
        raise ConfigError("--engine keras-tuner runs its trials one after another in this process: drop --workers")
    if args.engine == "keras-tuner" and args.register:
        raise ConfigError("--register reads the Optuna study: register after an Optuna sweep, or pass a "
                          "model URI to the evaluate command")
    sweep = load_sweep(args.name)
    if args.engine == "keras-tuner" and (len(sweep.objectives) > 1 or sweep.constraints):
        raise ConfigError(f"{sweep.path}: KerasTuner's tuners take one objective and no constraints: "
                          f"run this sweep with --engine optuna")
    if args.engine == "keras-tuner" and sweep.keep_models is not None:
        raise ConfigError(f"{sweep.path}: keep_models reads the Optuna study, which --engine keras-tuner does not "
                          f"write: run this sweep with --engine optuna, or drop keep_models")
    changes: dict[str, Any] = {key: getattr(args, key) for key in ("trials", "epochs", "timeout")
                               if getattr(args, key) is not None}
    for key, value in changes.items():  # the sweep file's own bounds
        check_range(value, TOP_LEVEL_RANGES[key], f"--{key}")
    if args.data is not None:
        changes["data"] = dataclasses.replace(sweep.data, source=args.data)
    if args.train_images is not None:
        changes["data"] = dataclasses.replace(changes.get("data", sweep.data), train_images=args.train_images)
    if args.seed is not None:
        changes["sampler"] = dataclasses.replace(sweep.sampler, seed=args.seed)
    if args.warm_start is not None:
        other, _, top = args.warm_start.partition(":")
        if not other.strip() or other == sweep.name or (top and not (top.isascii() and top.isdigit()
                                                                     and 1 <= int(top) <= 1000)):
            raise ConfigError(f"--warm-start {args.warm_start}: give OTHER or OTHER:K, another sweep's name and "
                              f"K in 1..1000 (e.g. --warm-start lr_dropout:5)")
        changes["warm_start"] = WarmStart(other, int(top) if top else 5)
    return dataclasses.replace(sweep, **changes)


def sweep_command(args: argparse.Namespace) -> int:
    if args.list:
        return _list_sweeps()
    if not args.name:
        raise ConfigError(f"name a sweep: python -m cifar_exp.sweep NAME (available: {', '.join(available_sweeps())})")
    chosen = _with_overrides(args)
    set_environment(chosen.deterministic)
    _check_hypermodel(chosen.hypermodel)
    from cifar_exp import data, track
    from cifar_exp.sweep import storage

    # Bad input fails here, before anything is written: the servers first (they write nothing
    # when checked), then the data (whose cache is the first write).
    track.check_server(args.tracking_uri)
    if "://" in args.storage:
        storage.open_storage(args.storage)
    _check_warm_start(chosen, args.storage)
    def carve(dataset: data.Cifar10) -> data.Splits:  # refused before the data cache is written
        return data.splits(chosen, dataset)

    dataset = data.load(chosen.data.source, check=carve)
    splits = carve(dataset)
    tags = {"data_source": chosen.data.source, "data_checksum": dataset.checksum,
            "command": shlex.join(args.command_line), "keras_backend": os.environ["KERAS_BACKEND"], **provenance()}
    sizes = f"{len(splits.y_train)} training / {len(splits.y_val)} validation / {len(splits.y_test)} test images"
    settings = Settings(sweep=chosen, storage=args.storage, tracking_uri=args.tracking_uri,
                                workers=args.workers, gpus=args.gpus, tags=tags, data_checksum=dataset.checksum)
    del dataset, splits  # the workers load their own copy; the parent keeps no arrays
    if args.engine == "keras-tuner":
        return _keras_tuner(settings)
    if not args.verbose:
        settings = dataclasses.replace(settings, log_file=str(library_log(args.storage, chosen.name)))
    return _optuna(settings, args, sizes)


def _optuna(settings: Any, args: argparse.Namespace, sizes: str) -> int:
    """The Optuna engine: the header, the workers' progress, the final table, the exit code."""
    import optuna

    from cifar_exp import track
    from cifar_exp.sweep import storage, supervisor

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # we print our own progress
    chosen = settings.sweep
    tally = supervisor.tally(storage.create_study(settings), settings.sweep)
    say = (lambda *a, **k: None) if args.quiet else print
    say(f"sweep {chosen.name}: {chosen.description.strip().splitlines()[0] if chosen.description else ''}")
    say(f"study '{chosen.name}' in {mask_credentials(args.storage)}: {tally.finished} trials finished before; "
        f"budget {chosen.trials if chosen.trials else 'none'} trials, "
        f"{chosen.epochs} epochs each on {sizes}, {args.workers} worker(s), seed {chosen.sampler.seed}, "
        f"deterministic kernels {'on' if chosen.deterministic else 'off'}; "
        f"tracking {mask_credentials(args.tracking_uri)}", flush=True)
    if settings.log_file:
        say(f"library log lines (TensorFlow, MLflow, Optuna): {settings.log_file} (-v shows them here)", flush=True)
    progress = Progress(chosen.objective.metric, chosen.trials, workers=args.workers, quiet=args.quiet)
    try:
        summary = supervisor.run_sweep(settings, progress)
    except KeyboardInterrupt:  # Ctrl-C before the workers started: nothing ran yet
        print("interrupted before any trial started", file=sys.stderr)
        return 130
    print_summary(summary, chosen, track.ui.ui_command(args.tracking_uri))
    if summary.interrupted:
        print("interrupted: run the same command to resume the sweep", file=sys.stderr)
        return 130
    if summary.stop_reason:
        print(f"error: {summary.stop_reason}", file=sys.stderr)
        return 1
    if args.register:
        from cifar_exp.cli.results import register_best

        register_best(chosen, args.storage, args.data, seeds=chosen.confirm_seeds)
    if chosen.keep_models is not None:  # after registering: a new version's model is kept
        from cifar_exp.cli.results import collect_models

        collect_models(chosen, args.storage, chosen.keep_models)
    return 0


def _check_warm_start(sweep: Sweep, url: str) -> None:
    """``UserError`` if the sweep starts warm from a study its storage does not hold (and it has not
    started warm already): decided before a study, the data cache or a run is written."""
    if sweep.warm_start is None:
        return
    import optuna

    from cifar_exp.sweep import storage

    studies = {}
    if "://" in url or Path(url).is_file():
        studies = {s.study_name: s for s in optuna.get_all_study_summaries(storage.open_storage(url))}
    mine = studies.get(sweep.name)
    if sweep.warm_start.sweep in studies or (mine is not None and StudyAttrs.of(mine).warm_started):
        return
    names = ", ".join(n for n in studies if n != sweep.name)
    raise UserError(f"warm_start: no study '{sweep.warm_start.sweep}' in {mask_credentials(url)} (studies: "
                    f"{names or 'none'}): run that sweep first, or name another")


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


def _keras_tuner(settings: Any) -> int:
    """``--engine keras-tuner``: the sweep in this process with KerasTuner (see ``tuner``)."""
    from cifar_exp.sweep import tuner

    chosen = settings.sweep
    print(f"sweep {chosen.name} with KerasTuner: {chosen.epochs} epochs per trial, seed {chosen.sampler.seed}; "
          f"tracking {settings.tracking_uri}", flush=True)
    outcome = tuner.run(settings, Progress(chosen.objective.metric, chosen.trials))
    print(f"{outcome.tuner}: {outcome.counts['COMPLETED']} completed, "
          f"{outcome.counts['FAILED'] + outcome.counts['INVALID']} failed")
    for row in outcome.best:
        params = " ".join(f"{k}={fmt(v)}" for k, v in row["params"].items())
        print(f"  trial {row['trial']}: {chosen.objective.metric}={row['value']:.4f} {params}")
    print(f"open the MLflow UI: mlflow ui --backend-store-uri {mask_credentials(settings.tracking_uri)} "
          f"(experiment {outcome.experiment_id}; runs tagged engine=keras-tuner)")
    return 0


# ---------------------------------------------------------------------------------------------
# rerun


def rerun_command(args: argparse.Namespace) -> int:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep the output a report
    existing_store(args.tracking_uri)
    from cifar_exp import (
        rerun,
        track,  # no keras yet: the original decides the backend
    )

    run_id = args.target
    if args.trial is not None:
        run_id = rerun.find_trial_run(args.storage, args.target, args.trial)
    track.configure(args.tracking_uri)
    original = rerun.load_original(run_id)
    # The original's backend unless the user chose one: another backend gives other numbers.
    os.environ.setdefault("KERAS_BACKEND", original.run.tags.get("keras_backend", "tensorflow"))
    set_environment(args.deterministic)
    quiet_keras(args.storage, original.sweep.name)
    from cifar_exp import data
    from cifar_exp.training import backend

    source = args.data if args.data is not None else original.sweep.data.source
    dataset = data.load(source)
    rerun.check_data(original, source, dataset.checksum)  # before anything is written
    splits = data.splits(original.sweep, dataset)
    backend.use_deterministic_ops(args.deterministic)
    identity = backend.identity()
    epochs = original.sweep.epochs if original.state == "COMPLETE" else original.epochs_logged
    print(f"rerun of trial {original.trial_number} of sweep {original.sweep.name} (run {original.run.run_id}, "
          f"{original.state}): {epochs} of {original.sweep.epochs} epochs, seed {original.seed}, "
          f"deterministic kernels {'on' if args.deterministic else 'off'}")
    for line in rerun.differences(original, identity, args.deterministic):
        print(f"  differs from the original: {line}")
    try:
        outcome, comparison = rerun.rerun(original, splits, identity=identity, deterministic=args.deterministic,
                                          tags={"command": shlex.join(args.command_line)}, tolerance=args.tolerance)
    except KeyboardInterrupt:
        print("interrupted: the rerun's run is marked KILLED", file=sys.stderr)
        return 130
    print_comparison(comparison)
    print(f"rerun logged as run {outcome.run_id} (tag rerun_of={original.run.run_id})")
    if not comparison.matched:
        print(f"error: the rerun does not reproduce run {original.run.run_id}: "
              f"{comparison.failure or f'{comparison.mismatches} values differ by more than {args.tolerance}'}",
              file=sys.stderr)
        return 1
    return 0
