"""The models of a sweep, built from plain values (a ``TrainConfig``): the classic CNN family
(Conv, BatchNorm, pooling, dropout), the airbench family, or a ``keras.applications`` backbone with
frozen layers and a new head.

``build(cfg, num_classes)`` returns two models that share every weight:
- ``train_model``: uint8 images -> rescale -> augmentation -> classifier (what ``fit`` sees);
- ``inference_model``: float32 pixel values 0..255 -> rescale -> classifier (what is evaluated
  and logged; uint8 images work as they are).
Augmentation is identity at inference anyway; leaving it out of the logged model means the
model file holds only stock Keras layers and loads without this package installed.
"""

from __future__ import annotations

import fcntl
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import keras
import numpy as np

from cifar_exp.config import TrainConfig, UserError
from cifar_exp.training import layers
from cifar_exp.training.layers import Cutout, RandomTranslate, RuntimeDropout

INPUT_SHAPE = (32, 32, 3)


class WeightsUnavailable(UserError):
    """The ImageNet weights of a backbone can neither be found in Keras' cache nor downloaded."""


@dataclass(frozen=True)
class Backbone:
    """A ``keras.applications`` model: its constructor, the smallest input side it takes (the
    default ``image_size``), and the pixel scaling its weights expect."""

    constructor: str
    min_size: int
    # "tf": [-1, 1]; "caffe": BGR minus the ImageNet channel means; "raw": 0..255 (the model
    # rescales itself).
    preprocessing: Literal["tf", "caffe", "raw"]


# MobileNetV2 accepts 32 pixels but has ImageNet weights for 96..224 only; Xception needs 71.
BACKBONES = {
    "mobilenet_v2": Backbone("MobileNetV2", 96, "tf"),
    "vgg16": Backbone("VGG16", 32, "caffe"),
    "resnet50": Backbone("ResNet50", 32, "caffe"),
    "xception": Backbone("Xception", 71, "tf"),
    "efficientnet_b0": Backbone("EfficientNetB0", 32, "raw"),
}
BACKBONE_LAYER = "backbone"
_CAFFE_MEANS_BGR = (103.939, 116.779, 123.68)


def image_size(cfg: TrainConfig) -> int:
    """The side the backbone sees: ``cfg.image_size``, or the backbone's smallest if 0."""
    minimum = BACKBONES[cfg.backbone].min_size
    if cfg.image_size and cfg.image_size < minimum:
        raise ValueError(f"image_size {cfg.image_size} is below {cfg.backbone}'s minimum of {minimum}")
    return cfg.image_size or minimum


def _activation(name: str) -> keras.layers.Layer:
    if name == "leaky_relu":
        return keras.layers.LeakyReLU(negative_slope=0.1)  # 0.1: a gentler leak than Keras' default 0.3
    return keras.layers.Activation(name)


def _head(x, cfg: TrainConfig, num_classes: int):  # type: ignore[no-untyped-def]
    pool = {"flatten": keras.layers.Flatten, "global_avg": keras.layers.GlobalAveragePooling2D,
            "global_max": keras.layers.GlobalMaxPooling2D}[cfg.head]
    x = pool()(x)
    if cfg.dense_units:
        x = keras.layers.Dense(cfg.dense_units)(x)
        x = _activation(cfg.activation)(x)
    if cfg.head_dropout > 0:
        x = RuntimeDropout(cfg.head_dropout)(x)
    return keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="probs")(x)


def block_dropout(cfg: TrainConfig, block: int) -> float:
    """Dropout after conv block ``block`` (0-based): ``dropout + block * dropout_growth``, capped
    at 0.9 so that independently sampled rate and growth always build."""
    return min(cfg.dropout + block * cfg.dropout_growth, 0.9)


def build_cnn(cfg: TrainConfig, num_classes: int) -> keras.Model:
    """Float images in [0, 1] -> class probabilities: conv blocks, then the head."""
    inputs = keras.Input(INPUT_SHAPE, name="pixels")
    x = inputs
    size = INPUT_SHAPE[0]
    pool = keras.layers.MaxPooling2D if cfg.pooling == "max" else keras.layers.AveragePooling2D
    for block in range(cfg.blocks):
        width = max(1, round(cfg.filters * cfg.filter_growth**block))
        for _ in range(cfg.convs_per_block):
            x = keras.layers.Conv2D(width, 3, padding="same", use_bias=not cfg.batch_norm)(x)
            if cfg.batch_norm:
                x = keras.layers.BatchNormalization(momentum=cfg.bn_momentum)(x)
            x = _activation(cfg.activation)(x)
        if size >= 2:
            x = pool(2)(x)
            size //= 2
        if block_dropout(cfg, block) > 0:
            x = RuntimeDropout(block_dropout(cfg, block))(x)
    return keras.Model(inputs, _head(x, cfg, num_classes), name="cnn")


WHITEN_LAYER = "whiten"
WHITEN_IMAGES = 5000  # airbench's choice: the patch statistics of 5,000 training images


def whitening(images: np.ndarray, eps: float = 5e-4) -> tuple[np.ndarray, np.ndarray]:
    """``(kernel, bias)`` of a 2x2 valid convolution that whitens the 2x2 patches of ``images``
    (uint8 or 0..255, scaled to [0, 1] as the classifier sees them): centred, projected on the
    eigenvectors of the patch covariance and scaled by ``1 / sqrt(eigenvalue + eps)``; each
    filter also appears negated (24 channels), so the activation after it loses no sign.
    Decision: the covariance is accumulated 500 images at a time (5,000 images' patches at once
    would be 460 MB of float64)."""
    count, total, outer = 0, np.zeros(12), np.zeros((12, 12))
    for start in range(0, len(images), 500):
        x = np.asarray(images[start:start + 500], dtype=np.float64) / 255.0
        patches = np.lib.stride_tricks.sliding_window_view(x, (2, 2), axis=(1, 2))  # n, 31, 31, 3, 2, 2
        flat = patches.transpose(0, 1, 2, 4, 5, 3).reshape(-1, 12)  # (row, column, channel): Conv2D's order
        count, total, outer = count + len(flat), total + flat.sum(axis=0), outer + flat.T @ flat
    mean = total / count
    eigenvalues, eigenvectors = np.linalg.eigh(outer / count - np.outer(mean, mean))
    filters = eigenvectors.T / np.sqrt(np.maximum(eigenvalues, 0.0) + eps)[:, None]  # (12 filters, 12)
    filters = np.concatenate([filters, -filters])
    kernel = filters.reshape(24, 2, 2, 3).transpose(1, 2, 3, 0)
    return kernel.astype("float32"), (-filters @ mean).astype("float32")


def build_airbench(cfg: TrainConfig, num_classes: int, images: np.ndarray | None = None) -> keras.Model:
    """Float images in [0, 1] -> class probabilities: the airbench network.

    A frozen 2x2 patch-whitening convolution (set from ``images``, see ``whitening``; random
    without them), then ``blocks`` VGG-like blocks whose first convolution is followed by 2x2
    max pooling, every convolution by BatchNorm (with ``batch_norm``) and the activation. Block 0
    has ``filters`` channels, later blocks ``filters * filter_growth`` (airbench94: 64, 256, 256
    is filters 64, growth 4). Pooling right after the first convolution runs the block's other
    convolutions on a quarter of the pixels: the recipe's main saving over the CNN family."""
    inputs = keras.Input(INPUT_SHAPE, name="pixels")
    whiten = keras.layers.Conv2D(24, 2, padding="valid", trainable=False, name=WHITEN_LAYER)
    x = _activation(cfg.activation)(whiten(inputs))
    pool = keras.layers.MaxPooling2D if cfg.pooling == "max" else keras.layers.AveragePooling2D
    for block in range(cfg.blocks):
        width = max(1, round(cfg.filters * cfg.filter_growth ** min(block, 1)))
        for conv in range(cfg.convs_per_block):
            x = keras.layers.Conv2D(width, 3, padding="same", use_bias=not cfg.batch_norm)(x)
            if conv == 0 and x.shape[1] >= 2:
                x = pool(2)(x)
            if cfg.batch_norm:
                x = keras.layers.BatchNormalization(momentum=cfg.bn_momentum)(x)
            x = _activation(cfg.activation)(x)
        if block_dropout(cfg, block) > 0:
            x = RuntimeDropout(block_dropout(cfg, block))(x)
    model = keras.Model(inputs, _head(x, cfg, num_classes), name="airbench")
    if images is not None:
        whiten.set_weights(list(whitening(images[:WHITEN_IMAGES])))
    return model


def backbone(cfg: TrainConfig, size: int | None = None) -> keras.Model:
    """The ``keras.applications`` backbone of ``cfg`` without its top, with ``cfg.weights``.
    Raises ``WeightsUnavailable`` when ImageNet weights are neither cached nor downloadable."""
    side = size or image_size(cfg)
    constructor = getattr(keras.applications, BACKBONES[cfg.backbone].constructor)
    weights = None if cfg.weights == "none" else cfg.weights
    try:
        # One process at a time downloads into Keras' cache: a worker must not load the partial
        # file another worker is still writing.
        with open(Path(tempfile.gettempdir()) / "cifar_exp-keras-weights.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return constructor(include_top=False, weights=weights, input_shape=(side, side, 3),
                               name=BACKBONE_LAYER)
    except Exception as exc:
        if weights != "imagenet" or "URL fetch failure" not in str(exc):
            raise
        reason = str(exc).splitlines()[0]
        raise WeightsUnavailable(
            f"cannot download the ImageNet weights of {cfg.backbone} ({reason}): run once on a connected "
            f"machine so that Keras caches them (~/.keras/models, or $KERAS_HOME/models), set weights to "
            f"the path of a local .weights.h5 file, or set weights: none") from None


def frozen_count(cfg: TrainConfig, layers: int) -> int:
    """How many of the backbone's ``layers`` (first ones) are frozen in the first phase."""
    if cfg.frozen_layers is not None:
        return min(cfg.frozen_layers, layers)
    return round(cfg.frozen_fraction * layers)


def set_trainable(model: keras.Model, trainable: list[bool]) -> None:
    """Set ``trainable`` per backbone layer; BatchNormalization layers stay frozen (and, as the
    backbone is called with ``training=False``, in inference mode), as Keras' transfer-learning
    guide does: updating their statistics on a new data set with small batches wrecks the
    features the frozen layers above them expect."""
    for layer, flag in zip(model.layers, trainable, strict=True):
        layer.trainable = flag and not isinstance(layer, keras.layers.BatchNormalization)


def build_transfer(cfg: TrainConfig, num_classes: int) -> keras.Model:
    """Float images in [0, 1] -> class probabilities: resize, the backbone's own pixel scaling,
    the backbone (first ``frozen_count`` layers frozen), then the head."""
    side = image_size(cfg)
    base = backbone(cfg, side)
    frozen = frozen_count(cfg, len(base.layers))
    set_trainable(base, [i >= frozen for i in range(len(base.layers))])
    inputs = keras.Input(INPUT_SHAPE, name="pixels")
    x = keras.layers.Resizing(side, side, interpolation="bilinear", name="resize")(inputs)
    scaling = BACKBONES[cfg.backbone].preprocessing
    if scaling == "tf":
        x = keras.layers.Rescaling(2.0, offset=-1.0, name="to_tf_range")(x)
    elif scaling == "raw":
        x = keras.layers.Rescaling(255.0, name="to_pixels")(x)
    else:
        # RGB -> BGR and mean subtraction as one frozen 1x1 convolution: a stock layer, so the
        # logged model loads with safe_mode (a Lambda layer would not).
        caffe = keras.layers.Conv2D(3, 1, trainable=False, name="to_caffe")
        x = caffe(x)
        caffe.set_weights([255.0 * np.eye(3, dtype="float32")[::-1].reshape(1, 1, 3, 3),
                           -np.array(_CAFFE_MEANS_BGR, dtype="float32")])
    x = base(x, training=False)
    return keras.Model(inputs, _head(x, cfg, num_classes), name="transfer")


def build_classifier(cfg: TrainConfig, num_classes: int, images: np.ndarray | None = None) -> keras.Model:
    """The classifier of ``cfg`` (float images in [0, 1] -> class probabilities); ``images`` are
    training images for data-dependent initialisation (airbench's whitening)."""
    if cfg.model == "transfer":
        return build_transfer(cfg, num_classes)
    if cfg.model == "airbench":
        return build_airbench(cfg, num_classes, images)
    return build_cnn(cfg, num_classes)


@contextmanager
def precision(policy: str) -> Iterator[None]:
    """Layers created inside take Keras' dtype policy ``policy`` (``TrainConfig.precision``); the
    global policy is restored after, so it never leaks into the next trial of a worker."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def find_backbone(model: keras.Model) -> keras.Model | None:
    """The transfer backbone inside ``model`` (at any depth), or None for a CNN."""
    for layer in model.layers:
        if layer.name == BACKBONE_LAYER:
            return layer
        if isinstance(layer, keras.Model) and (found := find_backbone(layer)) is not None:
            return found
    return None


def fine_tune(model: keras.Model, layers: int) -> int:
    """Unfreeze the top ``layers`` layers of ``model``'s backbone (BatchNormalization excepted;
    layers already trainable stay so). Returns how many layers became trainable."""
    base = find_backbone(model)
    if base is None:
        raise ValueError(f"model {model.name} has no backbone to fine-tune")
    before = [layer.trainable for layer in base.layers]
    top = len(base.layers) - min(layers, len(base.layers))
    set_trainable(base, [was or i >= top for i, was in enumerate(before)])
    return sum(layer.trainable and not was for layer, was in zip(base.layers, before, strict=True))


def build(cfg: TrainConfig, num_classes: int, seed: int | None = None,
          classifier: keras.Model | None = None,
          images: np.ndarray | None = None) -> tuple[keras.Model, keras.Model]:
    """``(train_model, inference_model)`` sharing weights, both on ``(N, 32, 32, 3)`` pixel values
    0..255: the train model takes uint8 (what the data pipeline feeds), the inference model float32.
    ``classifier`` (float images in [0, 1] -> probabilities) replaces ``cfg``'s model if given;
    ``images`` (training images) initialise data-dependent layers. Layers get ``cfg.precision``."""
    with precision(cfg.precision):
        return _build(cfg, num_classes, seed, classifier, images)


def _build(cfg: TrainConfig, num_classes: int, seed: int | None, classifier: keras.Model | None,
           images: np.ndarray | None) -> tuple[keras.Model, keras.Model]:
    classifier = classifier if classifier is not None else build_classifier(cfg, num_classes, images)
    inputs = keras.Input(INPUT_SHAPE, dtype="uint8", name="image")
    scaled = keras.layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    x = scaled
    if cfg.flip:
        x = keras.layers.RandomFlip("horizontal", seed=seed, name="flip")(x)
    if cfg.translate > 0:
        x = RandomTranslate(cfg.translate, seed=seed, name="translate")(x)
    if cfg.cutout > 0:
        x = Cutout(cfg.cutout, seed=seed, name="cutout")(x)
    train_model = keras.Model(inputs, classifier(x), name=f"{classifier.name}_train")
    # The served model takes float32 pixel values 0..255: Keras converts uint8 arrays exactly, and
    # MLflow parses a REST request's integer or float pixels to the signature's float32.
    pixels = keras.Input(INPUT_SHAPE, dtype="float32", name="image")
    inference_model = keras.Model(pixels, classifier(keras.layers.Rescaling(1.0 / 255, name="rescale")(pixels)),
                                  name=f"{classifier.name}_inference")
    return train_model, inference_model


def param_count(cfg: TrainConfig, num_classes: int) -> int:
    """The parameter count of ``cfg``'s inference model (what a trial logs as ``param_count``),
    known before training: the model is built, counted and let go, with Keras' session cleared
    after it as between trials (a trial's ``train`` seeds and builds its own)."""
    _, model = build(cfg, num_classes, seed=0)
    count = int(layers.portable(model).count_params())  # as logged: stock layers (no dropout seed state)
    keras.backend.clear_session()
    return count
