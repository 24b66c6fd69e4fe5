"""``cifar-exp register NAME``: register a sweep's best model and promote it by alias; with
``--seeds``, its candidates confirmed over more seeds first.
"""

from __future__ import annotations

import argparse
from typing import Any

from cifar_exp.cli import arguments
from cifar_exp.cli.environment import (
    cheap_checks,
    existing_store,
    open_store,
    quiet_keras,
)
from cifar_exp.config import (
    Sweep,
    UserError,
    outcomes,
)
from cifar_exp.config.records import StudyAttrs, TrialAttrs
from cifar_exp.config.sweepfile import load_sweep

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
    chosen = load_sweep(args.name)
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
    register_best(chosen, args.storage, args.data, rule, seeds)
    return 0


def register_best(chosen: Sweep, storage_url: str, data_source: str | None, rule: outcomes.Rule | None = None,
                  seeds: int = 0) -> None:
    """Register the study's best model (by ``rule``, default the first objective's best on the
    front) and promote it; with ``seeds``, the candidates confirmed over that many seeds first
    (``registry.confirm``). Prints what happened (the caller has set up the environment and the
    tracking store)."""
    from cifar_exp.sweep import storage, supervisor

    study = storage.load_existing(storage_url, chosen.name)
    closed = supervisor.close_confirmations(storage_url, study, chosen.name)
    if closed:
        print(f"closed {len(closed)} confirmation run(s) a killed register left RUNNING (now KILLED)", flush=True)
    # Held while a trial is chosen, confirmed and registered: gc deletes no model meanwhile.
    with storage.models_lock(storage_url, study, chosen.name, shared=True, on_wait=lambda: print(
            f"waiting for gc {chosen.name} to finish", flush=True)):
        trials = [t for t in study.get_trials(deepcopy=False) if t.number not in StudyAttrs.of(study).models_collected]
        if seeds:
            _register_confirmed(chosen, study, trials, rule, seeds, storage_url)
        else:
            _register_one(chosen, trials, storage_url, data_source, rule)


def _register_one(chosen: Sweep, trials: list[Any], storage_url: str, data_source: str | None,
                  rule: outcomes.Rule | None) -> None:
    from cifar_exp import data, registry, track

    best = registry.best_trial(trials, chosen, rule)
    if data_source is None:  # the data the trial trained on, which --data may have overridden
        data_source = track.get_run(str(TrialAttrs.of(best).mlflow_run_id)).tags.get("data_source", chosen.data.source)
    quiet_keras(storage_url, chosen.name)
    promotion = registry.promote(chosen, chosen.model_name, trials, data.load(data_source), rule)
    _registered(promotion.version, promotion.trial.number, rule)
    if promotion.promoted:
        print(f"alias {registry.CHAMPION} -> version {promotion.version.version}: {promotion.reason}")
    else:
        print(f"not promoted to {registry.CHAMPION}: {promotion.reason}")
    print(f"load it with mlflow.pyfunc.load_model('models:/{promotion.version.name}@{registry.CHAMPION}')")


def _registered(version: Any, number: int, rule: outcomes.Rule | None) -> None:
    from cifar_exp import registry

    print(f"{'registered' if version.created else 'already registered:'} {version.name} version {version.version} "
          f"(trial {number}, run {version.run_id}); alias {registry.CHALLENGER} -> version {version.version}")
    if rule is not None:
        print(f"chosen by the rule: {rule}")


def _register_confirmed(chosen: Sweep, study: Any, trials: list[Any], rule: outcomes.Rule | None, seeds: int,
                        storage_url: str) -> None:
    from cifar_exp import registry
    from cifar_exp.registry import confirm
    from cifar_exp.training import backend

    attrs = StudyAttrs.of(study)
    parent, experiment = attrs.mlflow_parent_run_id, attrs.mlflow_experiment_id
    if not parent or not experiment:
        raise UserError(f"study '{chosen.name}' has no MLflow parent run yet: run the sweep first")
    print(f"library log lines (TensorFlow, MLflow): {quiet_keras(storage_url, chosen.name)}", flush=True)
    trainer = confirm.Trainer(str(experiment), str(parent), backend.identity(),
                              on_run=lambda line: print(line, flush=True))
    done = confirm.promote(chosen, chosen.model_name, trials, seeds, rule, trainer)
    metric = chosen.objective.metric
    print(f"candidates, {metric} over {seeds} confirmation seeds each (the seed each was chosen on left out):")
    for t, found in zip(done.candidates, done.confirmed, strict=True):
        print(f"  trial {t.number}: {outcomes.value(t):.4f} on its own seed -> {found.spread(found.values)}; "
              f"test_accuracy {TrialAttrs.of(t).test_accuracy or float('nan'):.4f} -> "
              f"{found.spread(found.test_accuracy)}{'  (best mean)' if found is done.chosen else ''}")
    _registered(done.version, done.trial.number, rule)
    verdict = f"alias {registry.CHAMPION} -> version {done.version.version}" if done.promoted else \
        f"not promoted to {registry.CHAMPION}"
    print(f"{verdict}: {done.reason}")
    print(f"load it with mlflow.pyfunc.load_model('models:/{done.version.name}@{registry.CHAMPION}')")
