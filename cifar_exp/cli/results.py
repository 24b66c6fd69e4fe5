"""The commands on what sweeps left behind: register, report, compare and ui (a finished
study), predict and evaluate (a model). ``cli`` parses their arguments and is the error boundary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from cifar_exp.cli.environment import existing_store, open_store, quiet_keras
from cifar_exp.cli.progress import fmt, numbered, print_degenerate
from cifar_exp.config import (
    DEFAULT_STORAGE,
    DEFAULT_STORE,
    Sweep,
    UserError,
    existing_storage,
    mask_credentials,
    outcomes,
)
from cifar_exp.config.records import StudyAttrs, TrialAttrs
from cifar_exp.config.sweepfile import load_sweep


def register_best(chosen: Sweep, storage_url: str, data_source: str | None, rule: outcomes.Rule | None = None,
                  seeds: int = 0) -> None:
    """Register the study's best model (by ``rule``, default the first objective's best on the
    front) and promote it; with ``seeds``, the candidates confirmed over that many seeds first
    (``rerun.confirm``). Prints what happened (the caller has set up the environment and the
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
    from cifar_exp import data, register, track

    best = register.best_trial(trials, chosen, rule)
    if data_source is None:  # the data the trial trained on, which --data may have overridden
        data_source = track.get_run(str(TrialAttrs.of(best).mlflow_run_id)).tags.get("data_source", chosen.data.source)
    quiet_keras(storage_url, chosen.name)
    promotion = register.promote(chosen, chosen.model_name, trials, data.load(data_source), rule)
    _registered(promotion.version, promotion.trial.number, rule)
    if promotion.promoted:
        print(f"alias {register.CHAMPION} -> version {promotion.version.version}: {promotion.reason}")
    else:
        print(f"not promoted to {register.CHAMPION}: {promotion.reason}")
    print(f"load it with mlflow.pyfunc.load_model('models:/{promotion.version.name}@{register.CHAMPION}')")


def _registered(version: Any, number: int, rule: outcomes.Rule | None) -> None:
    from cifar_exp import register

    print(f"{'registered' if version.created else 'already registered:'} {version.name} version {version.version} "
          f"(trial {number}, run {version.run_id}); alias {register.CHALLENGER} -> version {version.version}")
    if rule is not None:
        print(f"chosen by the rule: {rule}")


def _register_confirmed(chosen: Sweep, study: Any, trials: list[Any], rule: outcomes.Rule | None, seeds: int,
                        storage_url: str) -> None:
    from cifar_exp import register
    from cifar_exp.rerun import confirm
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
    verdict = f"alias {register.CHAMPION} -> version {done.version.version}" if done.promoted else \
        f"not promoted to {register.CHAMPION}"
    print(f"{verdict}: {done.reason}")
    print(f"load it with mlflow.pyfunc.load_model('models:/{done.version.name}@{register.CHAMPION}')")


def _cheap_checks(storage_url: str, data_source: str | None = None) -> None:
    """What a command can refuse before it imports MLflow, Keras or the data (seconds): a journal
    or SQLite storage that is not there, a ``--data`` that is no data set."""
    existing_storage(storage_url)
    if data_source is not None:
        from cifar_exp import data

        data.detect(data_source)


def register_command(args: argparse.Namespace) -> int:
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
    _cheap_checks(args.storage, args.data)
    open_store(args.tracking_uri, chosen.deterministic)
    register_best(chosen, args.storage, args.data, rule, seeds)
    return 0


def _trials(numbers: list[int]) -> str:
    return f"trial{'s' if len(numbers) != 1 else ''} {', '.join(map(str, numbers))}" if numbers else "none"


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
    kept = f"kept the models of the {keep} best ({_trials(done.plan.kept)})"
    if done.plan.registered:
        kept += f" and of the registered versions ({_trials(done.plan.registered)})"
    if not done.deleted:
        print(f"gc {chosen.name}: nothing to delete; {kept}")
        return
    print(f"gc {chosen.name}: deleted the models of {_trials(done.deleted)}: {done.freed:,} bytes freed "
          f"({done.freed / 2**20:.1f} MiB); {kept}")


def gc_command(args: argparse.Namespace) -> int:
    chosen = load_sweep(args.name)
    keep = args.keep if args.keep is not None else chosen.keep_models
    if keep is None:
        raise UserError(f"gc {chosen.name}: give --keep K (how many of the best trials keep their models), or set "
                        f"keep_models: in {chosen.path}")
    existing_store(args.tracking_uri)
    _cheap_checks(args.storage)
    from cifar_exp import track

    track.configure(args.tracking_uri)
    collect_models(chosen, args.storage, keep)
    return 0


def report_command(args: argparse.Namespace) -> int:
    chosen = load_sweep(args.name)
    open_store(args.tracking_uri, chosen.deterministic)
    from cifar_exp import track
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
    print(f"study '{chosen.name}': {len(found.trials)} trials; report rebuilt in parent run {parent}: "
          f"report.html, trials.csv, trials.html, cost.json and the plots")
    for name, why in skipped.items():
        print(f"  {name} not drawn: {why}")
    return 0


def ui_command(args: argparse.Namespace) -> int:
    existing_store(args.tracking_uri)
    from cifar_exp import track

    track.configure(args.tracking_uri)
    address = f"http://{args.host}:{args.port}"
    experiment = None
    if args.name:
        name = load_sweep(args.name).name
        if track.find_experiment(name) is None:
            raise UserError(f"no experiment '{args.name}' in {args.tracking_uri}: run the sweep first")
        experiment = track.experiment_id(name)  # tags a store's older experiment as one of runs
    print(f"MLflow UI on {mask_credentials(args.tracking_uri)}: {address}", flush=True)
    if experiment is not None:
        # The runs table in MLflow's model-training view (its default view is GenAI's)
        print(f"experiment {args.name}: {address}/#/experiments/{experiment}/runs?workflowType=machine_learning",
              flush=True)
    # The server replaces this process: Ctrl-C and signals reach it directly, no orphan is left.
    # MLflow accepts state changes from every localhost origin: any other program's page on this
    # machine could change the store. Our app (track.ui.create_ui_app) lets only the UI's own pages.
    origins = {address, f"http://localhost:{args.port}", f"http://127.0.0.1:{args.port}"}
    os.environ[track.ui.UI_ORIGINS_ENV] = ",".join(sorted(origins))
    os.environ[track.ui.UI_HOSTS_ENV] = ",".join(sorted(track.ui.ui_hosts(args.host, args.port)))
    # MLflow's job runner (GenAI evaluation jobs) serves nothing a sweep logs: with it the UI was
    # 10 processes and answered /health after 16.1 and 19.5 s on this 2-core machine, without it
    # 2 processes and 12.1 and 12.7 s. A user who wants it sets the variable to true.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    # One worker process: MLflow's default 4 each import its server app at start. On a 2-core
    # machine /health answered after 16.0 s with 4, 10.6 s with 1, and not within 120 s with 4
    # while sweeps trained beside it. One user's UI needs no more.
    os.execv(sys.executable, [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", args.tracking_uri,
                              "--host", args.host, "--port", str(args.port), "--app-name", "cifar-exp-ui",
                              "--workers", "1"])
    return 0  # not reached


def _png_out(out: str | None, default: str) -> Path:
    """Where ``compare`` writes its PNG: ``--out`` (a folder gets the default name in it), checked
    before anything is read or drawn."""
    if out is None:
        return DEFAULT_STORE / default  # nothing lands in a checkout
    path = Path(out)
    if path.is_dir():
        return path / default
    if not path.parent.is_dir():
        raise UserError(f"--out {out}: the folder {path.parent} does not exist: create it, or name a PNG in an "
                        f"existing folder")
    if path.suffix.lower() != ".png":
        raise UserError(f"--out {out}: the plot is a PNG: give a path ending in .png")
    return path


def compare_command(args: argparse.Namespace) -> int:
    chosen = load_sweep(args.name)
    out = _png_out(args.out, f"{chosen.name}-top-{args.top}.png")
    existing_store(args.tracking_uri)
    from cifar_exp import track
    from cifar_exp.evaluate import plots
    from cifar_exp.sweep import storage

    track.configure(args.tracking_uri)
    study = storage.load_existing(args.storage, chosen.name)
    best = storage.best_trials(study, chosen.objectives, args.top)
    if not best:
        raise UserError(f"study '{chosen.name}' has no complete feasible trial yet")
    metric = chosen.objective.metric
    several = len(chosen.objectives) > 1
    on_front = {t.number for t in outcomes.front(study.get_trials(deepcopy=False), chosen.objectives)}
    names = sorted({key for t in best for key in t.params})
    goals = [o.metric for o in chosen.objectives]
    header = ["rank", "trial", *(["front"] if several else []), *goals,
              *(["test_accuracy"] if "test_accuracy" not in goals else []), "epochs", "seconds", *names]
    rows, curves = [], {}
    for rank, t in enumerate(best, 1):
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else float("nan")
        attrs = TrialAttrs.of(t)
        test = float("nan") if attrs.test_accuracy is None else attrs.test_accuracy
        rows.append([str(rank), numbered(t),
                     *(["*" if t.number in on_front else ""] if several else []),
                     *(f"{v:.4f}" if abs(v) < 1000 else f"{v:.0f}" for v in t.values),
                     *([f"{test:.4f}"] if "test_accuracy" not in goals else []),
                     str(attrs.epochs_run or ""), f"{seconds:.1f}",
                     *(fmt(t.params[n]) if n in t.params else "-" for n in names)])
        run_id = attrs.mlflow_run_id
        if run_id:
            curves[f"trial {t.number}"] = track.metric_history(run_id, metric)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    for line in (header, *rows):
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)))
    print_degenerate(best)
    gone = sorted(StudyAttrs.of(study).models_collected & {t.number for t in best})
    if gone:
        print(f"no model any more (deleted by gc; runs, metrics and curves kept): {_trials(gone)}")
    try:
        plots.curves_png(curves, metric, str(out), f"{chosen.name}: {metric} of the {len(best)} best trials")
    except OSError as exc:
        raise UserError(f"cannot write {out} ({exc.strerror or exc}): pass --out a writable path") from None
    print(f"wrote {out}")
    return 0


def predict_command(args: argparse.Namespace) -> int:
    open_store(args.tracking_uri, deterministic=False)
    from cifar_exp import register

    decoded = register.read_images(args.images)  # the inputs first: loading a model takes a minute
    quiet_keras(DEFAULT_STORAGE, "predict")
    model, names = register.load(args.model)
    images = register.resized(decoded, tuple(model.input_shape[1:3]))
    ranked = register.top_k(register.probabilities(model, images), names, args.top_k)
    if args.json:
        print(json.dumps([{"image": image, "predictions": [{"class": c, "probability": p} for c, p in top]}
                          for image, top in zip(args.images, ranked, strict=True)], indent=2))
        return 0
    width = max(len("image"), *(len(i) for i in args.images))
    print(f"{'image':<{width}}  {'rank':>4}  {'class':<12} probability")
    for image, top in zip(args.images, ranked, strict=True):
        for rank, (name, prob) in enumerate(top, 1):
            print(f"{image if rank == 1 else '':<{width}}  {rank:>4}  {name:<12} {prob:.4f}")
    return 0


def evaluate_command(args: argparse.Namespace) -> int:
    open_store(args.tracking_uri, deterministic=False)
    from cifar_exp import data, register, track

    try:
        source_run = track.models.model_run_id(args.model)
    except Exception as exc:  # noqa: BLE001 (any failure to resolve the URI is the user's input: one line)
        raise UserError(f"cannot find {args.model}: {str(exc).splitlines()[0]}") from None
    run = track.get_run(source_run) if source_run else None
    source = args.data or (run.tags.get("data_source") if run else None) or "keras"
    quiet_keras(DEFAULT_STORAGE, "evaluate")
    test = data.load(source)
    experiment = run.experiment_id if run else track.experiment_id("evaluations")
    run_id, metrics = register.evaluate(args.model, test, experiment, {
        "source_run_id": source_run or "", "data_source": source, "data_checksum": test.checksum})
    print(f"{args.model} on {len(test.y_test)} test images of {source}: test_accuracy {metrics['test_accuracy']:.4f}"
          f", test_loss {metrics['test_loss']:.4f}, test_macro_f1 {metrics['test_macro_f1']:.4f}")
    print(f"evaluation run {run_id} (experiment {experiment}): confusion_matrix.png, classification_report.json, "
          f"prediction_grid.png")
    return 0
