"""``cifar-exp rerun RUN_ID`` (or ``NAME --trial N``): train a logged trial again and compare it with
the original."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Mapping

from cifar_exp.cli import arguments
from cifar_exp.cli.environment import existing_store, quiet_keras, set_environment
from cifar_exp.cli.progress import print_comparison
from cifar_exp.config import DEFAULT_STORAGE

DESCRIPTION = ("Train a logged trial again from its seed and recorded configuration, into a new MLflow run "
               "tagged rerun_of, and compare every per-epoch metric with the original.")
SUMMARY = "train a logged trial again and compare it"  # its line in cifar-exp --help


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="a trial's MLflow run id, or a sweep name with --trial N")
    p.add_argument("--trial", type=int, help="trial number in the sweep's study (TARGET is then the sweep name)")
    p.add_argument("--tolerance", default=0.0,
                   type=arguments.number(float, "--tolerance", lambda v: v >= 0, "0 or more"),
                   help="largest allowed |rerun - original| per value (default 0: bit for bit)")
    p.add_argument("--data", help="the data to train on (default: the original's data source); "
                                  "its checksum must be the original's")
    p.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=True,
                   help="deterministic kernels (default on; the original's mode must match to reproduce it)")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help=f"Optuna storage for --trial (default {DEFAULT_STORAGE})")
    arguments.tracking(p)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep the output a report
    existing_store(args.tracking_uri)
    from cifar_exp import rerun, track  # no keras yet: the original decides the backend

    # The study first: a missing storage or trial is refused before the MLflow store is touched.
    run_id = args.target if args.trial is None else rerun.find_trial_run(args.storage, args.target, args.trial)
    track.configure(args.tracking_uri)
    original = rerun.load_original(run_id)
    # The original's backend unless the user chose one: another backend gives other numbers.
    os.environ.setdefault("KERAS_BACKEND", original.run.tags.get("keras_backend", "tensorflow"))
    set_environment(args.deterministic)
    quiet_keras(args.storage, original.sweep.name)

    epochs = [0]

    def started(start: rerun.Start) -> None:
        epochs[0] = start.epochs
        print(f"rerun of trial {original.trial_number} of sweep {original.sweep.name} (run {original.run.run_id}, "
              f"{original.state}): {start.epochs} of {original.sweep.epochs} epochs, seed {original.seed}, "
              f"deterministic kernels {'on' if args.deterministic else 'off'}", flush=True)
        for line in start.differences:
            print(f"  differs from the original: {line}", flush=True)

    def epoch_done(epoch: int, logs: Mapping[str, float]) -> None:
        """Each epoch as it finishes, beside the original's value (a rerun takes as long as the trial)."""
        metric = original.sweep.objective.metric
        before = original.history.get(metric, [])
        value = logs.get(metric)
        seconds = f" ({logs['epoch_seconds']:.1f} s)" if "epoch_seconds" in logs else ""
        if value is None:
            return
        against = "" if epoch >= len(before) else \
            " (the original's, bit for bit)" if rerun.same(before[epoch], value) else f" (original {before[epoch]:.4f})"
        print(f"  epoch {epoch + 1}/{epochs[0]} {metric}={value:.4f}{seconds}{against}", flush=True)

    try:
        outcome, comparison = rerun.reproduce(
            original, args.data if args.data is not None else original.sweep.data.source,
            deterministic=args.deterministic, tolerance=args.tolerance,
            tags={"command": shlex.join(args.command_line)}, on_start=started, on_epoch=epoch_done)
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
