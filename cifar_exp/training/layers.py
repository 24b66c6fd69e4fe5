"""The layers of this package: augmentation written as dense ops (``RandomTranslate``,
``Cutout``) and dropout whose rate is a runtime value (``RuntimeDropout``); ``portable`` turns a
model into one of stock Keras layers, the form a trial logs."""

from __future__ import annotations

import keras


class RandomTranslate(keras.layers.Layer):
    """Shift each image by up to ``fraction`` of its side (zero fill): pad, then crop by one-hot
    matrix products.

    Decision: Keras' RandomTranslation made a ResNet-9 epoch 35x slower on an H100 (JAX); a
    per-image crop written as two batched matmuls against one-hot row/column selectors is
    dense, compiles to plain GEMMs on every backend, and costs little next to a conv layer.
    """

    def __init__(self, fraction: float, seed: int | None = None, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.fraction = fraction
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=False):  # type: ignore[no-untyped-def]
        if not training or self.fraction <= 0:
            return images
        ops = keras.ops
        height, width = images.shape[1], images.shape[2]
        pad_h, pad_w = round(self.fraction * height), round(self.fraction * width)
        batch = ops.shape(images)[0]
        dy = keras.random.randint((batch,), 0, 2 * pad_h + 1, seed=self.seed_generator)
        dx = keras.random.randint((batch,), 0, 2 * pad_w + 1, seed=self.seed_generator)
        padded = ops.pad(images, [[0, 0], [pad_h, pad_h], [pad_w, pad_w], [0, 0]])
        rows = ops.one_hot(ops.arange(height)[None, :] + dy[:, None], height + 2 * pad_h,
                           dtype=images.dtype)
        cols = ops.one_hot(ops.arange(width)[None, :] + dx[:, None], width + 2 * pad_w,
                           dtype=images.dtype)
        shifted = ops.einsum("bik,bkwc->biwc", rows, padded)
        return ops.einsum("bjk,bikc->bijc", cols, shifted)

    def compute_output_shape(self, input_shape):  # type: ignore[no-untyped-def]
        return input_shape

    def get_config(self) -> dict[str, object]:
        return {**super().get_config(), "fraction": self.fraction, "seed": self.seed}


class Cutout(keras.layers.Layer):
    """Zero a ``size`` x ``size`` square at a random centre of each image (DeVries and Taylor,
    2017); the square may overlap the border. A mask built from index comparisons: no gathers,
    the same dense ops on every backend."""

    def __init__(self, size: int, seed: int | None = None, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.size = size
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=False):  # type: ignore[no-untyped-def]
        if not training or self.size <= 0:
            return images
        ops = keras.ops
        height, width = images.shape[1], images.shape[2]
        batch = ops.shape(images)[0]
        top = keras.random.randint((batch, 1), 0, height, seed=self.seed_generator) - self.size // 2
        left = keras.random.randint((batch, 1), 0, width, seed=self.seed_generator) - self.size // 2
        rows, cols = ops.arange(height)[None, :], ops.arange(width)[None, :]
        in_rows = ops.logical_and(rows >= top, rows < top + self.size)
        in_cols = ops.logical_and(cols >= left, cols < left + self.size)
        inside = ops.logical_and(in_rows[:, :, None], in_cols[:, None, :])
        return images * ops.cast(ops.logical_not(inside), images.dtype)[..., None]

    def compute_output_shape(self, input_shape):  # type: ignore[no-untyped-def]
        return input_shape

    def get_config(self) -> dict[str, object]:
        return {**super().get_config(), "size": self.size, "seed": self.seed}


class RuntimeDropout(keras.layers.Layer):
    """Dropout whose rate is a non-trainable weight, not a constant of the compiled step: trials
    that differ only in dropout run one compiled program (see ``programs``). Identity at
    inference; ``portable`` swaps it for Keras' own ``Dropout`` in the model a trial logs."""

    def __init__(self, rate: float, seed: int | None = None, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.initial_rate = float(rate)
        self.seed = seed
        self.rate = self.add_weight(shape=(), initializer=keras.initializers.Constant(rate), trainable=False,
                                    name="rate", autocast=False)
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_masking = True

    def call(self, inputs, training=False):  # type: ignore[no-untyped-def]
        if not training:
            return inputs
        # Keras' own dropout tests its rate in Python (``if rate == 0``), which a variable cannot
        # answer inside a compiled step: the same mask and scaling, written in ops.
        ops = keras.ops
        keep = ops.cast(keras.random.uniform(ops.shape(inputs), seed=self.seed_generator) >= self.rate, inputs.dtype)
        return inputs * keep / ops.cast(1.0 - self.rate, inputs.dtype)

    def compute_output_shape(self, input_shape):  # type: ignore[no-untyped-def]
        return input_shape

    def get_config(self) -> dict[str, object]:
        return {**super().get_config(), "rate": self.initial_rate, "seed": self.seed}


def _portable_layer(layer: keras.layers.Layer) -> keras.layers.Layer:
    if isinstance(layer, RuntimeDropout):
        return keras.layers.Dropout(float(keras.ops.convert_to_numpy(layer.rate)), name=layer.name)
    return layer.__class__.from_config(layer.get_config())


def _leaves(model: keras.Model) -> list[keras.layers.Layer]:
    return [leaf for layer in model.layers
            for leaf in (_leaves(layer) if isinstance(layer, keras.Model) else [layer])]


def portable(model: keras.Model) -> keras.Model:
    """A copy of ``model`` made of stock Keras layers only (``RuntimeDropout`` becomes ``Dropout``
    at its current rate), with copies of its weights: what a trial logs, so that the model file
    loads without this package, and so that the next trial of a worker that reuses the original
    (``programs``) cannot change it."""
    copy = keras.models.clone_model(model, clone_function=_portable_layer, recursive=True)
    for source, target in zip(_leaves(model), _leaves(copy), strict=True):
        if not isinstance(source, RuntimeDropout):
            target.set_weights(source.get_weights())
    return copy
