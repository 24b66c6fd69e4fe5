"""The files a sweep keeps beside its Optuna storage, on the local disk: the heartbeats of local
workers (``liveness``) and the checkpoints of running trials (``checkpoints``).

Beside a journal file: its folder; beside a SQLite database: the database's folder; for a server
database (PostgreSQL, MySQL), the default store folder (``mlruns/``).
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from cifar_exp.config import DEFAULT_STORE


def folder(storage: str) -> Path:
    """The folder beside the Optuna storage ``storage`` (a journal path or a database URL)."""
    if storage.startswith("sqlite:///"):
        return Path(storage.removeprefix("sqlite:///")).parent
    return DEFAULT_STORE if "://" in storage else Path(storage).parent


def checkpoint(storage: str, study: str, number: int) -> Path:
    """Where trial ``number`` of ``study`` keeps its checkpoint while it runs."""
    return folder(storage) / "checkpoints" / study / f"{number}.npz"


def drop_checkpoints(storage: str, study: str, keep: Collection[int]) -> list[Path]:
    """Delete the checkpoints of ``study``'s trials not in ``keep`` (the trials still running and
    those a queued retry will resume), with any temporary file a killed write left; the paths
    deleted. A trial's own worker deletes its checkpoint when the trial ends: what this finds was
    left by a worker that died, for a retry that will not come."""
    where = folder(storage) / "checkpoints" / study
    dropped = [path for path in sorted(where.glob("*.npz*"))
               if not (path.name.endswith(".npz") and path.stem.isdigit() and int(path.stem) in keep)]
    for path in dropped:
        path.unlink(missing_ok=True)
    return dropped
