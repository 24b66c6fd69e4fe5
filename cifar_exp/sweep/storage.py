"""An Optuna study in its storage: open it, the budget and its lock, claiming the next trial, and
the study's identity. The one module that uses
Optuna's storage API (and the few private names it needs); worker and supervisor go through it.

Budget. ``trials`` counts the study's finished trials (complete, pruned, failed), across every
run of the command and every host: ``--trials 5`` after three finished trials runs two more.
Trials ended by an interruption do not count, nor does a failed trial that was retried, so a
resumed sweep still delivers the budget. The budget lives in the storage, not in a process: a
worker claims a trial (counts finished + running trials, then asks) under a lock that every
process sharing the storage takes (a lock file beside a journal or SQLite file, an advisory lock
on PostgreSQL), so several hosts never run more than the budget between them.

Stale trials and failing a trial: ``sweep.recovery``.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import optuna
import psutil
from optuna.storages.journal import JournalFileBackend
from optuna.storages.journal._file import get_lock_file
from optuna.trial import FrozenTrial, TrialState

from cifar_exp.config import ConfigError, Settings, Sweep, UserError, existing_storage, mask_credentials, outcomes
from cifar_exp.config.goals import Objective
from cifar_exp.config.records import StudyAttrs, TrialAttrs, trial_seed
from cifar_exp.sweep import liveness, recovery, space

COUNTED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
RECYCLE_SECONDS = 300  # a server database's connection is replaced after this long (``engine_options``)
# RDB storages: a running trial's heartbeat period, and the silence after which it is stale. A
# worker busy in one long epoch still beats (a thread), so the grace only has to cover a stalled
# database connection.
HEARTBEAT_SECONDS = 10
GRACE_SECONDS = 60


def engine_options(url: str) -> dict[str, Any]:
    """SQLAlchemy's options for a database storage. A server database (PostgreSQL, MySQL): each
    connection is tested before use and replaced after ``RECYCLE_SECONDS`` (a worker in a long
    trial leaves its connection idle for minutes, and servers, proxies and NAT drop idle ones:
    the next claim met a dead connection); a small pool per process, since a worker uses two
    connections (its claims and its heartbeat thread), where SQLAlchemy's default pool lets a
    process hold 15, and PostgreSQL's default ``max_connections`` is 100 for every process."""
    if url.startswith("sqlite"):
        return {}
    return {"pool_pre_ping": True, "pool_recycle": RECYCLE_SECONDS, "pool_size": 2, "max_overflow": 2}


def open_storage(url: str, heartbeat: int = HEARTBEAT_SECONDS,
                 grace: int = GRACE_SECONDS) -> optuna.storages.BaseStorage:
    """Optuna storage for ``url``: a database URL (``postgresql://``, ``sqlite:///``), with
    heartbeats on, or the path of a journal file, which several local processes can share safely
    (file lock). A new journal file is readable by its owner only."""
    if "://" in url:
        import sqlalchemy

        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since 2.9
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat, grace_period=grace,
                                                  engine_kwargs=engine_options(url))
        except (sqlalchemy.exc.SQLAlchemyError, ImportError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"cannot open the Optuna storage {mask_credentials(url)} ({mask_credentials(reason)}): "
                            f"check the URL, and that the database is running and lets this user in") from None
    path = Path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    backend = JournalFileBackend(str(path))
    with get_lock_file(backend._lock):  # the lock every append takes
        _cut_torn_tail(path)
    return optuna.storages.JournalStorage(backend)


def _cut_torn_tail(path: Path) -> None:
    """Cut a journal's last line if it was never finished (a write that met a full disk, or a kill
    in mid-write): that record was never stored, and the next append would glue itself to it,
    leaving a line no later start can read."""
    with path.open("rb+") as f:
        end = keep = f.seek(0, os.SEEK_END)
        while keep > 0:  # back to the last newline, a block at a time
            start = max(0, keep - 4096)
            f.seek(start)
            newline = f.read(keep - start).rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            keep = start
        if keep != end:
            f.truncate(keep)


def locks(url: str) -> bool:
    """Whether ``budget_lock`` takes a lock for the storage ``url`` (see there)."""
    return url.startswith(("postgresql", "sqlite:///")) or "://" not in url


@contextmanager
def budget_lock(url: str, storage: optuna.storages.BaseStorage | optuna.Study, name: str) -> Iterator[None]:
    """Held by whoever claims a trial of study ``name`` in ``url`` (or starts its parent run), in
    every process and host that shares the storage (``storage``, or a study's own):
    ``<file>.budget.lock`` beside a journal or SQLite file (not the journal's own ``.lock``), an
    advisory lock on PostgreSQL.
    Other databases get no lock (several hosts may then overshoot the budget by a trial or two)."""
    with _lock(url, storage, f"cifar_exp:{name}", "budget", shared=False, wait=True):
        yield


@contextmanager
def models_lock(url: str, storage: optuna.storages.BaseStorage | optuna.Study, name: str, *, shared: bool,
                wait: bool = True, on_wait: Callable[[], None] = lambda: None) -> Iterator[bool]:
    """The lock on study ``name``'s logged models: ``register`` holds it ``shared`` while it
    chooses, confirms and registers a trial's model (several registers at once), ``gc`` holds it
    exclusively while it plans and deletes, so a model is never collected under a registration.
    Yields whether it is held: with ``wait`` False, False at once if another holds it; with
    ``wait``, ``on_wait`` is called first if it must wait. Where it lives: as ``budget_lock``
    (``<file>.models.lock``; a lock of its own, so a long confirmation never holds up claiming);
    a killed holder's lock goes with its process (or its database session)."""
    with _lock(url, storage, f"cifar_exp:models:{name}", "models", shared=shared, wait=wait,
               on_wait=on_wait) as held:
        yield held


@contextmanager
def _lock(url: str, storage: optuna.storages.BaseStorage | optuna.Study, key: str, suffix: str, *, shared: bool,
          wait: bool, on_wait: Callable[[], None] = lambda: None) -> Iterator[bool]:
    """An advisory lock named ``key`` on PostgreSQL, ``<file>.<suffix>.lock`` (flock) beside a
    journal or SQLite file, none (held: True) on other databases."""
    if url.startswith("postgresql"):
        import sqlalchemy

        number = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little", signed=True)
        kind = "_shared" if shared else ""
        store = getattr(storage, "_storage", storage)  # a Study's
        backend: Any = getattr(store, "_backend", store)  # a Study wraps its RDBStorage in a cache
        with backend.engine.connect() as connection:
            held = bool(connection.execute(sqlalchemy.text(f"SELECT pg_try_advisory_lock{kind}(:k)"),
                                           {"k": number}).scalar())
            if not held and wait:
                on_wait()
                connection.execute(sqlalchemy.text(f"SELECT pg_advisory_lock{kind}(:k)"), {"k": number})
                held = True
            try:
                yield held
            finally:
                if held:
                    connection.execute(sqlalchemy.text(f"SELECT pg_advisory_unlock{kind}(:k)"), {"k": number})
        return
    path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url
    if "://" in path:
        yield True
        return
    import fcntl

    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    fd = os.open(f"{path}.{suffix}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            held = True
        except BlockingIOError:
            held = False
            if wait:
                on_wait()
                fcntl.flock(fd, mode)
                held = True
        yield held
    finally:
        os.close(fd)  # releases the lock


def load_existing(url: str, name: str) -> optuna.Study:
    """The existing study ``name`` in ``url``; ``UserError`` if the storage or the study is missing."""
    existing_storage(url)
    storage = open_storage(url)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = ", ".join(optuna.get_all_study_names(storage))
        raise UserError(f"no study '{name}' in {url} (studies: {names or 'none'})") from None


def counted(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that count against the budget: finished, not ended by an interruption, and not
    failed trials that were retried (their retry counts instead)."""
    attrs = [TrialAttrs.of(t) for t in trials]
    retried = {a.retry_of for a in attrs if a.retry_of is not None}
    return [t for t, a in zip(trials, attrs, strict=True) if t.state in COUNTED_STATES and not a.interrupted
            and t.number not in retried]


def budget_state(sweep: Sweep, trials: Sequence[FrozenTrial]) -> Literal["open", "wait", "done"]:
    """``open``: a trial may be claimed; ``wait``: the budget is all claimed but some trial is still
    running (it may fail and be retried); ``done``: the budget is finished."""
    running = sum(t.state == TrialState.RUNNING for t in trials)
    if sweep.trials is None or len(counted(trials)) + running < sweep.trials:
        return "open"
    return "wait" if running else "done"


def best_trials(study: optuna.Study, objectives: Sequence[Objective], k: int) -> list[FrozenTrial]:
    """The ``k`` best feasible complete trials by ``objectives`` (``config.outcomes.ranked``: the
    Pareto front first, each part by the first objective)."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return outcomes.ranked(done, objectives)[:k]  # type: ignore[return-value]


def load(settings: Settings, storage: optuna.storages.BaseStorage, seed: int) -> optuna.Study:
    """The sweep's study in ``storage`` with its sampler (seeded with ``seed``) and pruner."""
    sweep = settings.sweep
    return optuna.load_study(study_name=sweep.name, storage=storage,
                             sampler=space.make_sampler(sweep, seed),
                             pruner=space.make_pruner(sweep.pruner, sweep.epochs))


@dataclass(frozen=True)
class Claim:
    """A trial a worker now owns: its study (sampler seeded for it), the trial and its parameters."""

    study: optuna.Study
    trial: optuna.Trial
    params: dict[str, Any]


def claim(settings: Settings, storage: optuna.storages.BaseStorage) -> Claim | Literal["wait", "done"]:
    """Under the budget lock: recover stale trials, count the budget and, if it allows, start the
    study's next trial and stamp this worker on it; else ``"wait"`` or ``"done"`` (see
    ``budget_state``). After the lock: sample the trial's parameters (the stamped trial holds its
    place in the budget; a sampler's time would otherwise serialize every worker).

    The sampler is seeded per trial from (sweep seed, number of trials so far), so a sequential
    sweep samples the same parameters in the same order on every run from scratch, across
    resumes and replaced workers. The worker's host, pid and start time are stamped on the trial
    at once, synchronously in storage: if the process dies, the parent (or a later run) finds its
    trial by them (queued events of a dying process can be lost).
    """
    sweep = settings.sweep
    study_id = storage.get_study_id_from_name(sweep.name)
    with budget_lock(settings.storage, storage, sweep.name):
        recovery.recover_stale(load(settings, storage, sweep.sampler.seed), locks(settings.storage), settings.storage,
                      sweep.heartbeat_grace)
        trials = storage.get_all_trials(study_id, deepcopy=False)
        state = budget_state(sweep, trials)
        if state != "open":
            return state
        study = load(settings, storage, trial_seed(sweep.sampler.seed, len(trials)))
        with warnings.catch_warnings():  # we beat ourselves (``heartbeat``), outside Study.optimize
            warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used with Study.optimize")
            trial = study.ask()
        me = psutil.Process()
        # the host last: ``recover_stale`` looks at a trial only once its host is set
        for key, value in TrialAttrs.encode(worker_pid=me.pid, worker_started=me.create_time(),
                                            worker_host=liveness.machine()).items():
            trial.set_user_attr(key, value)
        rdb = recovery.beating(storage)
        if rdb is not None:
            rdb.record_heartbeat(trial._trial_id)
    return Claim(study, trial, space.suggest(trial, sweep))


def create_study(settings: Settings) -> optuna.Study:
    """Create the study, or load it when it exists (the same command resumes a sweep), and check
    that a resumed study is the same study (``check_identity``)."""
    sweep = settings.sweep
    storage = open_storage(settings.storage)
    directions = [o.direction for o in sweep.objectives]
    try:
        study = optuna.create_study(study_name=sweep.name, storage=storage, directions=directions,
                                    sampler=space.make_sampler(sweep, sweep.sampler.seed),
                                    pruner=space.make_pruner(sweep.pruner, sweep.epochs), load_if_exists=True)
    except ValueError as exc:  # e.g. an existing study with the other direction
        raise ConfigError(f"study '{sweep.name}' in {mask_credentials(settings.storage)}: {exc}") from None
    found = [d.name.lower() for d in study.directions]
    if found != directions:
        raise ConfigError(f"study '{sweep.name}' already exists with direction{'s' if len(found) > 1 else ''} "
                          f"{', '.join(found)}; use another sweep name or storage")
    check_identity(study, sweep.identity(settings.data_checksum), settings.storage)
    space.name_objectives(study, [o.metric for o in sweep.objectives])
    return study


# What a resume would change, and how to keep the study's value.
_KEEP = {"data_checksum": "pass the --data it started with",
         "train_images": "pass --train-images {old}",
         "epochs": "pass --epochs {old}",
         "validation_fraction": "restore data.validation_fraction: {old} in the sweep file",
         "sweep_seed": "pass --seed {old}",
         "searched_sha256": "restore the sweep file's space, fixed and objective"}


def _shown(key: str, value: Any) -> str:
    """An identity value as a refusal names it: hashes cut short, no ``train_images`` as all images."""
    if key.endswith(("checksum", "sha256")):
        return str(value)[:12]
    return "all images" if key == "train_images" and value is None else str(value)


def check_identity(study: optuna.Study, identity: Mapping[str, Any], storage: str) -> None:
    """Record what makes the study's trials comparable (``Sweep.identity``) when it starts; on a
    resume, ``ConfigError`` naming the first setting that differs and how to resume or start anew.
    A study from before this record gets it now; an empty checksum is not checked."""
    recorded = study.user_attrs
    for key, value in identity.items():  # every check before anything is recorded
        if key not in recorded:
            continue
        old = recorded[key]
        if old != value and not (key == "data_checksum" and not value):
            raise ConfigError(
                f"study '{study.study_name}' in {mask_credentials(storage)} was started with {key} {_shown(key, old)}, "
                f"not {_shown(key, value)}: its trials would not be comparable. To resume it, "
                f"{'drop --train-images' if key == 'train_images' and old is None else _KEEP[key].format(old=old)}"
                f"; to start a new study beside it, pass --study NEW_NAME")
    for key, value in identity.items():
        if key not in recorded and (key != "data_checksum" or value):
            study.set_user_attr(key, value)


def existing_attrs(settings: Settings) -> StudyAttrs:
    """The study's attributes as storage holds them now (not as a cached Study saw them)."""
    storage = open_storage(settings.storage)
    return StudyAttrs.read(storage.get_study_user_attrs(storage.get_study_id_from_name(settings.sweep.name)))


