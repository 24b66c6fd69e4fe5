"""A trial's checkpoint: its training state after each finished epoch, so that the retry of a
trial whose worker died resumes after the last finished epoch instead of at epoch 0.

The state is everything the next epoch reads: the model's variables (weights, BatchNorm
statistics, the seed generators of dropout and augmentation), the optimizer's (its slots, the
iteration count, the schedule's numbers with the plateau's scale), the plateau rule's best and
wait, the metrics logged so far, and the best epoch so far with its variables (``best``; written
once when it is the last epoch). The data order needs nothing: each epoch's is drawn from
(seed, epoch) (``train``). So a resumed run computes what the uninterrupted run would have, bit
for bit on the CPU (``tests/test_checkpoints.py``).

Decision: one ``.npz`` per trial, written after each epoch to a temporary file that is renamed
over the last one, so a kill mid-write leaves the previous checkpoint whole; no fsync (it guards
against a power loss, not a dead process, and a file that cannot be read is only ignored). A
checkpoint of another run (another configuration, seed, length or data shape) or one that cannot
be read is ignored: the trial starts at epoch 0. A checkpoint also names its owner (``Slot``: for
a sweep's trial the storage, study, trial id and data checksum): two studies whose files share a
folder use the same trial numbers, and one must never resume the other's state; another owner's
checkpoint, or anything at the path that is not a regular file (a FIFO would block the read
forever, a folder would fail it), is ignored with a line in the log (logger ``cifar_exp``).
Imports neither optuna nor mlflow.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from cifar_exp.config import TrainConfig
from cifar_exp.training.best import BestEpoch, Kept

LOG = logging.getLogger("cifar_exp.checkpoints")


@dataclass(frozen=True)
class Slot:
    """Where a run keeps its checkpoint, and whose it is: ``owner`` (names to values, e.g. the
    storage, study id, trial id and data checksum of a sweep's trial) is written with every
    checkpoint, and one written for another owner is never resumed."""

    path: Path
    owner: Mapping[str, str] = field(default_factory=dict)


@dataclass
class State:
    """A run's training state after ``epoch`` (0-based, the last finished)."""

    epoch: int
    model: list[np.ndarray]  # train_model.variables, in order
    optimizer: list[np.ndarray]  # train_model.optimizer.variables, in order
    plateau: tuple[float, int] | None = None  # the plateau rule's (best, wait)
    history: dict[str, list[float]] = field(default_factory=dict)  # every logs key, epochs 0..epoch
    kept: Kept | None = None  # the best epoch so far (``model_epoch: best``)


def fingerprint(cfg: TrainConfig, seed: int, epochs: int, shapes: tuple[tuple[int, ...], ...],
                num_classes: int, best_by: tuple[str, str] | None = None) -> str:
    """What a checkpoint must have been written by to be resumed: the same configuration, seed,
    length, data shapes, class count, backend and best-epoch rule (``best_by``: metric, direction)."""
    what = {"cfg": asdict(cfg), "seed": seed, "epochs": epochs, "shapes": [list(s) for s in shapes],
            "classes": num_classes, "backend": keras.backend.backend(),
            **({"best_by": list(best_by)} if best_by else {})}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def _numpy(variable: Any) -> np.ndarray:
    array = np.asarray(keras.ops.convert_to_numpy(variable))
    # bfloat16 (ml_dtypes) has no .npz form; float32 holds every bfloat16 value exactly.
    return array.astype(np.float32) if array.dtype.name == "bfloat16" else array


def capture(train_model: keras.Model, epoch: int, plateau: tuple[float, int] | None,
            history: Mapping[str, list[float]], kept: Kept | None = None) -> State:
    """The state of ``train_model`` (compiled, its optimizer built) after ``epoch``."""
    return State(epoch, [_numpy(v) for v in train_model.variables],
                 [_numpy(v) for v in train_model.optimizer.variables], plateau,
                 {k: list(v) for k, v in history.items()}, kept)


def save(slot: Slot, key: str, state: State) -> None:
    """Write ``state`` (of the run ``key``, see ``fingerprint``) to ``slot``, atomically, with its owner."""
    path = slot.path
    kept = state.kept
    own = kept is not None and kept.epoch != state.epoch  # else the kept variables are the model's
    meta = {"key": key, "owner": dict(slot.owner), "epoch": state.epoch, "plateau": state.plateau,
            "history": state.history, "model": len(state.model), "optimizer": len(state.optimizer),
            "kept": None if kept is None else {"epoch": kept.epoch, "value": kept.value, "own": own}}
    arrays = {f"m{i}": a for i, a in enumerate(state.model)} | {f"o{i}": a for i, a in enumerate(state.optimizer)}
    if kept is not None and own:
        arrays |= {f"k{i}": a for i, a in enumerate(kept.variables)}
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:
            np.savez(out, meta=np.array(json.dumps(meta)), **arrays)  # type: ignore[arg-type]
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _open_regular(path: Path) -> Any:
    """``path`` opened for reading if it is a regular file, else None (with a log line); a FIFO is
    opened without blocking, and its type seen on the open file, so nothing can swap it in between."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:  # a folder (on some systems), no permission
        LOG.warning("checkpoint %s ignored: it cannot be opened (%s); the trial starts at epoch 0", path, exc)
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        LOG.warning("checkpoint %s ignored: it is not a regular file (a folder, FIFO or device); the trial starts "
                    "at epoch 0", path)
        return None
    return os.fdopen(fd, "rb")


def _other_owner(path: Path, theirs: Any, ours: Mapping[str, str]) -> bool:
    """Whether the checkpoint at ``path`` belongs to another owner than ``ours`` (logged if so)."""
    theirs = theirs if isinstance(theirs, dict) else {}
    differs = sorted(k for k in set(ours) | set(theirs) if str(theirs.get(k)) != str(ours.get(k)))
    if differs:
        LOG.warning("checkpoint %s ignored: it belongs to another trial (%s); the trial starts at epoch 0", path,
                    ", ".join(f"{k} {theirs.get(k)!r}, not {ours.get(k)!r}" for k in differs))
    return bool(differs)


def load(slot: Slot, key: str) -> State | None:
    """The state in ``slot`` if it was written by the run ``key`` for ``slot``'s owner; None if
    there is none, it is another run's or another owner's, it is not a regular file, or it cannot
    be read."""
    path = slot.path
    try:
        opened = _open_regular(path)
        if opened is None:
            return None
        with opened, np.load(opened, allow_pickle=False) as saved:
            meta = json.loads(str(saved["meta"]))
            if _other_owner(path, meta.get("owner"), slot.owner) or meta.get("key") != key:
                return None
            plateau, model = meta["plateau"], [saved[f"m{i}"] for i in range(meta["model"])]
            kept = meta.get("kept")
            return State(int(meta["epoch"]), model, [saved[f"o{i}"] for i in range(meta["optimizer"])],
                         (float(plateau[0]), int(plateau[1])) if plateau else None,
                         {k: [float(x) for x in v] for k, v in meta["history"].items()},
                         None if kept is None else Kept(int(kept["epoch"]), float(kept["value"]),
                                                        [saved[f"k{i}"] for i in range(meta["model"])]
                                                        if kept["own"] else model))
    except (OSError, ValueError, KeyError, TypeError, IndexError, zipfile.BadZipFile, EOFError) as exc:
        LOG.warning("checkpoint %s ignored: it cannot be read (%s); the trial starts at epoch 0", path,
                    type(exc).__name__)
        return None


def discard(path: Path) -> None:
    """Delete the checkpoint file at ``path`` (and nothing that is not a regular file or a link:
    that is someone else's, left with a line in the log)."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return
    if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
        path.unlink(missing_ok=True)
    else:
        LOG.warning("%s left in place: a checkpoint's path, but not a regular file", path)


def _assign(targets: list, arrays: list[np.ndarray], what: str) -> None:
    if len(targets) != len(arrays):
        raise RuntimeError(f"cannot resume: the checkpoint has {len(arrays)} {what} variables, the run {len(targets)}")
    for target, array in zip(targets, arrays, strict=True):
        if tuple(target.shape) != array.shape:
            raise RuntimeError(f"cannot resume: {what} variable {target.path} is {tuple(target.shape)}, "
                               f"the checkpoint's {array.shape}")
        target.assign(keras.ops.cast(array, target.dtype))


def restore(train_model: keras.Model, state: State, optimizer: bool) -> None:
    """Set ``train_model``'s variables to ``state``'s and, with ``optimizer``, its optimizer's (it is
    built first, as ``fit`` would build it)."""
    _assign(train_model.variables, state.model, "model")
    if optimizer:
        if not train_model.optimizer.built:
            train_model.optimizer.build(train_model.trainable_variables)
        _assign(train_model.optimizer.variables, state.optimizer, "optimizer")


class Writer(keras.callbacks.Callback):
    """Saves the run's state to ``slot`` after every epoch (place it after every callback that
    changes state at an epoch's end: the plateau rule, ``best``). ``history`` holds the metrics of the
    epochs before this fit (a resumed run's); ``plateau`` is the run's plateau rule, if any. A
    write that fails (a full disk) warns and training goes on without that checkpoint."""

    def __init__(self, slot: Slot, key: str, history: Mapping[str, list[float]], plateau: Any = None,
                 best: BestEpoch | None = None) -> None:
        super().__init__()
        self.slot, self.key, self.plateau, self.best = slot, key, plateau, best
        self.history = {k: list(v) for k, v in history.items()}

    def on_epoch_end(self, epoch, logs=None):  # type: ignore[no-untyped-def]
        for name, value in (logs or {}).items():
            self.history.setdefault(name, []).append(float(value))
        plateau = (float(self.plateau.best), int(self.plateau.wait)) if self.plateau is not None else None
        try:
            kept = self.best.kept if self.best is not None else None
            save(self.slot, self.key, capture(self.model, epoch, plateau, self.history, kept))
        except OSError as exc:
            warnings.warn(f"checkpoint of epoch {epoch} not written ({exc}); training goes on", stacklevel=1)
