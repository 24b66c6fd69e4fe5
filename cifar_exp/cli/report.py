"""``cifar-exp report NAME``: rebuild a study's plots, trials table and cost ledger in its parent run."""

from __future__ import annotations

import argparse
import dataclasses

from cifar_exp.cli import arguments
from cifar_exp.cli.environment import open_store
from cifar_exp.config import UserError
from cifar_exp.config.records import StudyAttrs
from cifar_exp.config.sweepfile import load_sweep

DESCRIPTION = ("Rebuild a study's plots, trials table and cost ledger in its MLflow parent run, from storage, "
               "without training.")
SUMMARY = "rebuild a study's report"  # its line in cifar-exp --help


def add_arguments(p: argparse.ArgumentParser) -> None:
    arguments.study(p)


def run(args: argparse.Namespace) -> int:
    chosen = load_sweep(args.name, args.study)
    open_store(args.tracking_uri, chosen.deterministic)
    from cifar_exp import report, track
    from cifar_exp.sweep import storage, supervisor

    found = storage.load_existing(args.storage, chosen.name)
    parent = StudyAttrs.of(found).mlflow_parent_run_id
    if not parent:
        raise UserError(f"study '{chosen.name}' has no MLflow parent run yet: run the sweep first")
    try:  # the epoch budget the study ran with (a --epochs override is on the parent run)
        chosen = dataclasses.replace(chosen, epochs=int(track.get_run(parent).tags.get("epochs", chosen.epochs)))
    except LookupError:
        raise UserError(f"the parent run {parent} of study '{chosen.name}' is not in {args.tracking_uri}: "
                        f"pass the --tracking-uri the sweep used") from None
    skipped = supervisor.publish(found, parent, chosen)
    print(f"study '{chosen.name}': {report.plural(len(found.trials), 'trial')}; report rebuilt in parent run {parent}: "
          f"report.html, trials.csv, trials.html, cost.json and the plots")
    for name, why in skipped.items():
        print(f"  {name} not drawn: {why}")
    return 0
