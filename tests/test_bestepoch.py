"""The best epoch (``model_epoch: best``) on 64 synthetic images: the model a run returns holds the
variables of the epoch best by the rule, so its test pass equals that of the same run stopped
after that epoch; every epoch is still trained and reported; a resumed run keeps the same epoch."""

from __future__ import annotations

import math
from pathlib import Path

import keras
import numpy as np
import pytest

from cifar_exp import data
from cifar_exp.config import TrainConfig
from cifar_exp.training import best, train
from tests.conftest import synthetic_splits
from tests.test_checkpoints import killed_then_resumed, numbers

pytestmark = pytest.mark.keras  # run again under every backend (README, "Test")

CFG = TrainConfig(blocks=2, filters=4, convs_per_block=1, dense_units=8, batch_size=16, learning_rate=0.01)
# Training loss is highest in the first epoch, while the model is still at its initial weights:
# "maximize loss" makes the best epoch one before the last, which is what is tested here.
EARLY = ("loss", "maximize")


@pytest.fixture(scope="module")
def splits() -> data.Splits:
    return synthetic_splits()


def test_the_chosen_epoch_is_the_first_best_finite_value() -> None:
    assert best.chosen_epoch({"val_accuracy": [0.2, 0.5, 0.5, 0.4]}, "val_accuracy", "maximize") == 1
    assert best.chosen_epoch({"val_loss": [2.0, math.nan, 1.5, 1.7]}, "val_loss", "minimize") == 2
    assert best.chosen_epoch({"val_loss": [math.nan, math.nan]}, "val_loss", "minimize") == 1  # none finite: last


def test_the_model_kept_is_the_best_epochs_and_equals_the_run_stopped_there(splits: data.Splits) -> None:
    kept = train.train(CFG, splits, epochs=3, seed=7, options=train.TrainOptions(best_by=EARLY))
    keras.backend.clear_session()
    assert len(kept.history["loss"]) == 3  # every epoch trained and reported
    assert kept.kept_epoch == best.chosen_epoch(kept.history, *EARLY) < 2, kept.history["loss"]
    stopped = train.train(CFG, splits, epochs=3, seed=7, options=train.TrainOptions(stop_after=kept.kept_epoch + 1))
    keras.backend.clear_session()
    assert numbers(stopped.history) == {k: v[:kept.kept_epoch + 1] for k, v in numbers(kept.history).items()}
    assert np.array_equal(kept.y_prob, stopped.y_prob)  # the test pass is that epoch's model's
    assert (kept.test_loss, kept.test_accuracy) == (stopped.test_loss, stopped.test_accuracy)
    # the model returned (the copy that is logged) holds those weights: its predictions are the test
    # pass's up to float rounding (another model object, so another compiled program under JAX:
    # 7e-9 apart there), far below what an epoch changes
    np.testing.assert_allclose(np.asarray(kept.model.predict(splits.x_test, verbose=0)), kept.y_prob, atol=1e-6)
    assert np.abs(stopped.y_prob - train.train(CFG, splits, epochs=3, seed=7).y_prob).max() > 1e-4


def test_without_a_rule_the_model_is_the_last_epochs(splits: data.Splits) -> None:
    last = train.train(CFG, splits, epochs=2, seed=7)
    keras.backend.clear_session()
    assert last.kept_epoch == 1


def test_a_resumed_run_keeps_the_epoch_the_uninterrupted_run_keeps(splits: data.Splits, tmp_path: Path) -> None:
    whole = train.train(CFG, splits, epochs=3, seed=7, options=train.TrainOptions(best_by=EARLY))
    keras.backend.clear_session()

    # stopped at the end of epoch 0 (resumed from epoch 0's checkpoint, whose kept epoch is its
    # own, stored once), then at the end of epoch 1 (from epoch 1's, whose kept epoch is one before it)
    resumed, _ = killed_then_resumed(CFG, splits, tmp_path / "k.npz", 3, (0, 1), best_by=EARLY)
    assert resumed.kept_epoch == whole.kept_epoch
    assert np.array_equal(resumed.y_prob, whole.y_prob)
    assert numbers(resumed.history) == numbers(whole.history)
