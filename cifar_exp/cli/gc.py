"""``cifar-exp gc NAME``: delete the logged models of all but a study's best trials.
"""

from __future__ import annotations

import argparse

from cifar_exp.cli import arguments
from cifar_exp.cli.environment import (
    cheap_checks,
    existing_store,
)
from cifar_exp.cli.progress import (
    trial_list,
)
from cifar_exp.config import (
    Sweep,
    UserError,
)
from cifar_exp.config.records import StudyAttrs
from cifar_exp.config.sweepfile import load_sweep

DESCRIPTION = ("Delete the logged models of all but the K best trials of a sweep's study (never a registered "
               "version's, never a running trial's) and print the bytes freed; runs, metrics and other artifacts "
               "stay.")
SUMMARY = "delete all but the best trials' models"  # its line in cifar-exp --help


def add_arguments(p: argparse.ArgumentParser) -> None:
    arguments.study(p)
    p.add_argument("--keep", type=arguments.positive(int, "--keep"), metavar="K",
                   help="how many of the best trials keep their models (default: the sweep's keep_models)")


def run(args: argparse.Namespace) -> int:
    chosen = load_sweep(args.name)
    keep = args.keep if args.keep is not None else chosen.keep_models
    if keep is None:
        raise UserError(f"gc {chosen.name}: give --keep K (how many of the best trials keep their models), or set "
                        f"keep_models: in {chosen.path}")
    existing_store(args.tracking_uri)
    cheap_checks(args.storage)
    from cifar_exp import track

    track.configure(args.tracking_uri)
    collect_models(chosen, args.storage, keep)
    return 0


def collect_models(chosen: Sweep, storage_url: str, keep: int) -> None:
    """Delete the logged models of all but the ``keep`` best trials of the study (and those the
    registry holds; ``track.collect``), record them in the study, print what was freed (the
    caller has configured the tracking store)."""
    from cifar_exp.sweep import storage
    from cifar_exp.track import collect

    study = storage.load_existing(storage_url, chosen.name)
    # Exclusive: no register is choosing, confirming or registering a model while this deletes.
    with storage.models_lock(storage_url, study, chosen.name, shared=False, on_wait=lambda: print(
            f"waiting for a register of {chosen.name} to finish", flush=True)):
        gone = StudyAttrs.of(study).models_collected
        done = collect.collect(study.get_trials(deepcopy=False), chosen.objectives, keep, gone)
        if done.deleted:  # after the deletion: a collection cut short is finished by the next one
            for key, value in StudyAttrs.encode(models_collected=gone | set(done.deleted)).items():
                study.set_user_attr(key, value)
    kept = f"kept the models of the {keep} best ({trial_list(done.plan.kept)})"
    if done.plan.registered:
        kept += f" and of the registered versions ({trial_list(done.plan.registered)})"
    if not done.deleted:
        print(f"gc {chosen.name}: nothing to delete; {kept}")
        return
    print(f"gc {chosen.name}: deleted the models of {trial_list(done.deleted)}: {done.freed:,} bytes freed "
          f"({done.freed / 2**20:.1f} MiB); {kept}")
