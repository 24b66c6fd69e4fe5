"""CIFAR-10 from where users have it, decoded once and cached; the seeded, stratified validation split.

Sources (``load(source)``):
- ``"keras"``: ``keras.datasets.cifar10`` (Keras' own download and cache under ``$KERAS_HOME``);
- the official python format: ``cifar-10-python.tar.gz`` or an extracted ``cifar-10-batches-py/``;
- an image-folder tree ``train/<class>/*.jpg|png``, ``test/<class>/...``, or a ``.zip`` of one;
  class index = alphabetical order of the folder names.

Decoded arrays are cached as ``.npz`` under ``cache_dir()``, keyed by a checksum of the source's
bytes, so a second start reads one file instead of decoding 60,000 images.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cifar_exp.data import formats
from cifar_exp.data.formats import CIFAR10_CLASSES, OFFLINE_HELP, SOURCES_HELP, DataError

if TYPE_CHECKING:
    from cifar_exp.config import Sweep

# What MLflow takes in a metric name (mlflow.utils.validation, less the slash a folder name cannot
# hold), and room for the longest prefix (test_recall_) in its 250 characters.
_CLASS_NAME = re.compile(r"[\w.\- :]+")
MAX_CLASS_NAME = 200
CACHE_FORMAT = 1  # bump when the cached arrays change meaning



@dataclass(frozen=True)
class Cifar10:
    """The decoded data set: images ``(N, 32, 32, 3) uint8``, labels ``(N,) int64``."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]
    source: str
    checksum: str  # sha256 of the source's bytes (of the arrays, for the Keras source)


@dataclass(frozen=True)
class Splits:
    """Training, validation (carved from the training set) and test arrays of one data set."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]


def cache_dir() -> Path:
    """Where decoded arrays are kept: ``$CIFAR_EXP_CACHE``, else ``$XDG_CACHE_HOME/cifar_exp``."""
    if os.environ.get("CIFAR_EXP_CACHE"):
        return Path(os.environ["CIFAR_EXP_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cifar_exp"


def detect(source: str) -> tuple[str, Path | None]:
    """The kind of ``source`` (keras, tar, batches, folder, zip) and its path; ``DataError`` if none,
    naming a permission problem or a damaged archive as such."""
    if source == "keras":
        return "keras", None
    path = Path(source).expanduser()
    try:
        return _detect(source, path)
    except PermissionError as exc:
        raise DataError(f"cannot read data source {source}: permission denied ({exc.filename or path}); "
                        f"give this user read access to it") from None


def _detect(source: str, path: Path) -> tuple[str, Path]:
    if not path.exists():
        raise DataError(f"data source {source} does not exist; {SOURCES_HELP}")
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise PermissionError(13, "Permission denied", str(path))
    if path.is_file():
        if path.name.endswith((".tar.gz", ".tgz", ".tar")) and tarfile.is_tarfile(path):
            return "tar", path
        if zipfile.is_zipfile(path):
            return "zip", path
        if path.suffix.lower() == ".zip":
            raise DataError(f"data source {source} is a damaged zip (no central directory: truncated?); "
                            f"copy or unpack it again")
        if path.name.endswith((".tar.gz", ".tgz", ".tar")):
            raise DataError(f"data source {source} is a damaged tar archive; copy or download it again")
    elif (path / "data_batch_1").is_file():
        return "batches", path
    elif (path / "cifar-10-batches-py" / "data_batch_1").is_file():
        return "batches", path / "cifar-10-batches-py"
    elif (path / "train").is_dir() and (path / "test").is_dir():
        return "folder", path
    raise DataError(f"data source {source} is not a recognisable CIFAR-10 layout; {SOURCES_HELP}")


def _sha256_files(paths: Iterable[Path], root: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()



def checksum(kind: str, path: Path) -> str:
    """sha256 over the source's bytes: the file itself, or every relevant file of a folder."""
    if kind in ("tar", "zip"):
        return _sha256_file(path)
    if kind == "batches":
        return _sha256_files([path / name for name in formats.BATCH_FILES], path)
    return _sha256_files(formats.folder_images(path), path)


def load(source: str, cache: Path | None = None, check: Callable[[Cifar10], object] | None = None) -> Cifar10:
    """Load CIFAR-10 from ``source`` (see the module docstring), through the cache when possible.
    Freshly decoded data are checked (``check_classes``, then ``check``, which raises to refuse
    them, e.g. a split the sweep asks for) before anything is cached."""
    kind, path = detect(source)
    if kind == "keras":
        return _load_keras()
    assert path is not None
    try:
        digest = checksum(kind, path)
    except PermissionError as exc:
        raise DataError(f"cannot read data source {source}: permission denied ({exc.filename}); give this user "
                        f"read access to it") from None
    except OSError as exc:
        raise DataError(f"cannot read data source {source}: {exc}") from None
    folder = cache or cache_dir()
    cache_file = folder / f"cifar10-{kind}-{digest[:32]}-v{CACHE_FORMAT}.npz"
    cached = _read_cache(cache_file)
    if cached is not None:
        x_train, y_train, x_test, y_test, names = cached
    else:
        decode = {"tar": formats.decode_tar, "batches": formats.decode_batches, "zip": formats.decode_zip,
                  "folder": formats.decode_folder}[kind]
        try:
            x_train, y_train, x_test, y_test, names = decode(path)
        except PermissionError as exc:
            raise DataError(f"cannot read data source {source}: permission denied ({exc.filename}); give this "
                            f"user read access to it") from None
        check_classes(y_train, y_test, names, source)
        if check is not None:
            check(Cifar10(x_train, y_train, x_test, y_test, tuple(names), source, digest))
        try:
            _write_cache(cache_file, x_train, y_train, x_test, y_test, names)
        except OSError as exc:
            raise DataError(f"cannot write the data cache in {folder} ({exc.strerror or exc}): make it writable, "
                            f"or set CIFAR_EXP_CACHE to a writable folder") from None
    return Cifar10(x_train, y_train, x_test, y_test, tuple(names), source, digest)


def check_classes(y_train: np.ndarray, y_test: np.ndarray, names: list[str] | tuple[str, ...], source: str) -> None:
    """``DataError`` unless there are two classes or more, named as MLflow metric names may be (a
    newline in a folder's name trained, then failed every trial at metric logging), each with two
    training images or more (a stratified validation split needs them) and a test image: a
    one-class set would report test accuracy 1.0, a class without test images an accuracy that
    never asks about it."""
    for name in names:  # each is part of MLflow metric names (test_recall_<class>)
        if not _CLASS_NAME.fullmatch(name) or name in (".", "..") or len(name) > MAX_CLASS_NAME:
            raise DataError(f"data source {source}: class name {name!r} cannot be part of an MLflow metric name "
                            f"(test_recall_<class>): rename its train/ and test/ folders with letters, digits, "
                            f"spaces and _ - . : only, {MAX_CLASS_NAME} characters at most")
    if len(names) < 2:
        raise DataError(f"data source {source} has {len(names)} class ({', '.join(names) or 'none'}): a classifier "
                        f"needs two or more (train/<class>/ folders)")
    train, test = np.bincount(y_train, minlength=len(names)), np.bincount(y_test, minlength=len(names))
    for split, counts, least in (("train", train, 2), ("test", test, 1)):
        short = [f"{names[i]} ({counts[i]})" for i in range(len(names)) if counts[i] < least]
        if short:
            raise DataError(f"data source {source}: {split}/ has fewer than {least} image(s) of "
                            f"{', '.join(short[:5])}: every class needs {least}+ in {split}/")


def _read_cache(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]] | None:
    """The cached arrays, or None when absent or unreadable (a truncated file is rebuilt)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return (z["x_train"], z["y_train"], z["x_test"], z["y_test"],
                    [str(c) for c in z["class_names"]])
    except Exception:  # noqa: BLE001 (any corruption: decode the source again and overwrite)
        return None


def _write_cache(path: Path, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                 y_test: np.ndarray, names: list[str]) -> None:
    # Written to a temporary file and renamed, so a crash never leaves a half-written cache and
    # concurrent workers never read one.
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                     class_names=np.array(names))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_keras() -> Cifar10:
    """``keras.datasets.cifar10``. A process that has not imported Keras (the sweep command, which
    only checks the data and takes its checksum) gets the arrays from a spawned child, so
    importing Keras stays the workers' business."""
    if "keras" in sys.modules:
        x_train, y_train, x_test, y_test = _keras_arrays()
    else:
        import concurrent.futures
        import multiprocessing

        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
            x_train, y_train, x_test, y_test = child.submit(_keras_arrays, True).result()
    digest = hashlib.sha256()
    for array in (x_train, y_train, x_test, y_test):
        digest.update(np.ascontiguousarray(array).tobytes())
    return Cifar10(x_train, y_train, x_test, y_test, CIFAR10_CLASSES, "keras", digest.hexdigest())


def _keras_arrays(quiet: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Keras' CIFAR-10 arrays; ``quiet`` (a child process of its own): the native libraries'
    start-up lines on its standard error (TensorFlow's, written before any Python logging is set
    up: four lines above the command's first one) go to /dev/null; errors come back as exceptions."""
    if quiet:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
    import keras  # only this source needs Keras; the others decode with numpy and Pillow

    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
    except Exception as exc:  # noqa: BLE001 (any download failure (offline, proxy, corrupt archive): one line)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"cannot download CIFAR-10 through Keras ({reason[:200]}); {OFFLINE_HELP}") from None
    return x_train, y_train.reshape(-1).astype(np.int64), x_test, y_test.reshape(-1).astype(np.int64)



def splits(sweep: Sweep, dataset: Cifar10) -> Splits:
    """The splits every trial of ``sweep`` trains, validates and is tested on (``split`` with the
    sweep's validation fraction, seed and training subset): the one call every path makes (the
    worker, the KerasTuner engine, the sweep command's check, reruns, confirmation seeds)."""
    return split(dataset, sweep.data.validation_fraction, sweep.sampler.seed, sweep.data.train_images)


def split(data: Cifar10, validation_fraction: float, seed: int, train_images: int | None = None) -> Splits:
    """Carve a stratified validation set of ``validation_fraction`` of the training set; with
    ``train_images``, train on a class-balanced subset of that many images of the rest.

    Both depend only on ``seed`` (the sweep's seed), so every trial of a sweep trains on the
    same images and is selected on the same validation images, whatever ``train_images`` is
    (the validation set does not shrink with it). The test set is passed through untouched.
    """
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(data.y_train))
    try:
        train_idx, val_idx = train_test_split(indices, test_size=validation_fraction,
                                              random_state=seed, stratify=data.y_train)
    except ValueError as exc:
        raise DataError(f"cannot carve a stratified validation split from {len(indices)} "
                        f"training images ({exc})") from None
    if train_images is not None:
        train_idx = balanced_subset(data.y_train, np.sort(train_idx), train_images, seed)
    train_idx, val_idx = np.sort(train_idx), np.sort(val_idx)
    return Splits(data.x_train[train_idx], data.y_train[train_idx], data.x_train[val_idx],
                  data.y_train[val_idx], data.x_test, data.y_test, data.class_names)


def balanced_subset(labels: np.ndarray, indices: np.ndarray, size: int, seed: int) -> np.ndarray:
    """``size`` of ``indices``, as many of each class as the classes allow (a class with too few
    images gives all it has and the others make up for it), drawn with ``seed``, sorted."""
    classes = np.unique(labels[indices])
    if not len(classes) <= size <= len(indices):
        raise DataError(f"train_images {size} is not possible: the training split has {len(indices)} images of "
                        f"{len(classes)} classes (give between {len(classes)} and {len(indices)})")
    rng = np.random.default_rng(seed)
    pools = [list(rng.permutation(indices[labels[indices] == c])) for c in classes]
    taken: list[int] = []
    while len(taken) < size:  # round robin over the classes, in a seeded order of images
        for pool in pools:
            if pool and len(taken) < size:
                taken.append(pool.pop())
    return np.sort(np.array(taken, dtype=indices.dtype))
