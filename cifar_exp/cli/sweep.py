"""``cifar-exp sweep NAME`` (and ``python -m cifar_exp.sweep NAME``, the main job): check the input,
then run or resume the study with its workers and print their progress and the final table. This
process never imports Keras: the workers train."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from cifar_exp import cluster
from cifar_exp.cli import arguments
from cifar_exp.cli.environment import library_log, provenance, quiet_keras, set_environment
from cifar_exp.cli.gc import print_collected
from cifar_exp.cli.progress import Progress, fmt, print_summary
from cifar_exp.cli.register import print_registered
from cifar_exp.cli.register import say as say_now
from cifar_exp.config import (
    DEFAULT_STORAGE,
    DEFAULT_TRACKING_URI,
    ConfigError,
    Settings,
    Sweep,
    UserError,
    mask_credentials,
)
from cifar_exp.config.goals import WarmStart
from cifar_exp.config.records import StudyAttrs
from cifar_exp.config.sweepfile import TOP_LEVEL_RANGES, available_sweeps, load_sweep
from cifar_exp.config.values import check_range

DESCRIPTION = "Run (or resume) the Optuna study of a sweep; every trial is an MLflow run."
SUMMARY = "run or resume a sweep"  # its line in cifar-exp --help


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="sweep name (see --list) or path to a sweep .yaml file")
    p.add_argument("--list", action="store_true", help="list the sweeps and exit")
    p.add_argument("--trials", type=arguments.positive(int, "--trials"), help="trial budget of the study")
    p.add_argument("--epochs", type=arguments.positive(int, "--epochs"), help="epochs per trial")
    p.add_argument("--timeout", type=arguments.positive(float, "--timeout"), help="seconds; no trial starts after")
    p.add_argument("--warm-start", metavar="OTHER[:K]",
                   help="start with the K (default 5) best trials of the sweep OTHER's study (same storage)")
    p.add_argument("--seed", type=arguments.number(int, "--seed", lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
                   help="the sweep seed (sampler, trial seeds, validation split)")
    p.add_argument("--data", help="'keras', a cifar-10-python.tar.gz, cifar-10-batches-py/, "
                                  "or an image-folder tree or .zip (train/<class>/, test/<class>/)")
    p.add_argument("--train-images", type=arguments.positive(int, "--train-images"),
                   help="train on a class-balanced, seeded subset of this many training images (a quick look)")
    p.add_argument("--study", metavar="STUDY",
                   help="start or resume the study STUDY (its experiment and registered model too) instead of "
                        "the sweep's own name, e.g. a quick look beside the real sweep")
    arguments.storage(p)
    arguments.tracking(p)
    p.add_argument("--workers", type=arguments.positive(int, "--workers"), default=1,
                   help="worker processes sharing the study (default 1)")
    p.add_argument("--gpus", type=arguments.gpus, default=(),
                   help="GPU indices, e.g. 0,1: worker i sees only GPU i mod count (CUDA_VISIBLE_DEVICES; "
                        "where a scheduler set it, indices into its GPUs)")
    p.add_argument("--checkpoint-dir", metavar="DIR",
                   help="keep the running trials' per-epoch checkpoints in DIR (default beside the storage); "
                        "on a folder every node shares, a trial stopped on one node resumes on another")
    p.add_argument("--engine", choices=("optuna", "keras-tuner"), default="optuna",
                   help="search with Optuna (default) or with KerasTuner's own tuners, tracked the same way")
    p.add_argument("--register", action="store_true",
                   help="when the sweep ends, register its best model (as the register command)")
    loudness = p.add_mutually_exclusive_group()
    loudness.add_argument("-q", "--quiet", action="store_true", help="print only the final table and errors")
    loudness.add_argument("-v", "--verbose", action="store_true",
                          help="show the libraries' log lines here instead of in mlruns/logs/NAME.log")


def run(args: argparse.Namespace) -> int:
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
    track.server.check_server(args.tracking_uri)
    mismatch = track.server.version_mismatch(args.tracking_uri)
    if mismatch:
        print(f"warning: {mismatch}", file=sys.stderr, flush=True)
    if "://" in args.storage:
        storage.open_storage(args.storage)
    _check_warm_start(chosen, args.storage)
    def carve(dataset: data.Cifar10) -> data.Splits:  # refused before the data cache is written
        return data.splits(chosen, dataset)

    if not args.quiet:  # before the download, which can take minutes or fail offline
        print(f"data: {_data_origin(chosen.data.source)}", flush=True)
    dataset = data.load(chosen.data.source, check=carve)
    splits = carve(dataset)
    tags = {"data_source": chosen.data.source, "data_checksum": dataset.checksum,
            "command": shlex.join(args.command_line), "keras_backend": os.environ["KERAS_BACKEND"], **provenance()}
    sizes = f"{len(splits.y_train)} training / {len(splits.y_val)} validation / {len(splits.y_test)} test images"
    settings = Settings(sweep=chosen, storage=args.storage, tracking_uri=args.tracking_uri,
                                workers=args.workers, gpus=args.gpus, tags=tags, data_checksum=dataset.checksum,
                                checkpoint_dir=os.path.abspath(args.checkpoint_dir) if args.checkpoint_dir else "")
    del dataset, splits  # the workers load their own copy; the parent keeps no arrays
    if args.engine == "keras-tuner":
        return _keras_tuner(settings, args)
    if not args.verbose:
        settings = dataclasses.replace(settings, log_file=str(library_log(args.storage, chosen.name)))
    return _optuna(settings, args, sizes)


LIST_WIDTH = 100  # characters of a line of sweep --list


def _headline(description: str) -> str:
    """A sweep description's first sentence, on one line."""
    return " ".join(description.split()).split(". ")[0].rstrip(".")


def _list_sweeps() -> int:
    """A line per sweep: its name and its description's first sentence, cut at a word to fit."""
    for name, path in available_sweeps().items():
        try:
            first = _headline(load_sweep(str(path)).description)
        except UserError as exc:
            first = f"(invalid: {exc})"
        room = LIST_WIDTH - 21
        if len(first) > room:
            first = first[:room - 3].rsplit(" ", 1)[0]
            if first.count("(") > first.count(")"):  # never cut inside a parenthesis
                first = first[:first.rindex("(")]
            first = first.rstrip(" ,;:") + "..."
        print(f"{name:<20} {first}")
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


def _check_machine(args: argparse.Namespace) -> None:
    """``ConfigError`` if this machine cannot run what the flags ask: the workers (memory, cores),
    the GPUs (a scheduler's assignment wins), the checkpoint folder."""
    check_workers(args.workers)
    try:
        cluster.check_gpus(args.gpus)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if args.checkpoint_dir is not None and not Path(args.checkpoint_dir).is_dir():
        raise ConfigError(f"--checkpoint-dir {args.checkpoint_dir}: no such folder: create it (on a cluster, on a "
                          f"file system every node mounts)")


def _with_overrides(args: argparse.Namespace) -> Sweep:
    """The sweep named on the command line, with the flags that override its file."""
    _check_machine(args)
    if args.engine == "keras-tuner" and args.workers != 1:
        raise ConfigError("--engine keras-tuner runs its trials one after another in this process: drop --workers")
    if args.engine == "keras-tuner" and args.register:
        raise ConfigError("--register reads the Optuna study: register after an Optuna sweep, or pass a "
                          "model URI to the evaluate command")
    sweep = load_sweep(args.name, args.study)
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


def _optuna(settings: Any, args: argparse.Namespace, sizes: str) -> int:
    """The Optuna engine: the header, the workers' progress, the final table, the exit code."""
    import optuna

    from cifar_exp import track
    from cifar_exp.sweep import storage, supervisor

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # we print our own progress
    chosen = settings.sweep
    tally = supervisor.tally(storage.create_study(settings), settings.sweep)
    say = (lambda *a, **k: None) if args.quiet else print
    named = f" (study {chosen.name})" if chosen.path.stem != chosen.name else ""
    say(f"sweep {chosen.path.stem}{named}: {_headline(chosen.description)}")
    say(f"study '{chosen.name}' in {mask_credentials(args.storage)}: {tally.finished} trials finished before; "
        f"budget {chosen.trials if chosen.trials else 'none'} trials, "
        f"{chosen.epochs} epochs each on {sizes}, {args.workers} worker(s), seed {chosen.sampler.seed}, "
        f"deterministic kernels {'on' if chosen.deterministic else 'off'}; "
        f"tracking {mask_credentials(args.tracking_uri)}", flush=True)
    if settings.log_file:
        say(f"library log lines (TensorFlow, MLflow, Optuna): {settings.log_file} (-v shows them here)", flush=True)
    say(f"live view: {_dashboard_command(args)}", flush=True)
    progress = Progress(chosen.objective.metric, chosen.trials, workers=args.workers, quiet=args.quiet)
    try:
        summary = supervisor.run_sweep(settings, progress)
    except KeyboardInterrupt:  # Ctrl-C before the workers started: nothing ran yet
        print("interrupted before any trial started", file=sys.stderr)
        return 130
    print_summary(summary, chosen, track.ui.ui_command(args.tracking_uri, args.name, args.study, DEFAULT_TRACKING_URI))
    if summary.interrupted:
        print("interrupted: run the same command to resume the sweep", file=sys.stderr)
        return 130
    if summary.stop_reason:
        print(f"error: {summary.stop_reason}", file=sys.stderr)
        return 1
    from cifar_exp.registry import study

    if args.register:
        quiet_keras(args.storage, chosen.name)  # the registration loads the data and the model: Keras
        done = study.register_best(chosen, args.storage, args.data, seeds=chosen.confirm_seeds, say=say_now)
        print_registered(done, chosen, None)
    if chosen.keep_models is not None:  # after registering: a new version's model is kept
        print_collected(chosen.name, chosen.keep_models,
                        study.collect_models(chosen, args.storage, chosen.keep_models, say_now))
    return 0


def _data_origin(source: str) -> str:
    """Where the sweep's images come from, in words."""
    if source == "keras":
        return ("CIFAR-10 through Keras (keras.datasets.cifar10: downloaded once from cs.toronto.edu into "
                "~/.keras/datasets; offline, give --data a local copy, see README)")
    return f"CIFAR-10 from {source}"


def _dashboard_command(args: argparse.Namespace) -> str:
    """The ``cifar-exp dashboard`` command of this sweep's study, as the user would type it."""
    words = ["cifar-exp", "dashboard", args.name, *(["--study", args.study] if args.study else []),
             *(["--storage", mask_credentials(args.storage)] if args.storage != DEFAULT_STORAGE else [])]
    return shlex.join(words)


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


def _keras_tuner(settings: Any, args: argparse.Namespace) -> int:
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
    from cifar_exp import track

    command = track.ui.ui_command(settings.tracking_uri, args.name, args.study, DEFAULT_TRACKING_URI)
    print(f"open the MLflow UI: {mask_credentials(command)} "
          f"(experiment {outcome.experiment_id}; runs tagged engine=keras-tuner)")
    return 0
