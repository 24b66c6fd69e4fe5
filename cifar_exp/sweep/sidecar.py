"""The files a sweep keeps beside its Optuna storage, on the local disk: the heartbeats of local
workers (``liveness``), the checkpoints of running trials (``checkpoints``) and the library log.

``folder`` is the one rule for where "beside the storage" is, for every storage kind: beside a
journal file, its folder; beside a SQLite database, the database's folder; for a server database
(PostgreSQL, MySQL), the default store folder (``mlruns/``).

Decision: checkpoints are kept per storage as well as per study (``checkpoints/<study>/<storage
digest>/``). Two storages in one folder (``a.journal`` and ``b.journal``) hold studies of the same
name whose trials have the same numbers: with one folder between them, one study's start would
delete the other's checkpoints, and its trial 0 would find the other's. Each checkpoint also
names its owner (``owner``), which ``training.checkpoints`` checks before resuming.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Collection
from pathlib import Path

from cifar_exp.config import DEFAULT_STORE, mask_credentials


def folder(storage: str) -> Path:
    """The folder beside the Optuna storage ``storage`` (a journal path or a database URL)."""
    if storage.startswith("sqlite:///"):
        return Path(storage.removeprefix("sqlite:///")).parent
    return DEFAULT_STORE if "://" in storage else Path(storage).parent


def identity(storage: str) -> str:
    """The storage ``storage`` as one string, whichever way it was written: a file's absolute
    path (a journal, ``sqlite:///`` and its absolute path), a server's URL without credentials."""
    if storage.startswith("sqlite:///"):
        return "sqlite:///" + os.path.abspath(storage.removeprefix("sqlite:///"))
    return mask_credentials(storage) if "://" in storage else os.path.abspath(storage)


def checkpoints(storage: str, study: str, root: str = "") -> Path:
    """The folder of the checkpoints of ``study``'s running trials in the storage ``storage``:
    under ``root`` (``--checkpoint-dir``: on a cluster, a folder every node shares) or beside the
    storage."""
    digest = hashlib.sha256(identity(storage).encode()).hexdigest()[:12]
    return (Path(root) if root else folder(storage) / "checkpoints") / study / digest


def checkpoint(storage: str, study: str, number: int, root: str = "") -> Path:
    """Where trial ``number`` of ``study`` keeps its checkpoint while it runs (``root``: see
    ``checkpoints``)."""
    return checkpoints(storage, study, root) / f"{number}.npz"


def owner(storage: str, study: str, study_id: int, trial_id: int, data_checksum: str) -> dict[str, str]:
    """What a trial's checkpoint must name to be resumed: the storage, the study (name and id),
    the trial's id (a retry's original's: the trial that wrote it) and the data's checksum."""
    return {"storage": identity(storage), "study": study, "study_id": str(study_id), "trial_id": str(trial_id),
            "data_checksum": data_checksum}


def drop_checkpoints(storage: str, study: str, keep: Collection[int], root: str = "") -> list[Path]:
    """Delete the checkpoints of ``study``'s trials not in ``keep`` (the trials still running and
    those a queued retry will resume), with any temporary file a killed write left; the paths
    deleted. A trial's own worker deletes its checkpoint when the trial ends: what this finds was
    left by a worker that died, for a retry that will not come. Only regular files go: anything
    else at a checkpoint's path is not ours to delete."""
    where = checkpoints(storage, study, root)
    dropped = [path for path in sorted(where.glob("*.npz*"))
               if not (path.name.endswith(".npz") and path.stem.isdigit() and int(path.stem) in keep)
               and path.is_file() and not path.is_symlink()]
    for path in dropped:
        path.unlink(missing_ok=True)
    return dropped
