"""Compiled programs reused across trials (``programs``): runtime values instead of constants,
bit-identical numbers, no new compilation under JAX, stock layers in the logged model."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import pytest

from cifar_exp import data
from cifar_exp.config import TrainConfig
from cifar_exp.training import layers, models, optimizers, programs, train
from tests.conftest import synthetic_splits

# Tests marked keras run again under every backend (README, "Test"); the bookkeeping ones
# (keys, capacity, what is never reused) once.

SMALL = dict(blocks=2, filters=4, convs_per_block=1, dense_units=8, batch_size=16)
# Two trials of one structure that differ in every runtime value a sweep searches.
FIRST = TrainConfig(**SMALL, optimizer="sgd", learning_rate=0.05, momentum=0.9, weight_decay=1e-3, dropout=0.3,
                    head_dropout=0.5, lr_schedule="cosine", label_smoothing=0.0)
SECOND = dataclasses.replace(FIRST, learning_rate=0.01, momentum=0.5, weight_decay=1e-2, dropout=0.1,
                             dropout_growth=0.1, head_dropout=0.2, lr_schedule="step", step_stages=2,
                             step_factor=0.3, label_smoothing=0.1)


@pytest.fixture(scope="module")
def splits() -> data.Splits:
    return synthetic_splits()


def test_runtime_values_share_a_structure_and_the_rest_does_not() -> None:
    shapes = ((48, 32, 32, 3), (16, 32, 32, 3), (20, 32, 32, 3))
    assert programs.structure(FIRST, shapes, 10) == programs.structure(SECOND, shapes, 10)
    for change in (dict(filters=8), dict(batch_size=32), dict(nesterov=False), dict(optimizer="adam"),
                   dict(head_dropout=0.0), dict(bn_momentum=0.5), dict(precision="mixed_bfloat16")):
        assert programs.structure(dataclasses.replace(FIRST, **change), shapes, 10) != programs.structure(
            FIRST, shapes, 10), change
    assert programs.structure(FIRST, ((40, 32, 32, 3), *shapes[1:]), 10) != programs.structure(FIRST, shapes, 10)
    assert programs.RUNTIME < {f.name for f in dataclasses.fields(TrainConfig)}


@pytest.mark.keras
def test_a_reused_program_gives_a_fresh_builds_numbers_bit_for_bit(splits: data.Splits,
                                                                    compiles_afresh: None) -> None:
    kept = programs.Programs()
    first = train.train(FIRST, splits, epochs=2, seed=3, options=train.TrainOptions(programs=kept))
    keras.backend.clear_session()  # as a worker does between trials
    reused = train.train(SECOND, splits, epochs=2, seed=4, options=train.TrainOptions(programs=kept))
    keras.backend.clear_session()
    fresh = train.train(SECOND, splits, epochs=2, seed=4)
    assert (first.compiled, reused.compiled, len(kept)) == ("new", "reused", 1)
    timing = {"epoch_seconds", "images_per_second"}
    numbers = lambda r: {k: v for k, v in r.history.items() if k not in timing}
    assert numbers(reused) == numbers(fresh) and "learning_rate_last" in numbers(fresh)
    np.testing.assert_array_equal(reused.y_prob, fresh.y_prob)
    assert reused.history["loss"] != first.history["loss"]
    assert reused.phases["compile_seconds"] == 0.0
    assert set(reused.phases) == {"build_seconds", "compile_seconds", "fit_seconds", "predict_seconds", "model_seconds"}
    if keras.backend.backend() == "jax":  # the compile events say none was compiled
        assert first.compilations and reused.compilations == 0


@pytest.mark.keras
def test_the_logged_model_is_stock_layers_and_outlives_the_next_trial(splits: data.Splits) -> None:
    kept = programs.Programs()
    first = train.train(FIRST, splits, epochs=1, seed=3, options=train.TrainOptions(programs=kept))
    before = np.asarray(first.model.predict(splits.x_test, verbose=0))
    np.testing.assert_allclose(before, first.y_prob, rtol=1e-5, atol=1e-6)
    # retrains the kept program's weights
    train.train(SECOND, splits, epochs=1, seed=4, options=train.TrainOptions(programs=kept))
    np.testing.assert_array_equal(np.asarray(first.model.predict(splits.x_test, verbose=0)), before)
    cnn = first.model.get_layer("cnn")
    assert not any(isinstance(layer, layers.RuntimeDropout) for layer in cnn.layers)
    assert [layer.rate for layer in cnn.layers if isinstance(layer, keras.layers.Dropout)] == pytest.approx(
        [0.3, 0.3, 0.5])


def test_programs_keep_the_most_recent_structures() -> None:
    kept = programs.Programs(capacity=2)
    one, two, three = (programs.Program(train_model=None, model=None) for _ in range(3))  # type: ignore[arg-type]
    kept.keep("a", one)
    kept.keep("b", two)
    kept.keep("a", one)  # kept again: now the most recent
    kept.keep("c", three)  # past capacity: the oldest, b, goes
    assert len(kept) == 2
    assert kept.reuse("b", None, None) is None  # type: ignore[arg-type]  (nothing kept: nothing copied)


def test_a_transfer_trial_with_a_fine_tuning_phase_builds_its_own(splits: data.Splits) -> None:
    cfg = TrainConfig(model="transfer", backbone="vgg16", weights="none", image_size=32, frozen_layers=15,
                      fine_tune_epochs=1, fine_tune_layers=2, dense_units=0, batch_size=16, flip=False, translate=0.0)
    kept = programs.Programs()
    result = train.train(cfg, splits, epochs=2, seed=0, options=train.TrainOptions(programs=kept))
    assert result.compiled == "new" and len(kept) == 0


@pytest.mark.keras
def test_runtime_dropout_drops_at_its_current_rate_and_only_in_training() -> None:
    layer = layers.RuntimeDropout(0.5, seed=0)
    x = np.ones((64, 256), dtype="float32")
    out = keras.ops.convert_to_numpy(layer(x, training=True))
    assert set(np.unique(out)) == {0.0, 2.0} and 0.4 < (out == 0).mean() < 0.6  # 16,384 draws
    layer.rate.assign(0.25)
    out = keras.ops.convert_to_numpy(layer(x, training=True))
    assert set(np.unique(out)) == {0.0, np.float32(1 / 0.75)} and 0.2 < (out == 0).mean() < 0.3
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(x, training=False)), x)


@pytest.mark.keras
def test_one_schedule_object_takes_every_shape_from_its_variables() -> None:
    schedule = optimizers.learning_rate(TrainConfig(learning_rate=0.1, lr_schedule="cosine"), 4, 10)
    rates = lambda: [float(keras.ops.convert_to_numpy(schedule(s))) for s in (0, 20, 39)]
    assert rates()[0] == pytest.approx(0.1) and rates()[1] == pytest.approx(0.05, rel=1e-4)
    numbers = optimizers.schedule_numbers(TrainConfig(learning_rate=0.2, lr_schedule="step", step_stages=2,
                                                      step_factor=0.5), 4, 10)
    for name, value in numbers.items():
        schedule.values[name].assign(value)
    assert rates() == pytest.approx([0.2, 0.1, 0.1])
    assert schedule.per_step


def test_models_build_their_dropout_rates_into_variables() -> None:
    _, model = models.build(FIRST, 10)
    weights = [w for w in model.non_trainable_weights if w.path.endswith("rate")]
    assert len(weights) == 3
