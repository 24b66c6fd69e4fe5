"""The CNN family CIFAR-10 notebooks use, built from plain values (a ``TrainConfig``).

``build(cfg, num_classes)`` returns two models that share every weight:
- ``train_model``: uint8 images -> rescale -> augmentation -> classifier (what ``fit`` sees);
- ``inference_model``: float32 pixel values 0..255 -> rescale -> classifier (what is evaluated
  and logged; uint8 images work as they are).
Augmentation is identity at inference anyway; leaving it out of the logged model means the
model file holds only stock Keras layers and loads without this package installed.
"""

from __future__ import annotations

import keras

from cifar_exp.config import TrainConfig

INPUT_SHAPE = (32, 32, 3)


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


def _activation(name: str) -> keras.layers.Layer:
    if name == "leaky_relu":
        return keras.layers.LeakyReLU(negative_slope=0.1)  # the notebooks' slope
    return keras.layers.Activation(name)


def build_classifier(cfg: TrainConfig, num_classes: int) -> keras.Model:
    """Float images in [0, 1] -> class probabilities: conv blocks, then the head."""
    inputs = keras.Input(INPUT_SHAPE, name="pixels")
    x = inputs
    size = INPUT_SHAPE[0]
    for block in range(cfg.blocks):
        width = max(1, round(cfg.filters * cfg.filter_growth**block))
        for _ in range(cfg.convs_per_block):
            x = keras.layers.Conv2D(width, 3, padding="same", use_bias=not cfg.batch_norm)(x)
            if cfg.batch_norm:
                x = keras.layers.BatchNormalization()(x)
            x = _activation(cfg.activation)(x)
        if size >= 2:
            x = keras.layers.MaxPooling2D(2)(x)
            size //= 2
        if cfg.dropout > 0:
            x = keras.layers.Dropout(cfg.dropout)(x)
    x = keras.layers.Flatten()(x) if cfg.head == "flatten" else keras.layers.GlobalAveragePooling2D()(x)
    if cfg.dense_units:
        x = keras.layers.Dense(cfg.dense_units)(x)
        x = _activation(cfg.activation)(x)
    if cfg.head_dropout > 0:
        x = keras.layers.Dropout(cfg.head_dropout)(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="probs")(x)
    return keras.Model(inputs, outputs, name="cnn")


def build(cfg: TrainConfig, num_classes: int, seed: int | None = None) -> tuple[keras.Model, keras.Model]:
    """``(train_model, inference_model)`` sharing weights, both on ``(N, 32, 32, 3)`` pixel values
    0..255: the train model takes uint8 (what the data pipeline feeds), the inference model float32."""
    classifier = build_classifier(cfg, num_classes)
    inputs = keras.Input(INPUT_SHAPE, dtype="uint8", name="image")
    scaled = keras.layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    x = scaled
    if cfg.flip:
        x = keras.layers.RandomFlip("horizontal", seed=seed, name="flip")(x)
    if cfg.translate > 0:
        x = RandomTranslate(cfg.translate, seed=seed, name="translate")(x)
    train_model = keras.Model(inputs, classifier(x), name="cnn_train")
    # The served model takes float32 pixel values 0..255: Keras converts uint8 arrays exactly, and
    # MLflow parses a REST request's integer or float pixels to the signature's float32.
    pixels = keras.Input(INPUT_SHAPE, dtype="float32", name="image")
    inference_model = keras.Model(pixels, classifier(keras.layers.Rescaling(1.0 / 255, name="rescale")(pixels)),
                                  name="cnn_inference")
    return train_model, inference_model
