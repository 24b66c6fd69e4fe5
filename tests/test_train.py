"""Models and training on 64 synthetic images: shapes, augmentation, schedules, hooks, divergence."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from cifar_exp import data, models, train
from cifar_exp.config import TrainConfig
from tests.conftest import synthetic_images

SMALL = dict(blocks=2, filters=4, convs_per_block=1, dense_units=8)


@pytest.fixture(scope="module")
def splits() -> data.Splits:
    x, y = synthetic_images(64)
    xt, yt = synthetic_images(20, seed=1)
    return data.split(data.Cifar10(x, y, xt, yt, tuple("abcdefghij"), "synthetic", "0"), 0.25, 0)


@pytest.mark.parametrize("options", [
    dict(activation="leaky_relu", head="global_avg", batch_norm=False, dense_units=0),
    dict(activation="gelu", convs_per_block=3, blocks=5, head_dropout=0.0, dropout=0.0),
])
def test_cnn_family_builds_and_outputs_probabilities(options: dict) -> None:
    cfg = TrainConfig(**{**SMALL, **options})
    train_model, model = models.build(cfg, 10)
    x, _ = synthetic_images(3)
    probs = keras.ops.convert_to_numpy(model(x))
    assert probs.shape == (3, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert len(train_model.weights) == len(model.weights)  # shared, not copied
    names = {layer.name for layer in train_model.layers}
    assert {"flip", "translate"} <= names and not {"flip", "translate"} & {l.name for l in model.layers}


def test_random_translate_shifts_each_image_with_zero_fill() -> None:
    layer = models.RandomTranslate(0.125, seed=3)
    images = np.random.default_rng(0).uniform(0.1, 1.0, (16, 32, 32, 3)).astype("float32")
    out = keras.ops.convert_to_numpy(layer(images, training=True))
    shifts = set()
    for original, shifted in zip(images, out, strict=True):
        padded = np.pad(original, ((4, 4), (4, 4), (0, 0)))
        matches = [(dy, dx) for dy in range(9) for dx in range(9)
                   if np.allclose(padded[dy:dy + 32, dx:dx + 32], shifted)]
        assert matches, "output is not a shifted copy of the input"
        shifts.add(matches[0])
    assert len(shifts) > 1  # per-image offsets, not one for the batch
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(images, training=False)), images)


def test_step_schedule_divides_by_ten_in_three_equal_stages() -> None:
    cfg = TrainConfig(learning_rate=0.01, lr_schedule="step", step_stages=3, step_factor=0.1)
    schedule = train.learning_rate(cfg, epochs=3, steps_per_epoch=10)
    values = [float(keras.ops.convert_to_numpy(schedule(s))) for s in (0, 9, 10, 19, 20, 29)]
    np.testing.assert_allclose(values, [0.01, 0.01, 0.001, 0.001, 0.0001, 0.0001], rtol=1e-5)


def test_cosine_warmup_rises_then_decays() -> None:
    cfg = TrainConfig(learning_rate=0.1, lr_schedule="cosine", warmup_epochs=1)
    schedule = train.learning_rate(cfg, epochs=4, steps_per_epoch=10)
    lr = [float(keras.ops.convert_to_numpy(schedule(s))) for s in (0, 5, 10, 25, 40)]
    assert lr[0] < lr[1] < lr[2] and math.isclose(lr[2], 0.1, rel_tol=1e-5) and lr[2] > lr[3] > lr[4]


@pytest.mark.parametrize("name, cls", [("adam", "Adam"), ("adamax", "Adamax"), ("sgd", "SGD"), ("adamw", "AdamW")])
def test_optimizers(name: str, cls: str) -> None:
    opt = train.optimizer(TrainConfig(optimizer=name, momentum=0.8, weight_decay=0.01), 2, 5)
    assert type(opt).__name__ == cls
    if name == "sgd":
        assert opt.momentum == 0.8 and opt.nesterov
    if name == "adamw":
        assert opt.weight_decay == 0.01


def test_train_reports_every_epoch_and_evaluates_on_test(splits: data.Splits) -> None:
    seen: list[tuple[int, dict]] = []
    cfg = TrainConfig(**SMALL, batch_size=16, lr_schedule="exponential", decay_rate=0.5, label_smoothing=0.1)
    result = train.train(cfg, splits, epochs=3, seed=0, on_epoch=[lambda e, logs: seen.append((e, dict(logs)))])
    assert [e for e, _ in seen] == [0, 1, 2]
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "epoch_seconds"):
        assert len(result.history[key]) == 3 and all(key in logs for _, logs in seen)
    lr = result.history["learning_rate"]
    assert lr[0] > lr[1] > lr[2]  # realized rate, per epoch
    assert result.y_prob.shape == (20, 10) and 0.0 <= result.test_accuracy <= 1.0
    assert result.test_accuracy == float(np.mean(result.y_pred == splits.y_test))
    # test_loss is computed in numpy from one predict pass; it must equal Keras' own evaluation
    result.model.compile(loss=keras.losses.CategoricalCrossentropy(label_smoothing=0.1), metrics=["accuracy"])
    loss, accuracy = result.model.evaluate(splits.x_test, np.eye(10)[splits.y_test], verbose=0)
    assert math.isclose(result.test_loss, loss, rel_tol=1e-4)
    assert math.isclose(result.test_accuracy, accuracy, rel_tol=1e-6)


def test_a_hook_that_raises_stops_training(splits: data.Splits) -> None:
    class Stop(Exception):
        pass

    epochs: list[int] = []

    def hook(epoch: int, logs: dict) -> None:
        epochs.append(epoch)
        raise Stop

    with pytest.raises(Stop):
        train.train(TrainConfig(**SMALL), splits, epochs=5, seed=0, on_epoch=[hook])
    assert epochs == [0]


def test_non_finite_loss_raises_diverged() -> None:
    hooks = train._Hooks([])
    hooks.set_model(keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)]))
    hooks.model.compile(optimizer="sgd", loss="mse")
    hooks.on_epoch_begin(0)
    with pytest.raises(train.Diverged, match="loss is nan"):
        hooks.on_epoch_end(0, {"loss": float("nan")})


def test_stop_after_ends_early_but_keeps_the_full_schedule(splits: data.Splits) -> None:
    cfg = TrainConfig(**SMALL, batch_size=16, learning_rate=0.1, lr_schedule="cosine")
    full = train.train(cfg, splits, epochs=4, seed=5)
    cut = train.train(cfg, splits, epochs=4, seed=5, stop_after=2)
    assert len(cut.history["loss"]) == 2
    # the first two epochs of the 4-epoch run, not a 2-epoch run (whose cosine ends at 0)
    assert cut.history["learning_rate"] == full.history["learning_rate"][:2]
    assert cut.history["learning_rate"][1] > 0.01


def test_same_seed_same_numbers_another_seed_other_numbers(splits: data.Splits) -> None:
    cfg = TrainConfig(**SMALL, batch_size=16)
    runs = [train.train(cfg, splits, epochs=2, seed=s) for s in (3, 3, 4)]
    keys = ("loss", "accuracy", "val_loss", "val_accuracy")
    assert all(runs[0].history[k] == runs[1].history[k] for k in keys)  # bit for bit
    np.testing.assert_array_equal(runs[0].y_prob, runs[1].y_prob)
    assert runs[0].history["loss"] != runs[2].history["loss"]
