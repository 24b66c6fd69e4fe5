"""Transfer learning on 64 synthetic images: every backbone freezes exactly the layers asked,
frozen weights do not move, the second phase unfreezes exactly the top k, and weights come from
a local file, Keras' cache, a (local, fake) download server, or fail with one clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest

from cifar_exp import data
from cifar_exp.config import TrainConfig
from cifar_exp.training import models, train
from tests.conftest import ROOT, synthetic_images

HEAD = dict(model="transfer", weights="none", dense_units=0, head="global_avg", head_dropout=0.0, flip=False,
            translate=0.0)


def is_bn(layer: keras.layers.Layer) -> bool:
    return isinstance(layer, keras.layers.BatchNormalization)


@pytest.fixture(scope="module")
def splits() -> data.Splits:
    x, y = synthetic_images(64)
    xt, yt = synthetic_images(20, seed=1)
    return data.split(data.Cifar10(x, y, xt, yt, tuple("abcdefghij"), "synthetic", "0"), 0.25, 0)


@pytest.mark.parametrize("backbone", sorted(models.BACKBONES))
def test_frozen_layers_freeze_exactly_the_first_k_and_keep_batchnorm_frozen(backbone: str) -> None:
    fresh = models.backbone(TrainConfig(**HEAD, backbone=backbone))  # every layer trainable
    k = len(fresh.layers) // 2
    expected = sum(len(layer.weights) for layer in fresh.layers[k:] if not is_bn(layer))
    _, model = models.build(TrainConfig(**HEAD, backbone=backbone, frozen_layers=k), 10)
    base = models.find_backbone(model)
    assert base is not None and len(base.layers) == len(fresh.layers)
    assert len(base.trainable_weights) == expected
    assert not any(layer.trainable for layer in base.layers[:k])
    assert all(layer.trainable != is_bn(layer) for layer in base.layers[k:] if layer.weights)
    # the input is resized to what the backbone takes, and probabilities come out
    assert base.input_shape[1] == models.BACKBONES[backbone].min_size
    probs = keras.ops.convert_to_numpy(model(synthetic_images(2)[0].astype("float32")))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_frozen_fraction_counts_layers_of_the_backbone() -> None:
    _, model = models.build(TrainConfig(**HEAD, backbone="vgg16", frozen_fraction=0.5), 10)
    base = models.find_backbone(model)
    assert base is not None
    frozen = [layer.trainable for layer in base.layers].index(True)
    assert frozen == round(0.5 * len(base.layers)) == 10
    _, whole = models.build(TrainConfig(**HEAD, backbone="vgg16"), 10)  # default: all frozen
    assert models.find_backbone(whole).trainable_weights == []  # type: ignore[union-attr]


@pytest.mark.keras  # training: again under every backend; the rest is Keras' own bookkeeping
def test_training_moves_only_unfrozen_weights_and_phase_two_unfreezes_exactly_top_k(splits: data.Splits) -> None:
    cfg = TrainConfig(**HEAD, backbone="vgg16", frozen_layers=15, fine_tune_epochs=1, fine_tune_layers=6,
                      fine_tune_learning_rate=1e-4, learning_rate=1e-3, batch_size=16)
    keras.utils.set_random_seed(5)
    _, initial = models.build(cfg, 10, seed=5)  # what train() builds from the same seed
    before = {layer.name: [w.copy() for w in layer.get_weights()]
              for layer in models.find_backbone(initial).layers}  # type: ignore[union-attr]
    logs: list[dict] = []
    result = train.train(cfg, splits, epochs=2, seed=5,
                         callbacks=[train.Observer(on_epoch_end=lambda e, l: logs.append(dict(l)))])
    base = models.find_backbone(result.model)
    assert base is not None
    # VGG16 has 19 layers: 15 frozen in phase 1 (block5 trains), then the top 6 (block4_conv3
    # onwards) unfrozen; block4_conv1/conv2 (layers 11, 12) never train.
    assert [layer.name for layer in base.layers if layer.trainable and layer.weights] == [
        "block4_conv3", "block5_conv1", "block5_conv2", "block5_conv3"]
    for index, layer in enumerate(base.layers):
        if not layer.weights:
            continue
        moved = any(not np.array_equal(a, b) for a, b in zip(before[layer.name], layer.get_weights(), strict=True))
        assert moved == (index >= 13), f"{layer.name} moved={moved}"
    assert [entry["learning_rate"] for entry in logs] == pytest.approx([1e-3, 1e-4])  # phase 2's rate
    assert len(result.history["loss"]) == 2


def test_a_local_weights_file_is_loaded(tmp_path: Path) -> None:
    source = models.backbone(TrainConfig(**HEAD, backbone="mobilenet_v2"))
    path = tmp_path / "mobilenet.weights.h5"
    source.save_weights(path)
    loaded = models.backbone(TrainConfig(**{**HEAD, "weights": str(path)}, backbone="mobilenet_v2"))
    for a, b in zip(source.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


SCRIPT = textwrap.dedent("""
    import http.server, json, sys, threading
    import keras.src.applications.mobilenet_v2 as mobilenet_v2
    from cifar_exp.training import models
    from cifar_exp.config import TrainConfig, UserError
    serve = sys.argv[1]
    cfg = TrainConfig(model="transfer", backbone="mobilenet_v2", weights="imagenet")
    if serve != "none":
        handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=serve)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        mobilenet_v2.BASE_WEIGHT_PATH = f"http://127.0.0.1:{server.server_address[1]}/"
        first = models.backbone(cfg)
        server.shutdown(); server.server_close()  # the second build must come from the cache
    else:
        mobilenet_v2.BASE_WEIGHT_PATH = "http://127.0.0.1:9/"  # nothing listens on the discard port
    try:
        second = models.backbone(cfg)
    except UserError as exc:
        print(json.dumps({"error": str(exc)})); sys.exit(0)
    print(json.dumps({"sum": float(sum(abs(w).sum() for w in second.get_weights()))}))
""")


def run_script(serve: str, keras_home: Path) -> dict:
    env = {**os.environ, "KERAS_HOME": str(keras_home), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", SCRIPT, serve], capture_output=True, text=True, env=env,
                         timeout=300, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_imagenet_weights_download_once_then_come_from_keras_cache(tmp_path: Path) -> None:
    import h5py
    from keras.src.legacy.saving import legacy_h5_format  # Keras' own writer of its .h5 weight files

    served = tmp_path / "served"
    served.mkdir()
    model = models.backbone(TrainConfig(**HEAD, backbone="mobilenet_v2"))
    name = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_96_no_top.h5"
    with h5py.File(served / name, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    result = run_script(str(served), tmp_path / "keras")
    assert result["sum"] == pytest.approx(float(sum(abs(w).sum() for w in model.get_weights())), rel=1e-6)
    assert (tmp_path / "keras" / "models" / name).is_file()


def test_offline_without_weights_names_the_three_ways(tmp_path: Path) -> None:
    error = run_script("none", tmp_path / "empty")["error"]
    assert "cannot download the ImageNet weights of mobilenet_v2" in error
    assert "caches them" in error and ".weights.h5" in error and "weights: none" in error
    assert "\n" not in error
