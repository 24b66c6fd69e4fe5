"""The loader: three source kinds decode to the same arrays, the cache, bad layouts, the split."""

from __future__ import annotations

import io
import os
import pickle
import re
import socket
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from cifar_exp import data
from cifar_exp.data import DataError

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")  # lossless: decoded pixels must match exactly
    return out.getvalue()


@pytest.fixture()
def arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    # labels class-major: the order in which a folder tree loads
    return {"x_train": rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8), "y_train": np.arange(30) // 3,
            "x_test": rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8), "y_test": np.arange(20) // 2}


def _entries(arrays: dict[str, np.ndarray]):
    for split in ("train", "test"):
        for i, (x, y) in enumerate(zip(arrays[f"x_{split}"], arrays[f"y_{split}"], strict=True)):
            yield f"{split}/{CLASSES[y]}/{i:04d}.png", _png(x)


def make_folder(root: Path, arrays: dict[str, np.ndarray]) -> Path:
    for name, blob in _entries(arrays):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(blob)
    return root


def make_batches(root: Path, arrays: dict[str, np.ndarray], names: list[str] | None = None) -> Path:
    """The official python format: pickled dicts with bytes keys, images as rows of 3072."""
    root.mkdir(parents=True)
    rows = lambda x: x.transpose(0, 3, 1, 2).reshape(len(x), -1)
    chunks = np.array_split(np.arange(len(arrays["y_train"])), 5)
    for i, idx in enumerate(chunks, 1):
        batch = {b"data": rows(arrays["x_train"][idx]), b"labels": arrays["y_train"][idx].tolist()}
        (root / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    test = {b"data": rows(arrays["x_test"]), b"labels": arrays["y_test"].tolist()}
    (root / "test_batch").write_bytes(pickle.dumps(test))
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [c.encode() for c in names or CLASSES]}))
    return root


def assert_same(loaded: data.Cifar10, arrays: dict[str, np.ndarray]) -> None:
    for key, value in arrays.items():
        np.testing.assert_array_equal(getattr(loaded, key), value)
    assert loaded.class_names == tuple(CLASSES)
    assert len(loaded.checksum) == 64


def test_image_folder(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    assert_same(data.load(str(make_folder(tmp_path / "tree", arrays))), arrays)


def test_zip_with_a_top_level_folder(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    path = tmp_path / "c.zip"
    with zipfile.ZipFile(path, "w") as z:
        for name, blob in _entries(arrays):
            z.writestr(f"cifar10/{name}", blob)
    assert_same(data.load(str(path)), arrays)


def test_official_tar_gz_and_extracted_folder(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    batches = make_batches(tmp_path / "cifar-10-batches-py", arrays)
    assert_same(data.load(str(batches)), arrays)
    assert_same(data.load(str(tmp_path)), arrays)  # the folder that holds cifar-10-batches-py/
    tar_path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(batches, arcname="cifar-10-batches-py")
    assert_same(data.load(str(tar_path)), arrays)


def test_batches_that_need_other_globals_are_refused(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    batches = make_batches(tmp_path / "b", arrays)
    (batches / "test_batch").write_bytes(pickle.dumps({b"data": Path("x"), b"labels": []}))
    with pytest.raises(DataError, match="refusing to load pathlib"):
        data.load(str(batches))


def test_second_load_reads_the_cache_and_a_corrupt_cache_is_rebuilt(
        tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    tree = make_folder(tmp_path / "tree", arrays)
    first = data.load(str(tree))
    (cached,) = data.cache_dir().glob("*.npz")
    # Prove the second load reads the cache, not the images: alter the cached labels.
    with np.load(cached) as z:
        tampered = {k: z[k] for k in z.files}
    tampered["y_test"] = (tampered["y_test"] + 1) % 10
    np.savez(cached, **tampered)
    assert (data.load(str(tree)).y_test == tampered["y_test"]).all()
    cached.write_bytes(cached.read_bytes()[:100])  # truncated: decoded again from the source
    np.testing.assert_array_equal(data.load(str(tree)).y_test, first.y_test)
    assert data.load(str(tree)).checksum == first.checksum


def test_changed_source_changes_the_checksum(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    tree = make_folder(tmp_path / "tree", arrays)
    before = data.load(str(tree)).checksum
    next(tree.glob("test/*/*.png")).write_bytes(_png(np.zeros((32, 32, 3), np.uint8)))
    assert data.load(str(tree)).checksum != before


@pytest.mark.parametrize("make, fragment", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "not a recognisable CIFAR-10 layout"),
    (lambda p: (p / "notes.txt").write_text("hi") and p / "notes.txt", "not a recognisable CIFAR-10 layout"),
])
def test_bad_sources_name_the_three_options(tmp_path: Path, make, fragment: str) -> None:
    with pytest.raises(DataError) as info:
        data.load(str(make(tmp_path)))
    message = str(info.value)
    assert fragment in message and "'keras'" in message and "tar.gz" in message and ".zip" in message


def test_wrong_image_size_names_the_file(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    tree = make_folder(tmp_path / "tree", arrays)
    Image.new("RGB", (64, 48)).save(tree / "train" / "cat" / "big.png")
    with pytest.raises(DataError, match=r"train/cat/big.png is 64x48"):
        data.load(str(tree))


def test_offline_keras_download_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No cached copy, and every HTTPS request goes to a closed port on this machine.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")
    with pytest.raises(DataError) as info:
        data.load("keras")
    assert "cannot download CIFAR-10 through Keras" in str(info.value)
    assert "tar.gz" in str(info.value) and ".zip" in str(info.value)


def test_the_keras_source_leaves_keras_out_of_a_process_without_it(tmp_path: Path) -> None:
    # The sweep command checks the data without importing Keras: a spawned child fetches it.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = ("import sys\nfrom cifar_exp import data\ntry:\n    data.load('keras')\n"
              "except data.DataError as exc:\n    print(exc)\nprint('keras imported:', 'keras' in sys.modules)")
    env = {**os.environ, "KERAS_HOME": str(tmp_path / "keras_home"), "https_proxy": f"http://127.0.0.1:{port}",
           "HTTPS_PROXY": f"http://127.0.0.1:{port}"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert "cannot download CIFAR-10 through Keras" in result.stdout, result.stdout + result.stderr
    assert result.stdout.strip().endswith("keras imported: False")


def test_keras_source_decodes_what_keras_fetched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Keras checks its cached archive against the official sha256, so fixture files stand in for
    # the download itself: get_file returns the folder holding cifar-10-batches-py/, and Keras'
    # own load_data parses it.
    import keras.src.datasets.cifar10 as keras_cifar10

    rng = np.random.default_rng(2)  # Keras' reader wants the real sizes: 5 x 10,000 + 10,000
    arrays = {"x_train": rng.integers(0, 256, (50000, 32, 32, 3), dtype=np.uint8),
              "y_train": rng.integers(0, 10, 50000), "x_test": rng.integers(0, 256, (10000, 32, 32, 3),
                                                                          dtype=np.uint8),
              "y_test": rng.integers(0, 10, 10000)}
    make_batches(tmp_path / "fetched" / "cifar-10-batches-py", arrays)
    monkeypatch.setattr(keras_cifar10, "get_file", lambda *a, **k: str(tmp_path / "fetched"))
    loaded = data.load("keras")
    assert_same(loaded, arrays)
    assert loaded.source == "keras"


def test_split_is_stratified_seeded_and_disjoint() -> None:
    rng = np.random.default_rng(0)
    x = np.arange(1000, dtype=np.uint8).repeat(32 * 32 * 3).reshape(1000, 32, 32, 3)
    y = rng.permutation(np.arange(1000) % 10)
    source = data.Cifar10(x, y, x[:10], y[:10], tuple(CLASSES), "s", "c")
    a, b, c = data.split(source, 0.2, 7), data.split(source, 0.2, 7), data.split(source, 0.2, 8)
    assert len(a.y_val) == 200 and np.bincount(a.y_val).tolist() == [20] * 10
    np.testing.assert_array_equal(a.x_val, b.x_val)
    assert not np.array_equal(a.y_val, c.y_val) or not np.array_equal(a.x_val, c.x_val)
    assert len(a.y_train) + len(a.y_val) == 1000
    np.testing.assert_array_equal(a.x_test, source.x_test)


def test_train_images_is_a_class_balanced_seeded_subset_and_leaves_validation_whole() -> None:
    rng = np.random.default_rng(0)
    x = np.arange(1000, dtype=np.uint8).repeat(32 * 32 * 3).reshape(1000, 32, 32, 3)
    y = rng.permutation(np.arange(1000) % 10)
    source = data.Cifar10(x, y, x[:10], y[:10], tuple(CLASSES), "s", "c")
    whole = data.split(source, 0.2, 7)
    a, b, c = (data.split(source, 0.2, seed, train_images=95) for seed in (7, 7, 8))
    assert len(a.y_train) == 95 and sorted(np.bincount(a.y_train).tolist()) == [9] * 5 + [10] * 5
    np.testing.assert_array_equal(a.x_train, b.x_train)  # seeded
    assert not np.array_equal(a.x_train, c.x_train)
    np.testing.assert_array_equal(a.x_val, whole.x_val)  # the validation split does not shrink
    assert set(a.x_train[:, 0, 0, 0].tolist()) <= set(whole.x_train[:, 0, 0, 0].tolist())


def test_a_class_short_of_images_gives_all_it_has() -> None:
    labels = np.array([0] * 50 + [1] * 3)
    picked = data.balanced_subset(labels, np.arange(53), 20, seed=0)
    assert np.bincount(labels[picked]).tolist() == [17, 3] and len(set(picked.tolist())) == 20


@pytest.mark.parametrize("size", [1, 801])
def test_an_impossible_train_images_is_one_clear_error(size: int) -> None:
    y = np.arange(1000) % 10
    source = data.Cifar10(np.zeros((1000, 32, 32, 3), np.uint8), y, np.zeros((10, 32, 32, 3), np.uint8), y[:10],
                          tuple(CLASSES), "s", "c")
    with pytest.raises(DataError, match=f"train_images {size} is not possible: the training split has 800 images "
                                        f"of 10 classes"):
        data.split(source, 0.2, 0, train_images=size)


# Permission problems. CI runs as root, whom chmod does not stop reading, so the two tests below
# make the OS answer as it does to another user: EACCES from access() and from scandir().
def test_an_unreadable_data_folder_is_named_as_a_permission_problem(
        tmp_path: Path, arrays: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    root = make_folder(tmp_path / "tree", arrays)
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == root else real(p, mode, **k))
    with pytest.raises(DataError, match=f"cannot read data source {root}: permission denied"):
        data.load(str(root), cache=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_an_unreadable_class_folder_is_a_permission_problem_not_missing_classes(
        tmp_path: Path, arrays: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    root = make_folder(tmp_path / "tree", arrays)
    locked, real = root / "train" / "cat", os.scandir

    def scandir(path="."):  # type: ignore[no-untyped-def]
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(locked))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DataError, match=f"permission denied \\({locked}\\)"):
        data.load(str(root), cache=tmp_path / "cache")


def test_a_cache_that_cannot_be_written_is_one_clear_error(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    root = make_folder(tmp_path / "tree", arrays)
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder should be")
    with pytest.raises(DataError, match=f"cannot write the data cache in {blocked} .*set CIFAR_EXP_CACHE"):
        data.load(str(root), cache=blocked)


def test_a_truncated_zip_is_called_damaged(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    path = tmp_path / "cifar.zip"
    with zipfile.ZipFile(path, "w") as z:
        for name, blob in _entries(arrays):
            z.writestr(name, blob)
    path.write_bytes(path.read_bytes()[:-200])  # the central directory cut off, as by a broken copy
    with pytest.raises(DataError, match="is a damaged zip .*copy or unpack it again"):
        data.load(str(path), cache=tmp_path / "cache")


def test_a_one_class_data_set_is_refused_before_anything_is_cached(tmp_path: Path,
                                                                    arrays: dict[str, np.ndarray]) -> None:
    one = {k: v[:3] if k.endswith("train") else v[:2] for k, v in arrays.items()}  # airplane only
    root = make_folder(tmp_path / "tree", one)
    with pytest.raises(DataError, match="has 1 class \\(airplane\\): a classifier needs two or more"):
        data.load(str(root), cache=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("bad", ["ca\nt", "cat\n", "c\tat", "x" * 201, ".."])
def test_a_class_name_mlflow_cannot_hold_is_refused_before_anything_is_cached(
        tmp_path: Path, arrays: dict[str, np.ndarray], bad: str) -> None:
    names = list(CLASSES)
    names[3] = bad  # cat: it trained, then every trial failed at metric logging and the sweep exited 0
    root = make_batches(tmp_path / "batches", arrays, names=names)
    with pytest.raises(DataError, match=f"class name {re.escape(repr(bad))} cannot be part of an MLflow metric name"):
        data.load(str(root), cache=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_an_empty_class_folder_is_refused(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    root = make_folder(tmp_path / "tree", arrays)
    for image in (root / "train" / "cat").iterdir():
        image.unlink()
    with pytest.raises(DataError, match="train/cat/ has no images: add them, or remove the folder"):
        data.load(str(root), cache=tmp_path / "cache")


def test_a_class_with_one_training_image_is_refused_before_anything_is_cached(
        tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    labels = arrays["y_train"].copy()
    labels[1:3] = 1  # airplane keeps one image of its three
    root = make_batches(tmp_path / "batches", {**arrays, "y_train": labels})
    with pytest.raises(DataError, match="train/ has fewer than 2 image\\(s\\) of airplane \\(1\\)"):
        data.load(str(root), cache=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def _batch(root: Path, name: str, batch: dict[bytes, object]) -> None:
    (root / name).write_bytes(pickle.dumps(batch))


@pytest.mark.parametrize("labels, rows, fragment", [
    ([0, 1, 12] + [0] * 17, None, "test_batch: label 12 is not a class index \\(batches.meta names 10 classes"),
    ([-1] + [0] * 19, None, "test_batch: label -1 is not a class index"),
    ([0] * 19, None, "test_batch: 19 labels for 20 images: every image needs one label"),
    (["a"] * 20, None, "test_batch: labels are not a list of integers"),
    (None, np.zeros((20, 3000), np.uint8), "test_batch: data is uint8 \\(20, 3000\\), CIFAR-10 batches hold uint8 "
                                           "rows of 3072"),
    (None, np.array([b"x"] * 20, dtype=object), "test_batch: data is object \\(20,\\)"),
], ids=["label-too-big", "label-negative", "labels-short", "labels-text", "rows-short", "object-array"])
def test_python_batches_with_bad_labels_or_rows_are_refused_before_anything_is_cached(
        tmp_path: Path, arrays: dict[str, np.ndarray], labels: Any, rows: Any, fragment: str) -> None:
    root = make_batches(tmp_path / "batches", arrays)
    test = {b"data": arrays["x_test"].transpose(0, 3, 1, 2).reshape(20, -1) if rows is None else rows,
            b"labels": arrays["y_test"].tolist() if labels is None else labels}
    _batch(root, "test_batch", test)
    with pytest.raises(DataError, match=fragment):
        data.load(str(root), cache=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_a_sixteen_bit_png_is_refused_not_saturated(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    root = make_folder(tmp_path / "tree", arrays)
    (deep,) = sorted((root / "test" / "cat").iterdir())[:1]
    Image.fromarray(np.full((32, 32), 32768, dtype=np.uint16)).save(deep, format="PNG")  # mid-gray in 16 bits
    with pytest.raises(DataError, match="test/cat/.*png has pixel mode I;16 \\(16-bit or float\\)"):
        data.load(str(root), cache=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_a_zip_with_the_tree_twice_is_refused(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    path = tmp_path / "twice.zip"
    with zipfile.ZipFile(path, "w") as z:
        for top in ("cifar10/", "copy/"):
            for name, blob in _entries(arrays):
                z.writestr(top + name, blob)
    with pytest.raises(DataError, match="holds two image trees, cifar10/ and copy/: keep one"):
        data.load(str(path), cache=tmp_path / "cache")


def test_a_zip_bomb_is_refused_from_its_header_without_unpacking(tmp_path: Path,
                                                                 arrays: dict[str, np.ndarray]) -> None:
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, blob in _entries(arrays):
            z.writestr(name, blob)
        with z.open("train/cat/bomb.png", "w", force_zip64=True) as member:  # 256 MB of zeros, 250 KB packed
            chunk = bytes(1 << 20)
            for _ in range(256):
                member.write(chunk)
    assert path.stat().st_size < 2 << 20
    with pytest.raises(DataError, match=f"train/cat/bomb.png unpacks to {256 << 20} bytes; a 32x32 image is a few "
                                        f"KB \\(limit {1 << 20}\\)"):
        data.load(str(path), cache=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_a_zip_whose_header_understates_a_member_is_read_no_further_and_called_damaged(
        tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    path = tmp_path / "liar.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, blob in _entries(arrays):
            z.writestr(name, blob)
        z.writestr("train/cat/liar.png", bytes(64 << 20))  # 64 MB of zeros ...
    packed = bytearray(path.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # ... said to be 100 bytes
        at = packed.rindex(signature)
        packed[at + offset:at + offset + 4] = (100).to_bytes(4, "little")
    path.write_bytes(bytes(packed))
    with pytest.raises(DataError, match=r"is a damaged zip \(Bad CRC-32 for file 'train/cat/liar.png'\)"):
        data.load(str(path), cache=tmp_path / "cache")


def test_train_images_beyond_the_data_is_refused_before_the_cache_is_written(
        isolated: Path) -> None:
    x, y = np.zeros((200, 32, 32, 3), np.uint8), np.arange(200) % 10
    root = make_folder(isolated / "tree", {"x_train": x, "y_train": y, "x_test": x[:20], "y_test": y[:20]})
    for size in ("1", "10000"):
        result = subprocess.run([sys.executable, "-m", "cifar_exp.sweep", "lr_dropout", "--data", str(root),
                                 "--train-images", size], cwd=isolated, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert f"train_images {size} is not possible" in line
        assert not (isolated / "cache").exists() and not (isolated / "mlruns").exists()
