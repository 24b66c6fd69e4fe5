"""``cifar-exp gc NAME``: delete the logged models of all but a study's best trials."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from cifar_exp.cli import arguments
from cifar_exp.cli.environment import cheap_checks, existing_store
from cifar_exp.cli.progress import trial_list
from cifar_exp.cli.register import say
from cifar_exp.config import UserError
from cifar_exp.config.sweepfile import load_sweep

if TYPE_CHECKING:
    from cifar_exp.registry.study import Collected

DESCRIPTION = ("Delete the logged models of all but the K best trials of a sweep's study (never a registered "
               "version's, never a running trial's) and print the bytes freed; runs, metrics and other artifacts "
               "stay.")
SUMMARY = "delete all but the best trials' models"  # its line in cifar-exp --help


def add_arguments(p: argparse.ArgumentParser) -> None:
    arguments.study(p)
    p.add_argument("--keep", type=arguments.positive(int, "--keep"), metavar="K",
                   help="how many of the best trials keep their models (default: the sweep's keep_models)")


def run(args: argparse.Namespace) -> int:
    chosen = load_sweep(args.name, args.study)
    keep = args.keep if args.keep is not None else chosen.keep_models
    if keep is None:
        raise UserError(f"gc {chosen.name}: give --keep K (how many of the best trials keep their models), or set "
                        f"keep_models: in {chosen.path}")
    existing_store(args.tracking_uri)
    cheap_checks(args.storage)
    from cifar_exp import track
    from cifar_exp.registry import study

    track.configure(args.tracking_uri)
    print_collected(chosen.name, keep, study.collect_models(chosen, args.storage, keep, say))
    return 0


def print_collected(name: str, keep: int, done: Collected) -> None:
    """What ``registry.study.collect_models`` did, as the terminal shows it."""
    kept = f"kept the models of the {keep} best ({trial_list(done.kept)})"
    if done.registered:
        kept += f" and of the registered versions ({trial_list(done.registered)})"
    if not done.deleted:
        print(f"gc {name}: nothing to delete; {kept}")
        return
    print(f"gc {name}: deleted the models of {trial_list(done.deleted)}: {done.freed:,} bytes freed "
          f"({done.freed / 2**20:.1f} MiB); {kept}")
