"""A trial's test evaluation, pure: from labels, probabilities and history to metrics, verdicts
and the artifact files (``write_report``), which ``track`` then logs.

Imports neither Keras, Optuna nor MLflow: training, the worker, the KerasTuner engine and the
registry's evaluation call these on plain arrays.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# A trial whose predictions put at least this share of the test images in one class has collapsed
# onto that class (the "one solid column" confusion matrix).
COLLAPSED_SHARE = 0.9


def chance_ceiling(classes: int, images: int) -> float:
    """The highest validation accuracy still indistinguishable from guessing among ``classes``
    on ``images`` images: chance plus two binomial standard deviations (0.1085 for CIFAR-10's
    10 classes on 5,000 images, 0.195 on 40)."""
    p = 1.0 / classes
    return p + 2.0 * math.sqrt(p * (1.0 - p) / max(images, 1))


def degenerate(history: Mapping[str, Sequence[float]], y_prob: np.ndarray | None, val_images: int,
               class_names: Sequence[str]) -> str:
    """Why a trial's result means nothing, or "" when it does: validation accuracy that never
    rose above chance (``chance_ceiling``) in any epoch, or test predictions that collapsed onto
    one class (``COLLAPSED_SHARE``). ``y_prob`` is None for a trial that never reached the test
    set (pruned); a model that logs no ``val_accuracy`` is judged on its predictions only."""
    reasons = []
    val = history.get("val_accuracy") or []
    if val:
        ceiling = chance_ceiling(len(class_names), val_images)
        if max(val) <= ceiling:
            reasons.append(f"val_accuracy at chance (best {max(val):.4f} <= {ceiling:.4f} in {len(val)} epochs)")
    if y_prob is not None and len(y_prob):
        counts = np.bincount(y_prob.argmax(axis=1), minlength=len(class_names))
        top = int(counts.argmax())
        share = counts[top] / counts.sum()
        if share >= COLLAPSED_SHARE:
            reasons.append(f"predictions collapsed onto {class_names[top]} ({share:.0%} of test images)")
    return "; ".join(reasons)


def grid_picks(y_true: np.ndarray, y_pred: np.ndarray, count: int) -> np.ndarray:
    """Indices of ``count`` test images to show: misclassified ones from as many true classes as
    possible (one per class in turn, in test-set order within a class), then correct ones the
    same way; half of each where both suffice, the rest from whichever has more."""
    wrong, right = y_pred != y_true, y_pred == y_true
    halves = [min(int(wrong.sum()), max(count - int(right.sum()), count // 2))]
    halves.append(min(int(right.sum()), count - halves[0]))
    picks: list[int] = []
    for mask, take in zip((wrong, right), halves, strict=True):
        pools = [list(np.flatnonzero(mask & (y_true == c))) for c in np.unique(y_true)]
        chosen: list[int] = []
        while len(chosen) < take:
            for pool in pools:
                if pool and len(chosen) < take:
                    chosen.append(int(pool.pop(0)))
        picks += chosen
    return np.array(picks, dtype=np.int64)


EPSILON = 1e-7  # Keras' fuzz factor (keras.config.epsilon()), with which its cross-entropy clips
GRID_IMAGES = 24  # test images in prediction_grid.png


def cross_entropy(y_prob: np.ndarray, y_true: np.ndarray, label_smoothing: float = 0.0) -> float:
    """Keras' categorical cross-entropy (same clipping and label smoothing) computed in numpy,
    so that the test set is passed through the model once, by ``predict``."""
    classes = y_prob.shape[1]
    target = np.eye(classes, dtype=np.float64)[y_true] * (1 - label_smoothing) + label_smoothing / classes
    return float(np.mean(-np.sum(target * np.log(np.clip(y_prob, EPSILON, 1 - EPSILON)), axis=1)))


def test_metrics(y_prob: np.ndarray, y_true: np.ndarray, label_smoothing: float = 0.0) -> dict[str, float]:
    """``test_loss`` and ``test_accuracy`` from one pass's probabilities."""
    return {"test_loss": cross_entropy(y_prob, y_true, label_smoothing),
            "test_accuracy": float(np.mean(y_prob.argmax(axis=1) == y_true))}


def confused_pairs(counts: np.ndarray, class_names: Sequence[str], top: int = 5) -> list[dict[str, Any]]:
    """The ``top`` class pairs most often mistaken for each other, most first: ``a_as_b`` counts
    true a predicted b, ``b_as_a`` the reverse, ``total`` both; pairs never confused are left out."""
    pairs: list[dict[str, Any]] = [
        {"pair": f"{class_names[a]} <-> {class_names[b]}", "total": int(counts[a, b] + counts[b, a]),
         "a_as_b": int(counts[a, b]), "b_as_a": int(counts[b, a])}
        for a in range(len(class_names)) for b in range(a + 1, len(class_names)) if counts[a, b] + counts[b, a]]
    return sorted(pairs, key=lambda pair: -pair["total"])[:top]


def write_report(out: Path, images: np.ndarray, y_true: np.ndarray, y_prob: np.ndarray,
                 class_names: Sequence[str], history: Mapping[str, Sequence[float]] | None,
                 title: str, kept_epoch: int | None = None) -> dict[str, float]:
    """A test-set evaluation into the folder ``out``: confusion matrix (PNG, CSV), the most-confused
    class pairs (CSV), classification report (JSON), a grid of predictions (PNG: misclassified
    images across classes, then correct ones, see ``grid_picks``) and, given a ``history``,
    learning curves (PNG; ``kept_epoch``, the index of the epoch whose model this is, marked).
    Returns the per-class precision/recall/F1 and macro F1 metrics."""
    from sklearn.metrics import classification_report, confusion_matrix

    from cifar_exp.metrics import plots

    y_pred = y_prob.argmax(axis=1)
    labels = list(range(len(class_names)))
    counts = confusion_matrix(y_true, y_pred, labels=labels)
    report = classification_report(y_true, y_pred, labels=labels, target_names=list(class_names),
                                   output_dict=True, zero_division=0)
    metrics = {"test_macro_f1": float(report["macro avg"]["f1-score"])}
    for name in class_names:
        for key, short in (("precision", "precision"), ("recall", "recall"), ("f1-score", "f1")):
            metrics[f"test_{short}_{name}"] = float(report[name][key])
    with (out / "confusion_matrix.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *class_names])
        for name, row in zip(class_names, counts, strict=True):
            writer.writerow([name, *map(int, row)])
    (out / "classification_report.json").write_text(json.dumps(report, indent=2))
    with (out / "confused_pairs.csv").open("w", newline="") as f:
        pairs = csv.DictWriter(f, fieldnames=["pair", "total", "a_as_b", "b_as_a"])
        pairs.writeheader()
        pairs.writerows(confused_pairs(counts, class_names))
    plots.confusion_matrix_png(counts, class_names, out / "confusion_matrix.png", title)
    shown = grid_picks(y_true, y_pred, GRID_IMAGES)
    plots.prediction_grid_png(images[shown], y_true[shown], y_pred[shown], class_names,
                              out / "prediction_grid.png", title, y_prob[shown, y_pred[shown]])
    if history is not None:
        plots.learning_curves_png(history, out / "learning_curves.png", title, kept_epoch)
    return metrics
