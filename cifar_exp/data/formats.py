"""The CIFAR-10 layouts ``data`` reads, decoded to arrays: the official python batches (a
``.tar.gz`` or its extracted folder), and image folders (a tree or a ``.zip``) of
``train/<class>/`` and ``test/<class>/``. Pure decoding: no cache, no split.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cifar_exp.config import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
LOCAL_SOURCES = ("a cifar-10-python.tar.gz or extracted cifar-10-batches-py/ folder, "
                 "or an image-folder tree or .zip of train/<class>/*.jpg and test/<class>/*.jpg")
SOURCES_HELP = f"give --data one of: 'keras' (download through Keras on a connected machine), {LOCAL_SOURCES}"
# Offline, 'keras' is the source that just failed: the way out is a local copy, and README's
# "Five minutes on a CPU" makes one from the project's JPEG copy.
OFFLINE_HELP = (f"offline, give --data a local copy: {LOCAL_SOURCES} (README, \"Five minutes on a CPU\", "
                f"makes a .zip from the CIFAR-10 JPEG copy)")
BATCH_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
MAX_BATCH_BYTES = 64 << 20  # a python batch is 31 MB (10,000 images and their labels)


class DataError(UserError):
    """The data source is missing, unreadable or not a CIFAR-10 layout."""


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def folder_images(root: Path) -> list[Path]:
    """Every image file under ``root/train`` and ``root/test``; a folder this user cannot read is
    a ``PermissionError`` (a silent skip would drop a class)."""
    found = []
    for split in ("train", "test"):
        for folder, _, files in os.walk(root / split, onerror=_raise):
            found += [Path(folder) / f for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found)


def _raise(error: OSError) -> None:
    raise error


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles CIFAR-10's python batches, allowing only the numpy globals they need."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar")}

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _unpickle(blob: bytes, name: str) -> dict[str, object]:
    try:
        raw = _BatchUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except Exception as exc:  # noqa: BLE001 (unpickling untrusted bytes can raise anything: one line naming the file)
        raise DataError(f"{name} is not a CIFAR-10 python batch ({exc})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{name} is not a CIFAR-10 python batch")
    return {k.decode() if isinstance(k, bytes) else str(k): v for k, v in raw.items()}


def _from_batches(read: dict[str, bytes]):  # type: ignore[no-untyped-def]
    meta = _unpickle(read["batches.meta"], "batches.meta")
    label_names = meta.get("label_names")
    if not isinstance(label_names, list | tuple) or not all(isinstance(n, bytes | str) for n in label_names):
        raise DataError("batches.meta has no list of label_names: not a CIFAR-10 python batch")
    names = [n.decode(errors="replace") if isinstance(n, bytes) else n for n in label_names]
    xs, ys = [], []
    for name in BATCH_FILES[:-1]:
        x, y = _batch_arrays(_unpickle(read[name], name), name, len(names))
        xs.append(x)
        ys.append(y)
    return (np.concatenate(xs[:5]), np.concatenate(ys[:5]), xs[5], ys[5], names)


def _batch_arrays(batch: dict[str, object], name: str, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A python batch's images ``(N, 32, 32, 3) uint8`` and labels ``(N,) int64``, checked: rows of
    3,072 bytes, one label per row, each label a class index of ``batches.meta``."""
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        what = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{name}: data is {what}, CIFAR-10 batches hold uint8 rows of 3072 values (32x32x3)")
    try:
        y = np.asarray(labels)
    except Exception:  # noqa: BLE001 (ragged or odd objects)
        y = np.asarray([])
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise DataError(f"{name}: labels are not a list of integers")
    if len(y) != len(data):
        raise DataError(f"{name}: {len(y)} labels for {len(data)} images: every image needs one label")
    if len(y) and (y.min() < 0 or y.max() >= classes):
        raise DataError(f"{name}: label {int(y.min() if y.min() < 0 else y.max())} is not a class index "
                        f"(batches.meta names {classes} classes, 0..{classes - 1})")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), y.astype(np.int64)


def decode_tar(path: Path):  # type: ignore[no-untyped-def]
    read = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            base = member.name.rsplit("/", 1)[-1]
            if member.isfile() and base in BATCH_FILES:
                if member.size > MAX_BATCH_BYTES:
                    raise DataError(f"{path}: {member.name} is {member.size} bytes; a CIFAR-10 batch is 31 MB "
                                    f"(limit {MAX_BATCH_BYTES})")
                f = tar.extractfile(member)
                assert f is not None
                read[base] = f.read(MAX_BATCH_BYTES)
    missing = [n for n in BATCH_FILES if n not in read]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}: not a cifar-10-python.tar.gz; {SOURCES_HELP}")
    return _from_batches(read)


def decode_batches(path: Path):  # type: ignore[no-untyped-def]
    missing = [n for n in BATCH_FILES if not (path / n).is_file()]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}: not a cifar-10-batches-py folder")
    return _from_batches({n: (path / n).read_bytes() for n in BATCH_FILES})


def _decode_images(entries: Iterator[tuple[str, str, str, bytes]], origin: Path):  # type: ignore[no-untyped-def]
    """Decode (split, class, name, bytes) entries into arrays; classes in alphabetical order. Each
    image is decoded as it comes, so memory holds the pixels, never the files."""
    by_split: dict[str, list[tuple[str, str, np.ndarray]]] = {"train": [], "test": []}
    for split, cls, name, blob in entries:
        pixels = _pixels(blob, origin, f"{split}/{cls}/{name}")
        if pixels.shape != (32, 32, 3):
            raise DataError(f"{origin}: {split}/{cls}/{name} is {pixels.shape[1]}x{pixels.shape[0]}"
                            f", CIFAR-10 images are 32x32")
        by_split[split].append((cls, name, pixels))
    train_classes = sorted({c for c, _, _ in by_split["train"]})
    test_classes = sorted({c for c, _, _ in by_split["test"]})
    if not train_classes or not test_classes:
        raise DataError(f"{origin} has no images under train/<class>/ and test/<class>/; {SOURCES_HELP}")
    if train_classes != test_classes:
        raise DataError(f"{origin}: train/ classes ({', '.join(train_classes)}) differ from "
                        f"test/ classes ({', '.join(test_classes)})")
    index = {c: i for i, c in enumerate(train_classes)}
    arrays = []
    for split in ("train", "test"):
        items = sorted(by_split[split], key=lambda item: item[:2])
        x = np.empty((len(items), 32, 32, 3), dtype=np.uint8)
        for i, (_, _, pixels) in enumerate(items):
            x[i] = pixels
        arrays += [x, np.array([index[c] for c, _, _ in items], dtype=np.int64)]
    return (*arrays, train_classes)


# Pillow's modes of 8 bits a channel; others (I;16, I, F: 16-bit and float PNGs) would clip to white in RGB.
_EIGHT_BIT_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"}
MAX_IMAGE_BYTES = 1 << 20  # a 32x32 image is a few KB in any format; this bounds a member's cost


def _pixels(blob: bytes, origin: Path, where: str) -> np.ndarray:
    """One image file's pixels, ``(h, w, 3) uint8``; ``DataError`` names an undecodable or
    non-8-bit image (a 16-bit PNG converted to RGB saturates: mean 254 where it was 127)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(blob)) as img:
            if img.width * img.height > 1 << 16:  # checked from the header, before decoding
                raise DataError(f"{origin}: {where} is {img.width}x{img.height}, CIFAR-10 images are 32x32")
            if img.mode not in _EIGHT_BIT_MODES:
                raise DataError(f"{origin}: {where} has pixel mode {img.mode} (16-bit or float): CIFAR-10 images "
                                f"are 8 bits a channel; convert it to 8-bit RGB")
            return np.asarray(img.convert("RGB"))
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 (a decoder's any failure on the user's file: one line naming it)
        raise DataError(f"{origin}: cannot decode {where} ({exc})") from None


_ENTRY = re.compile(r"^(?P<top>(?:.*/)?)(?P<split>train|test)/(?P<cls>[^/]+)/(?P<name>[^/]+)$")


def decode_zip(path: Path):  # type: ignore[no-untyped-def]
    """A zip of one image-folder tree (at its root or under one folder). A member is read only if
    its declared size can be an image (``MAX_IMAGE_BYTES``), and never past that size (a header
    that understates it fails its CRC: a damaged zip): a zip bomb costs a header read, not its
    expansion."""
    def entries() -> Iterator[tuple[str, str, str, bytes]]:
        top = None
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                m = _ENTRY.match(info.filename)
                if not m or info.is_dir() or not info.filename.lower().endswith(IMAGE_SUFFIXES) \
                        or "__MACOSX" in info.filename:
                    continue
                if top is None:
                    top = m["top"]
                elif m["top"] != top:  # every image would count twice, test images included
                    raise DataError(f"{path} holds two image trees, {top or './'} and {m['top'] or './'}: keep "
                                    f"one train/ and test/ in the zip")
                yield m["split"], m["cls"], m["name"], _member(z, info, path)

    try:
        return _decode_images(entries(), path)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise DataError(f"{path} is a damaged zip ({exc}); copy or unpack it again") from None


def _member(z: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> bytes:
    if info.file_size > MAX_IMAGE_BYTES:
        raise DataError(f"{path}: {info.filename} unpacks to {info.file_size} bytes; a 32x32 image is a few KB "
                        f"(limit {MAX_IMAGE_BYTES}): not CIFAR-10 data")
    with z.open(info) as f:  # zipfile stops at the declared size (a header that lies fails its CRC)
        return f.read(MAX_IMAGE_BYTES)


def _file(path: Path) -> bytes:
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):  # a pipe would hang the read
        raise DataError(f"{path} is not a regular file (a pipe or device): remove it from the image folder")
    if info.st_size > MAX_IMAGE_BYTES:
        raise DataError(f"{path} is {info.st_size} bytes; a 32x32 image is a few KB (limit {MAX_IMAGE_BYTES})")
    return path.read_bytes()


def decode_folder(path: Path):  # type: ignore[no-untyped-def]
    for split in ("train", "test"):  # a class folder left empty would silently drop the class
        empty = sorted(d.name for d in (path / split).iterdir()
                       if d.is_dir() and not any(f.suffix.lower() in IMAGE_SUFFIXES for f in d.iterdir()))
        if empty:
            raise DataError(f"{path}: {split}/{empty[0]}/ has no images: add them, or remove the folder")
    entries = ((p.relative_to(path).parts[0], p.parent.name, p.name, _file(p))
               for p in folder_images(path) if len(p.relative_to(path).parts) == 3)
    return _decode_images(entries, path)
