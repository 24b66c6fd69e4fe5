"""The environment of a command's process, set before anything imports Keras (backend,
determinism, caches), where its code came from (provenance), and the preamble of the commands
that read a store. Shared by the commands (a module each)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from cifar_exp.config import PACKAGE_DIR, UserError, existing_storage


def set_environment(deterministic: bool) -> None:
    """Environment for Keras and its backends; must run before anything imports keras."""
    from cifar_exp.data import cache_dir
    from cifar_exp.training.backend import determinism_env

    os.environ.update(determinism_env(deterministic, os.environ))
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    # TensorFlow's C++ log: start-up chatter, and under op determinism a harmless "NodeDef mentions
    # attribute use_unbounded_threadpool" ERROR line per epoch. Python exceptions still surface.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # Several workers share one GPU: no process may take all of its memory up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    # JAX keeps compiled programs (those that took over 1 s to compile) on disk, shared by every
    # worker and run: a trial of a program seen before skips its compilation (15 s of first-epoch
    # compilation for the CNN family on an H100).
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache_dir() / "jax"))


def provenance() -> dict[str, str]:
    """Where the code came from: the git commit of this checkout and whether it had uncommitted
    changes ("unknown" outside a git checkout), and the versions of the tracking libraries."""
    import importlib.metadata

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(PACKAGE_DIR.parent), *args], capture_output=True, text=True,
                                  timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit or "unknown",
            "git_dirty": "unknown" if commit is None or dirty is None else str(bool(dirty)).lower(),
            **{f"{name.replace('-', '_')}_version": importlib.metadata.version(name)
               for name in ("optuna", "mlflow", "keras-tuner")},
            **lock_state(PACKAGE_DIR.parent / "constraints.txt")}


def runtime_packages(distribution: str = "cifar_exp") -> frozenset[str]:
    """The installed distributions ``distribution`` runs on: its requirements without extras,
    and theirs, recursively (normalized names: lower case, ``-`` for ``_`` and ``.``)."""
    import importlib.metadata
    import re

    from packaging.requirements import Requirement

    def normal(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    found: set[str] = set()
    todo = [distribution]
    while todo:
        name = todo.pop()
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for text in requires:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue  # an extra's (the test tools of [dev]) or another platform's
            if normal(requirement.name) not in found:
                found.add(normal(requirement.name))
                todo.append(requirement.name)
    return frozenset(found)


def lock_state(constraints: Path, uses: frozenset[str] | None = None) -> dict[str, str]:
    """Whether this environment is the one the lock file ``constraints`` pins, for the packages a
    run uses (``uses``, normalized names; default ``runtime_packages()``): the lock also pins the
    test tools, which ``pip install -e . -c constraints.txt`` rightly leaves out. Its
    ``constraints_sha256``, and ``constraints_match`` ``true``, or ``false:`` and the first
    packages whose installed version differs (``name installed!=pinned``; ``absent`` when not
    installed). A run recorded with ``true`` runs on what ``pip install -c`` that file installs.
    Outside a checkout (an installed wheel) there is no lock: ``constraints_match`` ``none``."""
    import importlib.metadata
    import re

    if not constraints.is_file():
        return {"constraints_match": "none"}
    used = runtime_packages() if uses is None else uses
    text = constraints.read_text()
    differ = []
    for line in text.splitlines():
        name, _, pinned = line.split("#", 1)[0].strip().partition("==")
        if not pinned or re.sub(r"[-_.]+", "-", name.strip()).lower() not in used:
            continue
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = "absent"
        if installed != pinned:
            differ.append(f"{name} {installed}!={pinned}")
    return {"constraints_sha256": hashlib.sha256(text.encode()).hexdigest(),
            "constraints_match": "true" if not differ else f"false: {', '.join(differ[:5])}"
                                 + (f" and {len(differ) - 5} more" if len(differ) > 5 else "")}


def existing_store(tracking_uri: str) -> None:
    if tracking_uri.startswith("sqlite:///"):
        path = tracking_uri.removeprefix("sqlite:///")
        if not os.path.isfile(path):
            raise UserError(f"no MLflow store at {path}: run a sweep first, or pass --tracking-uri")


def open_store(tracking_uri: str, deterministic: bool) -> None:
    """The preamble of the commands that read a store: the store must exist; then the environment
    (before keras is imported) and the tracking URI."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep the output a report
    existing_store(tracking_uri)
    set_environment(deterministic)
    from cifar_exp import track

    track.configure(tracking_uri)


LIBRARY_LOGGERS = ("mlflow", "optuna", "alembic", "absl", "py.warnings", "tensorflow", "cifar_exp")


def library_log(storage: str, name: str) -> Path:
    """``logs/NAME.log`` beside the storage (``sweep.sidecar.folder``), where the parent's
    and the workers' library log lines go; the parent's go there from now on (a second call for
    the same file keeps the handler it has)."""
    import logging

    from cifar_exp.sweep import sidecar

    path = sidecar.folder(storage) / "logs" / f"{name}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    held = [h for h in logging.getLogger(LIBRARY_LOGGERS[0]).handlers
            if isinstance(h, logging.FileHandler) and h.baseFilename == os.path.abspath(path)]
    handler = held[0] if held else logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for logger in LIBRARY_LOGGERS:
        logging.getLogger(logger).handlers[:] = [handler]
        logging.getLogger(logger).propagate = False
    logging.captureWarnings(True)
    return path


def quiet_keras(storage: str, name: str) -> Path:
    """For a command that loads or trains a model in its own process (register, and a sweep's
    --register; rerun; predict; evaluate): the libraries' log lines to ``library_log``'s file,
    and from here on the process's file descriptor 2 too, where TensorFlow's native code writes
    past TF_CPP_MIN_LOG_LEVEL (2.21: six start-up lines at import, oneDNN and CUDA drivers; where a
    CUDA library is found but no driver works, a failed cuInit when it first looks for a device,
    whenever that is). ``sys.stderr`` stays on the terminal, a new file over a copy of the old
    descriptor, for our lines, errors and tracebacks. Where ``sys.stderr`` is not descriptor 2
    (a caller capturing it) only the logging part applies. Then imports Keras; runs after
    ``set_environment``."""
    path = library_log(storage, name)
    try:
        on_descriptor_2 = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # a StringIO's fileno is io.UnsupportedOperation
        on_descriptor_2 = False
    if on_descriptor_2:
        sys.stderr.flush()
        terminal = os.dup(2)
        with open(path, "ab") as log:
            os.dup2(log.fileno(), 2)
        sys.stderr = os.fdopen(terminal, "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace")
    import keras  # noqa: F401  (the backend's native start-up happens here)

    if "tensorflow" in sys.modules:
        # TensorFlow gives its logger a handler on sys.stderr when it is first asked for it (then
        # or later: its retracing warnings of register --seeds reached the terminal); asked now,
        # the handler is replaced by the log's.
        sys.modules["tensorflow"].get_logger()
        library_log(storage, name)
    return path


def cheap_checks(storage_url: str, data_source: str | None = None) -> None:
    """What a command can refuse before it imports MLflow, Keras or the data (seconds): a journal
    or SQLite storage that is not there, a ``--data`` that is no data set."""
    existing_storage(storage_url)
    if data_source is not None:
        from cifar_exp import data

        data.detect(data_source)
