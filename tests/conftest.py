"""Shared fixtures: an isolated working directory and cache, and slices of the real CIFAR-10 copy."""

from __future__ import annotations

import collections
import contextlib
import io
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data" / "cifar10"
PACK = SHARED / "cifar10-jpeg.npz"


_JAX_CACHE = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    # Under JAX the keras tests compile the same XLA programs again and again (a run and its
    # resumed copy, one structure across tests): each test process keeps them in JAX's persistent
    # compilation cache, its own folder for the session (no other process writes it: JAX's writes
    # are not atomic). Measured on the 2-core CPU machine: test_checkpoints' resume and transfer
    # tests, 101.6 s without it, 62.4 s with it. Tests that count compilations ask for
    # ``compiles_afresh``.
    if backend() == "jax":
        import jax

        folder = tempfile.mkdtemp(prefix="cifar_exp-tests-jax-")
        config.stash[_JAX_CACHE] = folder
        jax.config.update("jax_compilation_cache_dir", folder)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _JAX_CACHE in config.stash:
        shutil.rmtree(config.stash[_JAX_CACHE], ignore_errors=True)



@pytest.fixture()
def compiles_afresh() -> Iterator[None]:
    """JAX's persistent compilation cache off for the test, so that every program it builds is
    compiled (and counted) here, whatever earlier tests compiled."""
    if backend() != "jax":
        yield
        return
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", True)
        compilation_cache.reset_cache()


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test runs in its own directory (so ``mlruns/`` is private) with its own data cache."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CIFAR_EXP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def write_slice(path: Path, train_per_class: int, test_per_class: int) -> Path:
    """A zip of the first images of each class of the real CIFAR-10 JPEG copy."""
    sys.path.insert(0, str(SHARED))
    try:
        import unpack  # the pack's own reader, beside the data
    finally:
        sys.path.pop(0)
    taken: collections.Counter[tuple[str, str]] = collections.Counter()
    with zipfile.ZipFile(path, "w") as z:
        for name, blob in unpack.images(str(PACK)):
            split, cls, _ = name.split("/")
            if taken[split, cls] < (train_per_class if split == "train" else test_per_class):
                taken[split, cls] += 1
                z.writestr(name, blob)
    return path


@pytest.fixture(scope="session")
def cifar_slice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """500 real CIFAR-10 (JPEG copy) images: 40 train and 10 test per class."""
    return write_slice(tmp_path_factory.mktemp("data") / "cifar10-slice.zip", 40, 10)


def synthetic_images(n: int, classes: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random 32x32 RGB images with balanced labels."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), np.arange(n) % classes


def synthetic_splits(n: int = 64) -> Any:
    """``n`` synthetic training images (a quarter for validation, seed 0) and 20 test images, 10 classes."""
    from cifar_exp import data

    x, y = synthetic_images(n)
    xt, yt = synthetic_images(20, seed=1)
    return data.split(data.Cifar10(x, y, xt, yt, tuple("abcdefghij"), "synthetic", "0"), 0.25, 0)


def backend() -> str:
    return os.environ.get("KERAS_BACKEND", "tensorflow")


def in_process(cwd: Path, *argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``cifar-exp ARGV`` (``cli.main``) run in this process in ``cwd``, with ``env`` added and this
    process's environment and directory restored after: the exit code, stdout and stderr.

    For the commands a test runs after a sweep, whose own process would cost 5 to 7 s of imports.
    Give them absolute paths for the stores: MLflow keeps one store per URI for the life of the
    process, so a relative URI would reach the first folder it was used in."""
    from cifar_exp.cli import main

    out, err = io.StringIO(), io.StringIO()
    here = Path.cwd()
    with mock.patch.dict(os.environ, env or {}), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        os.chdir(cwd)
        try:
            code = main(list(argv))
        finally:
            os.chdir(here)
    return code, out.getvalue(), err.getvalue()
