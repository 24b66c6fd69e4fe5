"""Models and training on 64 synthetic images: shapes, augmentation, schedules, hooks, divergence."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from cifar_exp import data
from cifar_exp.config import TrainConfig
from cifar_exp.training import feed, layers, models, optimizers, train
from cifar_exp.training.clock import Clock
from tests.conftest import synthetic_images, synthetic_splits

pytestmark = pytest.mark.keras  # run again under every backend (README, "Test")

SMALL = dict(blocks=2, filters=4, convs_per_block=1, dense_units=8)


def record(logs: list[dict]) -> train.Observer:
    """A callback that appends a copy of each epoch's logs to ``logs``."""
    return train.Observer(on_epoch_end=lambda epoch, epoch_logs: logs.append(dict(epoch_logs)))


@pytest.fixture(scope="module")
def splits() -> data.Splits:
    return synthetic_splits()


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
    layer = layers.RandomTranslate(0.125, seed=3)
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


STEPS, EPOCHS, PEAK = 10, 4, 0.1  # 40 optimizer steps
_s = np.arange(STEPS * EPOCHS, dtype=np.float64)
_cos = lambda done: 0.5 * (1 + np.cos(np.pi * done))
_start, _end, _warm = PEAK / 25, PEAK / 1e4, 0.25 * STEPS * EPOCHS
CURVES = {
    "constant": ({}, np.full_like(_s, PEAK)),
    "step": (dict(step_stages=2, step_factor=0.5), np.where(_s < 20, PEAK, PEAK * 0.5)),
    "exponential": (dict(decay_rate=0.5), PEAK * 0.5 ** (_s / STEPS)),
    "cosine": ({}, PEAK * _cos(_s / 40)),
    "cosine_warmup": (dict(warmup_epochs=1), np.where(_s < 10, PEAK * _s / 10, PEAK * _cos((_s - 10) / 30))),
    "one_cycle": (dict(warmup_fraction=0.25), np.where(
        _s < _warm, _start + (PEAK - _start) * _s / _warm, _end + (PEAK - _end) * _cos((_s - _warm) / (39 - _warm)))),
}


@pytest.mark.parametrize("schedule", sorted(CURVES))
def test_every_schedule_follows_its_closed_form_at_every_step(schedule: str) -> None:
    options, expected = CURVES[schedule]
    cfg = TrainConfig(learning_rate=PEAK, lr_schedule=schedule, **options)
    lr = optimizers.learning_rate(cfg, epochs=EPOCHS, steps_per_epoch=STEPS)
    values = [float(keras.ops.convert_to_numpy(lr(s))) if callable(lr) else lr for s in range(len(_s))]
    np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-9)


def test_step_schedule_drops_a_hundredfold_in_three_stages() -> None:
    cfg = TrainConfig(learning_rate=0.01, lr_schedule="step", step_stages=3, step_factor=0.1)
    schedule = optimizers.learning_rate(cfg, epochs=3, steps_per_epoch=10)
    values = [float(keras.ops.convert_to_numpy(schedule(s))) for s in (0, 9, 10, 19, 20, 29)]
    np.testing.assert_allclose(values, [0.01, 0.01, 0.001, 0.001, 0.0001, 0.0001], rtol=1e-5)


def test_plateau_halves_the_logged_rate_exactly_when_val_loss_stalls(splits: data.Splits) -> None:
    cfg = TrainConfig(**SMALL, learning_rate=0.01, lr_schedule="plateau", plateau_patience=1,
                      plateau_factor=0.5, batch_size=16)
    logs: list[dict] = []
    train.train(cfg, splits, epochs=6, seed=0, callbacks=[record(logs)])
    # Replay Keras' rule on the logged val_loss: an epoch that does not beat the best by
    # min_delta (1e-4) adds to the wait; at `patience` the rate is multiplied by the factor.
    rate, best, wait, expected = 0.01, math.inf, 0, []
    for entry in logs:
        expected.append(rate)
        if entry["val_loss"] < best - 1e-4:
            best, wait = entry["val_loss"], 0
        else:
            wait += 1
            if wait >= 1:
                rate, wait = rate * 0.5, 0
    np.testing.assert_allclose([entry["learning_rate"] for entry in logs], expected, rtol=1e-6)
    assert expected[-1] < 0.01  # the data were chosen so that it stalls (random labels)


@pytest.mark.parametrize("scaling, factor", [("none", 1.0), ("linear", 4.0), ("sqrt", 2.0)])
def test_learning_rate_scales_with_batch_size(splits: data.Splits, scaling: str, factor: float) -> None:
    cfg = TrainConfig(**SMALL, learning_rate=0.001, lr_scaling=scaling, batch_size=32, base_batch_size=8)
    assert cfg.peak_learning_rate == pytest.approx(0.001 * factor)
    logs: list[dict] = []
    train.train(cfg, splits, epochs=1, seed=0, callbacks=[record(logs)])
    assert logs[0]["learning_rate"] == pytest.approx(0.001 * factor, rel=1e-6)  # the realized rate


def test_cutout_zeroes_one_square_per_image_and_nothing_else() -> None:
    layer = layers.Cutout(8, seed=1)
    images = np.random.default_rng(0).uniform(0.1, 1.0, (16, 32, 32, 3)).astype("float32")
    out = keras.ops.convert_to_numpy(layer(images, training=True))
    for original, cut in zip(images, out, strict=True):
        zero = np.all(cut == 0, axis=-1)
        rows, cols = np.nonzero(zero)
        assert zero.any(), "no square was cut"
        height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert height <= 8 and width <= 8 and zero.sum() == height * width  # one rectangle, clipped
        np.testing.assert_array_equal(cut[~zero], original[~zero])
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(images, training=False)), images)


def test_cnn_options_shape_the_layers() -> None:
    cfg = TrainConfig(**{**SMALL, "blocks": 3}, dropout=0.2, dropout_growth=0.1, pooling="avg", bn_momentum=0.9,
                      head="global_max", cutout=4)
    train_model, model = models.build(cfg, 10)
    cnn = model.get_layer("cnn")
    rates = [float(keras.ops.convert_to_numpy(l.rate)) for l in cnn.layers if isinstance(l, layers.RuntimeDropout)]
    assert rates[:3] == pytest.approx([0.2, 0.3, 0.4])  # growing per block, then the head's
    assert sum(isinstance(l, keras.layers.AveragePooling2D) for l in cnn.layers) == 3
    assert not any(isinstance(l, keras.layers.MaxPooling2D) for l in cnn.layers)
    assert {l.momentum for l in cnn.layers if isinstance(l, keras.layers.BatchNormalization)} == {0.9}
    assert any(isinstance(l, keras.layers.GlobalMaxPooling2D) for l in cnn.layers)
    assert "cutout" in {l.name for l in train_model.layers} and "cutout" not in {l.name for l in model.layers}


def test_full_batches_are_full_reshuffled_by_epoch_and_seeded() -> None:
    x = np.arange(50)[:, None]
    batches = feed.FullBatches(x, x * 10, batch_size=16, seed=3)
    assert len(batches) == 3
    epochs = []
    for epoch in range(2):
        batches.start(epoch)
        seen = [batches[i] for i in range(len(batches))]
        assert all(len(bx) == 16 and np.array_equal(by, bx * 10) for bx, by in seen)
        images = np.concatenate([bx for bx, _ in seen]).ravel()
        assert len(set(images)) == 48  # no image twice in an epoch
        epochs.append(images)
        batches.on_epoch_end()  # Keras' calls, however many, do not move the order
        batches.on_epoch_end()
    assert not np.array_equal(epochs[0], epochs[1])
    again = feed.FullBatches(x, x * 10, batch_size=16, seed=3)
    np.testing.assert_array_equal(np.concatenate([again[i][0] for i in range(3)]).ravel(), epochs[0])
    small = feed.FullBatches(x[:5], x[:5], batch_size=16, seed=0)  # fewer images than a batch
    assert len(small) == 1 and len(small[0][0]) == 5


def test_whitening_decorrelates_and_centres_image_patches() -> None:
    x, _ = synthetic_images(64)
    x = (x.astype(np.float64) * 0.5 + np.roll(x, 1, axis=2) * 0.5).astype("uint8")  # correlated neighbours
    kernel, bias = models.whitening(x, eps=1e-6)
    assert kernel.shape == (2, 2, 3, 24) and bias.shape == (24,)
    patches = np.lib.stride_tricks.sliding_window_view(x / 255.0, (2, 2), axis=(1, 2))
    out = patches.transpose(0, 1, 2, 4, 5, 3).reshape(-1, 12) @ kernel.reshape(12, 24) + bias
    np.testing.assert_allclose(out.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(np.cov(out[:, :12], rowvar=False), np.eye(12), atol=1e-2)
    np.testing.assert_allclose(out[:, 12:], -out[:, :12], atol=1e-5)  # each filter and its negation


def test_airbench_whitens_then_pools_after_each_block_s_first_conv() -> None:
    x, _ = synthetic_images(64)
    cfg = TrainConfig(model="airbench", blocks=3, filters=4, filter_growth=2.0, convs_per_block=2, head="global_max",
                      dense_units=0, dropout=0.0, activation="gelu")
    _, model = models.build(cfg, 10, images=x)
    net = model.get_layer("airbench")
    whiten = net.get_layer(models.WHITEN_LAYER)
    assert not whiten.trainable and whiten.count_params() == 2 * 2 * 3 * 24 + 24
    kernel, bias = models.whitening(x)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(whiten.kernel), kernel)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(whiten.bias), bias)
    kinds = [type(l).__name__ for l in net.layers if type(l).__name__ in ("Conv2D", "MaxPooling2D")]
    assert kinds == ["Conv2D"] + ["Conv2D", "MaxPooling2D", "Conv2D"] * 3
    widths = [l.filters for l in net.layers if isinstance(l, keras.layers.Conv2D)][1:]
    assert widths == [4, 4, 8, 8, 8, 8]  # filters, then filters * growth once
    probs = keras.ops.convert_to_numpy(model(x[:3]))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_mixed_bfloat16_computes_in_bfloat16_and_leaves_the_global_policy_alone(splits: data.Splits) -> None:
    cfg = TrainConfig(**SMALL, precision="mixed_bfloat16", batch_size=16)
    _, model = models.build(cfg, 10)
    convs = [l for l in model.get_layer("cnn").layers if isinstance(l, keras.layers.Conv2D)]
    assert {(l.compute_dtype, l.variable_dtype) for l in convs} == {("bfloat16", "float32")}
    assert keras.config.dtype_policy().name == "float32"
    result = train.train(cfg, splits, epochs=1, seed=0)
    assert result.y_prob.dtype == np.float32 and math.isfinite(result.history["loss"][0])
    assert keras.config.dtype_policy().name == "float32"


@pytest.mark.parametrize("name, cls", [("adam", "Adam"), ("adamax", "Adamax"), ("sgd", "SGD"), ("adamw", "AdamW")])
def test_optimizers(name: str, cls: str) -> None:
    opt = optimizers.optimizer(TrainConfig(optimizer=name, momentum=0.8, weight_decay=0.01), 2, 5)
    assert type(opt).__name__ == cls
    value = lambda v: float(keras.ops.convert_to_numpy(v))
    if name == "sgd":
        assert value(opt.momentum) == pytest.approx(0.8) and opt.nesterov
    if name in ("sgd", "adamw"):
        assert value(opt.weight_decay) == pytest.approx(0.01)
        assert any(v is opt.weight_decay for v in opt.variables)  # state of the compiled step, not a constant


def test_train_reports_every_epoch_and_evaluates_on_test(splits: data.Splits) -> None:
    seen: list[tuple[int, dict]] = []
    cfg = TrainConfig(**SMALL, batch_size=16, lr_schedule="exponential", decay_rate=0.5, label_smoothing=0.1)
    result = train.train(cfg, splits, epochs=3, seed=0,
                         callbacks=[train.Observer(on_epoch_end=lambda e, logs: seen.append((e, dict(logs))))])
    assert [e for e, _ in seen] == [0, 1, 2]
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "epoch_seconds"):
        assert len(result.history[key]) == 3 and all(key in logs for _, logs in seen)
    lr = result.history["learning_rate"]
    assert lr[0] > lr[1] > lr[2]  # realized rate, per epoch
    assert result.y_prob.shape == (20, 10) and 0.0 <= result.test_accuracy <= 1.0
    assert result.test_accuracy == float(np.mean(result.y_prob.argmax(axis=1) == splits.y_test))
    # test_loss is computed in numpy from one predict pass; it must equal Keras' own evaluation
    result.model.compile(loss=keras.losses.CategoricalCrossentropy(label_smoothing=0.1), metrics=["accuracy"])
    loss, accuracy = result.model.evaluate(splits.x_test, np.eye(10)[splits.y_test], verbose=0)
    assert math.isclose(result.test_loss, loss, rel_tol=1e-4)
    assert math.isclose(result.test_accuracy, accuracy, rel_tol=1e-6)


@pytest.mark.parametrize("batch_size", [16, 64])  # 3 steps an epoch; one step an epoch
def test_the_first_step_is_reported_once_with_the_seconds_since_start(splits: data.Splits, batch_size: int) -> None:
    import time

    seen: list[float] = []
    epochs: list[float] = []
    started = time.perf_counter() - 5.0  # the trial began 5 s before training was called
    cfg = TrainConfig(**SMALL, batch_size=batch_size)
    watch = train.Observer(on_first_step=seen.append,
                           on_epoch_end=lambda e, logs: epochs.append(time.perf_counter() - started))
    train.train(cfg, splits, epochs=2, seed=0, callbacks=[watch], options=train.TrainOptions(started=started))
    assert len(seen) == 1
    assert 5.0 < seen[0] <= epochs[0]  # includes the time before the call, within the first epoch


def test_a_hook_that_raises_stops_training(splits: data.Splits) -> None:
    class Stop(Exception):
        pass

    epochs: list[int] = []

    def hook(epoch: int, logs: dict) -> None:
        epochs.append(epoch)
        raise Stop

    with pytest.raises(Stop):
        train.train(TrainConfig(**SMALL), splits, epochs=5, seed=0, callbacks=[train.Observer(on_epoch_end=hook)])
    assert epochs == [0]


def test_non_finite_loss_raises_diverged() -> None:
    hooks = train._Hooks(images=64, started=0.0, observers=[], clock=Clock())
    hooks.set_model(keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)]))
    hooks.model.compile(optimizer="sgd", loss="mse")
    hooks.on_epoch_begin(0)
    with pytest.raises(train.Diverged, match="loss is nan"):
        hooks.on_epoch_end(0, {"loss": float("nan")})


def test_stop_after_ends_early_but_keeps_the_full_schedule(splits: data.Splits) -> None:
    cfg = TrainConfig(**SMALL, batch_size=16, learning_rate=0.1, lr_schedule="cosine")
    full = train.train(cfg, splits, epochs=4, seed=5)
    cut = train.train(cfg, splits, epochs=4, seed=5, options=train.TrainOptions(stop_after=2))
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


class _Applied(keras.callbacks.Callback):
    """Records the rate each optimizer step applies (read before the step, as the step reads it)."""

    def __init__(self) -> None:
        super().__init__()
        self.epochs: list[list[float]] = []

    def on_epoch_begin(self, epoch, logs=None):  # type: ignore[no-untyped-def]
        self.epochs.append([])

    def on_train_batch_begin(self, batch, logs=None):  # type: ignore[no-untyped-def]
        self.epochs[-1].append(float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))


@pytest.mark.parametrize("schedule, options", [
    ("step", dict(step_stages=3, step_factor=0.1)), ("exponential", dict(decay_rate=0.5)), ("cosine", {}),
    ("cosine_warmup", dict(warmup_epochs=1)), ("one_cycle", dict(warmup_fraction=0.3)),
    ("plateau", dict(plateau_patience=1, plateau_factor=0.5)),
])
def test_the_logged_learning_rate_is_the_rate_each_epoch_trained_at(
        splits: data.Splits, monkeypatch: pytest.MonkeyPatch, schedule: str, options: dict) -> None:
    applied = _Applied()
    original = train._fit

    def fit(*args, **kwargs):  # type: ignore[no-untyped-def]
        return original(*args, **{**kwargs, "callbacks": [*kwargs["callbacks"], applied]})

    monkeypatch.setattr(train, "_fit", fit)
    cfg = TrainConfig(**SMALL, learning_rate=0.01, lr_schedule=schedule, batch_size=8, **options)
    logs: list[dict] = []
    train.train(cfg, splits, epochs=3, seed=0, callbacks=[record(logs)])
    assert len(applied.epochs) == 3 and all(len(steps) > 1 for steps in applied.epochs)
    np.testing.assert_allclose([entry["learning_rate"] for entry in logs], [s[0] for s in applied.epochs], rtol=1e-6)
    if schedule == "plateau":  # a constant rate within each epoch: no second value
        assert "learning_rate_last" not in logs[0]
    else:
        np.testing.assert_allclose([entry["learning_rate_last"] for entry in logs], [s[-1] for s in applied.epochs],
                                   rtol=1e-6)
    if schedule == "step":  # the three stages, in the epochs that trained at them
        np.testing.assert_allclose([entry["learning_rate"] for entry in logs], [0.01, 0.001, 0.0001], rtol=1e-5)
