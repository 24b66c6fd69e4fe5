"""Judging a trial's numbers: degenerate trials are named, the prediction grid spans the classes."""

from __future__ import annotations

import numpy as np
import pytest

from cifar_exp import metrics

CLASSES = tuple("abcdefghij")


def probabilities(predicted: np.ndarray, classes: int = 10) -> np.ndarray:
    return np.eye(classes)[predicted] * 0.9 + 0.01


def test_chance_ceiling_is_chance_plus_two_binomial_deviations() -> None:
    assert metrics.chance_ceiling(10, 5000) == pytest.approx(0.1 + 2 * np.sqrt(0.09 / 5000))
    assert metrics.chance_ceiling(10, 40) == pytest.approx(0.19487, abs=1e-4)


def test_a_trial_at_chance_in_every_epoch_is_degenerate() -> None:
    why = metrics.degenerate({"val_accuracy": [0.1, 0.1, 0.1046]}, None, 5000, CLASSES)
    assert why == "val_accuracy at chance (best 0.1046 <= 0.1085 in 3 epochs)"
    assert metrics.degenerate({"val_accuracy": [0.1, 0.25]}, None, 5000, CLASSES) == ""


def test_predictions_collapsed_onto_one_class_are_degenerate() -> None:
    y_pred = np.array([3] * 95 + [0, 1, 2, 4, 5])
    why = metrics.degenerate({"val_accuracy": [0.3]}, probabilities(y_pred), 5000, CLASSES)
    assert why == "predictions collapsed onto d (95% of test images)"
    assert metrics.degenerate({"val_accuracy": [0.3]}, probabilities(np.arange(100) % 10), 5000, CLASSES) == ""


def test_a_model_without_val_accuracy_is_judged_on_its_predictions() -> None:
    assert metrics.degenerate({"val_loss": [2.3]}, None, 5000, CLASSES) == ""
    both = metrics.degenerate({"val_accuracy": [0.1]}, probabilities(np.zeros(50, int)), 5000, CLASSES)
    assert both.startswith("val_accuracy at chance") and "; predictions collapsed onto a (100%" in both


def test_the_grid_shows_mistakes_across_classes_then_correct_ones() -> None:
    # A weak model: everything but the last 10 images (classes 0..9 in order) predicted wrong.
    y_true = np.repeat(np.arange(10), 30)
    y_pred = (y_true + 1) % 10
    right = np.arange(290, 300)
    y_true[right] = np.arange(10)
    y_pred[right] = y_true[right]
    picks = metrics.grid_picks(y_true, y_pred, 24)
    wrong, correct = picks[:14], picks[14:]
    assert len(picks) == 24 and len(set(picks.tolist())) == 24
    assert np.all(y_pred[wrong] != y_true[wrong]) and np.all(y_pred[correct] == y_true[correct])
    assert set(y_true[wrong[:10]].tolist()) == set(range(10))  # one mistake of every class before a second
    assert len(correct) == 10  # all the correct ones there are; mistakes fill the rest


def test_the_grid_takes_half_mistakes_half_correct_when_both_suffice() -> None:
    y_true = np.arange(200) % 10
    y_pred = np.where(np.arange(200) < 100, y_true, (y_true + 3) % 10)
    picks = metrics.grid_picks(y_true, y_pred, 24)
    assert (y_pred[picks] != y_true[picks]).tolist() == [True] * 12 + [False] * 12
    assert len(set(y_true[picks[:12]].tolist())) == 10 and len(set(y_true[picks[12:]].tolist())) == 10
