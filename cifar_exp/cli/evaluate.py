"""``cifar-exp evaluate [MODEL_URI]``: a fresh test-set evaluation run of a model."""

from __future__ import annotations

import argparse

from cifar_exp.cli import arguments
from cifar_exp.cli.arguments import DEFAULT_MODEL
from cifar_exp.cli.environment import open_store, quiet_keras
from cifar_exp.config import DEFAULT_STORAGE, UserError

DESCRIPTION = ("Evaluate a logged or registered model on the test set in a fresh MLflow run, with the "
               "artifacts of a trial (confusion matrix, classification report, prediction grid).")
SUMMARY = "a fresh test-set evaluation of a model"  # its line in cifar-exp --help


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"model URI (default {DEFAULT_MODEL})")
    p.add_argument("--data", help="test data (default: the data the model's run trained on)")
    arguments.tracking(p)


def run(args: argparse.Namespace) -> int:
    open_store(args.tracking_uri, deterministic=False)
    from cifar_exp import data, registry, track

    try:
        source_run = track.models.model_run_id(args.model)
    except Exception as exc:  # noqa: BLE001 (any failure to resolve the URI is the user's input: one line)
        raise UserError(f"cannot find {args.model}: {str(exc).splitlines()[0]}") from None
    run = track.get_run(source_run) if source_run else None
    source = args.data or (run.tags.get("data_source") if run else None) or "keras"
    quiet_keras(DEFAULT_STORAGE, "evaluate")
    test = data.load(source)
    experiment = run.experiment_id if run else track.experiment_id("evaluations")
    run_id, metrics = registry.evaluate(args.model, test, experiment, {
        "source_run_id": source_run or "", "data_source": source, "data_checksum": test.checksum})
    print(f"{args.model} on {len(test.y_test)} test images of {source}: test_accuracy {metrics['test_accuracy']:.4f}"
          f", test_loss {metrics['test_loss']:.4f}, test_macro_f1 {metrics['test_macro_f1']:.4f}")
    print(f"evaluation run {run_id} (experiment {experiment}): confusion_matrix.png, classification_report.json, "
          f"prediction_grid.png")
    return 0
