"""The CIFAR-10 layouts ``data`` reads, decoded to arrays: the official python batches (a
``.tar.gz`` or its extracted folder), and image folders (a tree or a ``.zip``) of
``train/<class>/`` and ``test/<class>/``. Pure decoding: no cache, no split.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cifar_exp.config import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SOURCES_HELP = ("give --data one of: 'keras' (download through Keras on a connected machine), "
                "a cifar-10-python.tar.gz or extracted cifar-10-batches-py/ folder, "
                "or an image-folder tree or .zip of train/<class>/*.jpg and test/<class>/*.jpg")
BATCH_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]


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
    except Exception as exc:
        raise DataError(f"{name} is not a CIFAR-10 python batch ({exc})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{name} is not a CIFAR-10 python batch")
    return {k.decode() if isinstance(k, bytes) else str(k): v for k, v in raw.items()}


def _from_batches(read: dict[str, bytes]):  # type: ignore[no-untyped-def]
    meta = _unpickle(read["batches.meta"], "batches.meta")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta["label_names"]]  # type: ignore[attr-defined]
    xs, ys = [], []
    for name in BATCH_FILES[:-1]:
        batch = _unpickle(read[name], name)
        xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(batch["labels"], dtype=np.int64))
    return (np.concatenate(xs[:5]), np.concatenate(ys[:5]), xs[5], ys[5], names)


def decode_tar(path: Path):  # type: ignore[no-untyped-def]
    read = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            base = member.name.rsplit("/", 1)[-1]
            if member.isfile() and base in BATCH_FILES:
                f = tar.extractfile(member)
                assert f is not None
                read[base] = f.read()
    missing = [n for n in BATCH_FILES if n not in read]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}: not a cifar-10-python.tar.gz; {SOURCES_HELP}")
    return _from_batches(read)


def decode_batches(path: Path):  # type: ignore[no-untyped-def]
    missing = [n for n in BATCH_FILES if not (path / n).is_file()]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}: not a cifar-10-batches-py folder")
    return _from_batches({n: (path / n).read_bytes() for n in BATCH_FILES})


def _decode_images(entries: list[tuple[str, str, str, bytes]] | Iterator[tuple[str, str, str, bytes]],
                   origin: Path):  # type: ignore[no-untyped-def]
    """Decode (split, class, name, bytes) entries into arrays; classes in alphabetical order."""
    from PIL import Image

    by_split: dict[str, list[tuple[str, str, bytes]]] = {"train": [], "test": []}
    for split, cls, name, blob in entries:
        by_split[split].append((cls, name, blob))
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
        items = sorted(by_split[split])
        x = np.empty((len(items), 32, 32, 3), dtype=np.uint8)
        for i, (cls, name, blob) in enumerate(items):
            try:
                with Image.open(io.BytesIO(blob)) as img:
                    pixels = np.asarray(img.convert("RGB"))
            except Exception as exc:
                raise DataError(f"{origin}: cannot decode {split}/{cls}/{name} ({exc})") from None
            if pixels.shape != (32, 32, 3):
                raise DataError(f"{origin}: {split}/{cls}/{name} is {pixels.shape[1]}x{pixels.shape[0]}"
                                f", CIFAR-10 images are 32x32")
            x[i] = pixels
        arrays += [x, np.array([index[c] for c, _, _ in items], dtype=np.int64)]
    return (*arrays, train_classes)


_ENTRY = re.compile(r"(?:^|.*/)(train|test)/([^/]+)/([^/]+)$")


def decode_zip(path: Path):  # type: ignore[no-untyped-def]
    def entries() -> Iterator[tuple[str, str, str, bytes]]:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                m = _ENTRY.match(info.filename)
                if m and not info.is_dir() and info.filename.lower().endswith(IMAGE_SUFFIXES) \
                        and "__MACOSX" not in info.filename:
                    yield m.group(1), m.group(2), m.group(3), z.read(info)

    try:
        return _decode_images(entries(), path)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise DataError(f"{path} is a damaged zip ({exc}); copy or unpack it again") from None


def decode_folder(path: Path):  # type: ignore[no-untyped-def]
    for split in ("train", "test"):  # a class folder left empty would silently drop the class
        empty = sorted(d.name for d in (path / split).iterdir()
                       if d.is_dir() and not any(f.suffix.lower() in IMAGE_SUFFIXES for f in d.iterdir()))
        if empty:
            raise DataError(f"{path}: {split}/{empty[0]}/ has no images: add them, or remove the folder")
    entries = ((p.relative_to(path).parts[0], p.parent.name, p.name, p.read_bytes())
               for p in folder_images(path) if len(p.relative_to(path).parts) == 3)
    return _decode_images(entries, path)
