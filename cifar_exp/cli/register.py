"""``cifar-exp register NAME``: register a sweep's best model and promote it by alias; with
``--seeds``, its candidates confirmed over more seeds first."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from cifar_exp.cli import arguments
from cifar_exp.cli.environment import cheap_checks, existing_store, open_store, quiet_keras
from cifar_exp.config import Sweep, UserError, outcomes
from cifar_exp.config.records import TrialAttrs
from cifar_exp.config.sweepfile import load_sweep

if TYPE_CHECKING:
    from cifar_exp.registry.study import Registered

DESCRIPTION = ("Register the best completed trial of a sweep's study in the MLflow Model Registry (alias "
               "challenger) and promote it to champion if it beats the champion on the test set.")
SUMMARY = "register the best model, promote it if better"  # its line in cifar-exp --help


def add_arguments(p: argparse.ArgumentParser) -> None:
    arguments.study(p)
    p.add_argument("--data", help="the test data to compare on (default: what the best trial trained on)")
    p.add_argument("--pick", metavar="METRIC",
                   help="choose the front member best in METRIC (default: the first objective's best)")
    p.add_argument("--where", action="append", default=[], metavar="COND",
                   help="only front members meeting COND, e.g. 'latency_ms<=2' (repeatable, or comma-separated)")
    p.add_argument("--seeds", metavar="N",
                   type=arguments.number(int, "--seeds", lambda v: 0 <= v <= 1000, "0, or 2 to 1000"),
                   help="retrain the best candidates with N more seeds each and promote on their means "
                        "(default: the sweep's confirm_seeds; 0: the one seed the sweep ran)")


def run(args: argparse.Namespace) -> int:
    chosen = load_sweep(args.name, args.study)
    rule = outcomes.Rule.parse(chosen.objective.metric if args.pick is None else args.pick, args.where) \
        if args.pick is not None or args.where else None
    seeds = chosen.confirm_seeds if args.seeds is None else args.seeds
    if seeds == 1:
        raise UserError("--seeds 1: one seed has no spread to judge a champion by: give 2 or more (or 0)")
    if seeds and args.data is not None:
        raise UserError("--data is the test set of a one-seed registration; with --seeds each candidate trains and "
                        "tests on the data it trained on: drop --data (or pass --seeds 0)")
    existing_store(args.tracking_uri)
    cheap_checks(args.storage, args.data)
    open_store(args.tracking_uri, chosen.deterministic)
    log = quiet_keras(args.storage, chosen.name)
    if seeds:  # minutes of training ahead: say where the libraries' lines go
        say(f"library log lines (TensorFlow, MLflow): {log}")
    from cifar_exp.registry import study

    print_registered(study.register_best(chosen, args.storage, args.data, rule, seeds, say), chosen, rule)
    return 0


def say(line: str) -> None:
    """A line the registry shows while it works (a wait, a confirmation run), at once."""
    print(line, flush=True)


def print_registered(done: Registered, chosen: Sweep, rule: outcomes.Rule | None) -> None:
    """What ``registry.study.register_best`` did, as the terminal shows it."""
    from cifar_exp import registry

    confirmed, version = done.confirmed, done.version
    if confirmed is not None:
        print(f"candidates, {chosen.objective.metric} over {len(confirmed.chosen.values)} confirmation seeds each "
              f"(the seed each was chosen on left out):")
        for t, found in zip(confirmed.candidates, confirmed.confirmed, strict=True):
            print(f"  trial {t.number}: {outcomes.value(t):.4f} on its own seed -> {found.spread(found.values)}; "
                  f"test_accuracy {TrialAttrs.of(t).test_accuracy or float('nan'):.4f} -> "
                  f"{found.spread(found.test_accuracy)}{'  (best mean)' if found is confirmed.chosen else ''}")
    print(f"{'registered' if version.created else 'already registered:'} {version.name} version {version.version} "
          f"(trial {done.trial}, run {version.run_id}); alias {registry.CHALLENGER} -> version {version.version}")
    if rule is not None:
        print(f"chosen by the rule: {rule}")
    verdict = f"alias {registry.CHAMPION} -> version {version.version}" if done.promoted else \
        f"not promoted to {registry.CHAMPION}"
    print(f"{verdict}: {done.reason}")
    print(f"load it with mlflow.pyfunc.load_model('models:/{version.name}@{registry.CHAMPION}')")
