"""Judging a trial's numbers, pure: from labels, probabilities and history to verdicts and picks.

Imports neither Keras, Optuna nor MLflow: the worker, the KerasTuner engine and the registry's
evaluation call these on plain arrays.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

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
