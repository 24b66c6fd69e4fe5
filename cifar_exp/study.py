"""The sweep: an Optuna study whose trials run in worker processes and are tracked in MLflow.

Process model. ``run_sweep`` (the CLI's process) creates or resumes the study and the MLflow
parent run, then starts ``workers`` spawned processes. Each worker loads the data once, then
claims a trial from the study's budget, runs it, clears the Keras session and claims the next.
The parent never imports Keras; it follows the workers through an event queue (progress, best
so far), replaces a worker whose trial failed (a fresh process: no leaked memory or poisoned GPU
state), and records a trial whose worker died as failed in both systems, and retries it once.

Budget. ``trials`` counts the study's finished trials (complete, pruned, failed), across every
run of the command and every host: ``--trials 5`` after three finished trials runs two more.
Trials ended by an interruption do not count, nor does a failed trial that was retried, so a
resumed sweep still delivers the budget. The budget lives in the storage, not in a process: a
worker claims a trial (counts finished + running trials, then asks) under a lock that every
process sharing the storage takes (a lock file beside a journal or SQLite file, an advisory lock
on PostgreSQL), so several hosts never run more than the budget between them.

Stale trials. A trial whose worker is gone (SIGKILL, power cut) stays RUNNING in storage. Each
trial carries its worker's host, pid and process start time; on PostgreSQL (and any RDB) it also
records a heartbeat every ``HEARTBEAT_SECONDS``. Before claiming, every process fails the RUNNING
trials whose worker is gone (same host: the process no longer exists; any host: no heartbeat for
``GRACE_SECONDS``), closes their MLflow runs as KILLED and enqueues each once more with the same
parameters.
"""

from __future__ import annotations

import gc
import hashlib
import json
import multiprocessing as mp
import os
import queue
import signal
import socket
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn

import optuna
import psutil
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from cifar_exp import overview, space, track
from cifar_exp import trial as one_trial
from cifar_exp.config import (
    ConfigError,
    PrunerConfig,
    SamplerConfig,
    Sweep,
    TrainConfig,
    UserError,
    mask_credentials,
)

EXIT_TRIAL_FAILED = 3  # a worker exits with this after a failed trial, to be replaced
EXIT_ORPHANED = 4  # a worker whose sweep command died, after its grace
COUNTED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
STOP_GRACE_SECONDS = 60.0  # how long interrupted workers get to record their trials
# Rebuilding the report (every plot of every trial) took 3.7 s for a 12-trial study on this 2-core
# machine, CPU taken from the workers: at most once a minute while trials finish, and at the end.
REPORT_EVERY_SECONDS = 60.0
# RDB storages: a running trial's heartbeat period, and the silence after which it is stale. A
# worker busy in one long epoch still beats (a thread), so the grace only has to cover a stalled
# database connection.
HEARTBEAT_SECONDS = 10
GRACE_SECONDS = 60
WAIT_SECONDS = 2.0  # a worker with the budget all claimed polls this often for retries

Event = dict[str, Any]


@dataclass(frozen=True)
class Settings:
    """Everything a sweep needs, resolved: the sweep (with overrides applied) and where things go."""

    sweep: Sweep
    storage: str
    tracking_uri: str
    workers: int = 1
    gpus: tuple[str, ...] = ()  # worker i sees GPU gpus[i % len(gpus)] only; () leaves the environment alone
    tags: dict[str, str] = field(default_factory=dict)  # provenance for the parent run
    data_checksum: str = ""  # of the data the sweep trains on: part of the study's identity
    log_file: str = ""  # where workers write their output (library log lines); "" leaves it on the terminal


@dataclass(frozen=True)
class Summary:
    study_name: str
    experiment_id: str
    parent_run_id: str
    counts: dict[str, int]
    best: list[FrozenTrial]  # best first, complete trials only
    interrupted: bool
    stop_reason: str = ""


class Interrupted(BaseException):
    """Raised in a worker on SIGTERM (a BaseException, so ``except Exception`` lets it through)."""


def trial_seed(sweep_seed: int, trial_number: int) -> int:
    """The seed of trial ``trial_number``: a hash of (sweep seed, trial number), 31 bits."""
    digest = hashlib.sha256(f"{sweep_seed}:{trial_number}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


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
                return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat, grace_period=grace)
        except (sqlalchemy.exc.SQLAlchemyError, ImportError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"cannot open the Optuna storage {mask_credentials(url)} ({mask_credentials(reason)}): "
                            f"check the URL, and that the database is running and lets this user in") from None
    path = Path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


@contextmanager
def budget_lock(url: str, storage: optuna.storages.BaseStorage, name: str) -> Iterator[None]:
    """Held by whoever claims a trial of study ``name`` in ``url``, in every process and host that
    shares the storage: ``<file>.budget.lock`` beside a journal or SQLite file (not the journal's own
    ``.lock``), an advisory lock on PostgreSQL.
    Other databases get no lock (several hosts may then overshoot the budget by a trial or two)."""
    if url.startswith("postgresql"):
        import sqlalchemy

        key = int.from_bytes(hashlib.sha256(f"cifar_exp:{name}".encode()).digest()[:8], "little", signed=True)
        backend: Any = getattr(storage, "_backend", storage)  # a Study wraps its RDBStorage in a cache
        with backend.engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        return
    path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url
    if "://" in path:
        yield
        return
    import fcntl

    fd = os.open(f"{path}.budget.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _alive(pid: Any, started: Any) -> bool:
    """Whether the process ``pid``, started at ``started`` (psutil's create_time), still runs; the
    start time tells a reused pid from the original process."""
    try:
        return bool(abs(psutil.Process(int(pid)).create_time() - float(started)) < 0.01)
    except (psutil.Error, TypeError, ValueError):
        return False


def recover_stale(study: optuna.Study) -> list[FrozenTrial]:
    """Fail the study's RUNNING trials whose worker is gone, close their MLflow runs as KILLED, and
    enqueue each once more (a trial that is itself a retry is not retried again). Returns them.

    Gone: on this host, a worker process that no longer exists; on an RDB storage, also a trial
    of any host without a heartbeat for the storage's grace period. Safe to run in many processes
    at once: only the one whose state change wins closes and retries a trial."""
    storage = study._storage
    host = socket.gethostname()
    stale: list[FrozenTrial] = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = trial.user_attrs
        if attrs.get("worker_host") == host and not _alive(attrs.get("worker_pid"), attrs.get("worker_started")):
            if _fail_stale(storage, trial, f"stale: its worker (pid {attrs.get('worker_pid')}) is gone"):
                stale.append(trial)
    rdb = _beating(storage)
    if rdb is not None:
        grace = rdb.grace_period or 2 * (rdb.heartbeat_interval or 0)
        for trial_id in rdb._get_stale_trial_ids(study._study_id):
            trial = storage.get_trial(trial_id)
            if _fail_stale(storage, trial, f"stale: no heartbeat for {grace} s (its worker is gone)"):
                stale.append(trial)
    for trial in stale:
        trial = storage.get_trial(trial._trial_id)
        close_run(study, trial, "KILLED", trial.user_attrs.get("fail_reason", "stale"))
        if "retry_of" not in trial.user_attrs:
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
    return stale


def close_run(study: optuna.Study, trial: FrozenTrial, status: str, reason: str) -> None:
    """End the MLflow run of a failed ``trial`` with ``status`` and ``reason``. A trial whose worker
    died before it created the run gets one now (its params, tagged ``state=FAIL`` and
    ``trial_number`` under the parent run), so every trial of the study has exactly one run;
    without the study's experiment (nothing tracked yet) there is nowhere to put it. (Optuna
    takes no attribute on a finished trial, so such a trial's ``mlflow_run_id`` stays unset.)"""
    run_id = trial.user_attrs.get("mlflow_run_id")
    if not run_id:
        attrs = study.user_attrs
        if "mlflow_experiment_id" not in attrs or "mlflow_parent_run_id" not in attrs:
            return
        run_id = track.start_trial_run(attrs["mlflow_experiment_id"], attrs["mlflow_parent_run_id"], trial.number,
                                       params=dict(trial.params), tags={"sweep": study.study_name,
                                                                        "engine": "optuna"})
    one_trial.end_failed(run_id, reason, status)


def _beating(storage: optuna.storages.BaseStorage) -> optuna.storages.RDBStorage | None:
    """The RDB storage behind ``storage`` if it has heartbeats on (a Study wraps it in a cache)."""
    backend = getattr(storage, "_backend", storage)
    return backend if isinstance(backend, optuna.storages.RDBStorage) and backend.heartbeat_interval else None


def _fail_stale(storage: optuna.storages.BaseStorage, trial: FrozenTrial, reason: str) -> bool:
    try:
        storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
        return bool(storage.set_trial_state_values(trial._trial_id, TrialState.FAIL))
    except optuna.exceptions.UpdateFinishedTrialError:
        return False  # another process got there first


@contextmanager
def heartbeat(storage: optuna.storages.BaseStorage, trial_id: int) -> Iterator[None]:
    """While the block runs, record ``trial_id``'s heartbeat every interval (RDB storages with
    heartbeats on; a no-op otherwise), from a thread, so a long epoch does not look like death."""
    rdb = _beating(storage)
    if rdb is None:
        yield
        return
    interval = rdb.heartbeat_interval
    done = threading.Event()

    def beat() -> None:
        while True:
            try:
                rdb.record_heartbeat(trial_id)
            except Exception as exc:  # the database blinked: the next beat retries, well within grace
                print(f"cifar_exp: heartbeat of trial {trial_id} failed: {exc}", file=sys.stderr)
            if done.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def load_existing(url: str, name: str) -> optuna.Study:
    """The existing study ``name`` in ``url``; ``UserError`` if the storage or the study is missing."""
    if "://" not in url and not Path(url).is_file():
        raise UserError(f"no Optuna storage at {url}: run the sweep first, or pass --storage")
    storage = open_storage(url)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = ", ".join(optuna.get_all_study_names(storage))
        raise UserError(f"no study '{name}' in {url} (studies: {names or 'none'})") from None


def make_sampler(cfg: SamplerConfig, seed: int) -> optuna.samplers.BaseSampler:
    if cfg.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if cfg.name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(cfg: PrunerConfig, epochs: int) -> optuna.pruners.BasePruner:
    # Steps are epochs completed (1-based), so min_epochs=1 allows pruning after the first epoch.
    if cfg.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=cfg.min_epochs, max_resource=max(epochs, 1),
                                              reduction_factor=cfg.reduction_factor)
    if cfg.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=cfg.min_epochs)
    return optuna.pruners.NopPruner()


def counted(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that count against the budget: finished, not ended by an interruption, and not
    failed trials that were retried (their retry counts instead)."""
    retried = {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}
    return [t for t in trials if t.state in COUNTED_STATES and not t.user_attrs.get("interrupted")
            and t.number not in retried]


def budget_state(sweep: Sweep, trials: Sequence[FrozenTrial]) -> Literal["open", "wait", "done"]:
    """``open``: a trial may be claimed; ``wait``: the budget is all claimed but some trial is still
    running (it may fail and be retried); ``done``: the budget is finished."""
    running = sum(t.state == TrialState.RUNNING for t in trials)
    if sweep.trials is None or len(counted(trials)) + running < sweep.trials:
        return "open"
    return "wait" if running else "done"


def best_trials(study: optuna.Study, k: int) -> list[FrozenTrial]:
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    return sorted(done, key=lambda t: t.value, reverse=maximize)[:k]  # type: ignore[arg-type, return-value]


def _study(settings: Settings, storage: optuna.storages.BaseStorage, seed: int) -> optuna.Study:
    sweep = settings.sweep
    return optuna.load_study(study_name=sweep.name, storage=storage,
                             sampler=make_sampler(sweep.sampler, seed),
                             pruner=make_pruner(sweep.pruner, sweep.epochs))


# ---------------------------------------------------------------------------------------------
# Worker side


_WORKER = {"training": False, "stop": False}


def _on_sigterm(signum: int, frame: object) -> None:
    # Raise only while Keras is computing: raising inside a storage write could leave the
    # journal's file lock held. Elsewhere the flag is checked at the next safe point.
    _WORKER["stop"] = True
    if _WORKER["training"]:
        raise Interrupted()


ORPHAN_GRACE_SECONDS = 10.0  # a worker whose sweep command died gets this long to record its trial


def _die_with_parent(parent: int, events: Any, poll: float = 0.5) -> None:
    """From a daemon thread: once the sweep command (``parent``) is gone (SIGKILL, OOM kill; the
    worker is re-parented), stop as on SIGTERM (the trial ends as interrupted), and exit
    regardless after ``ORPHAN_GRACE_SECONDS``. A trial left RUNNING is failed and retried by the
    next start, as for any dead worker. Decision: workers never train on unsupervised; a killed
    command whose workers went on stacked workers on top of orphans at each restart."""
    while os.getppid() == parent:
        time.sleep(poll)
    events.cancel_join_thread()  # exiting must not wait to flush events nobody will read
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(ORPHAN_GRACE_SECONDS)
    os._exit(EXIT_ORPHANED)


def worker_main(settings: Settings, experiment: str, parent_run_id: str, stop: Any,
                events: Any, worker_id: int, deadline: float | None, parent: int | None = None) -> None:
    """A worker process: run trials while the budget and the deadline allow, until ``stop`` is set
    or the process ``parent`` (the sweep command) is gone."""
    if settings.log_file:  # before TensorFlow and MLflow print anything: they print to fds 1 and 2
        fd = os.open(settings.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops us
    signal.signal(signal.SIGTERM, _on_sigterm)
    if parent is not None:
        threading.Thread(target=_die_with_parent, args=(parent, events), name="parent-watch", daemon=True).start()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the parent reports trials
    if settings.gpus:  # before Keras (and its backend) first touches CUDA
        os.environ["CUDA_VISIBLE_DEVICES"] = settings.gpus[worker_id % len(settings.gpus)]
    import keras  # imported here: the parent process never needs Keras

    from cifar_exp import backend, data, hypermodel, models

    sweep = settings.sweep
    backend.use_deterministic_ops(sweep.deterministic)
    identity = {**backend.identity(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "")}
    track.configure(settings.tracking_uri)
    storage = open_storage(settings.storage)
    splits = data.split(data.load(sweep.data.source), sweep.data.validation_fraction, sweep.sampler.seed,
                        sweep.data.train_images)
    try:  # ImageNet weights missing offline, or a broken hypermodel: one clear error for the sweep
        for name in sweep.imagenet_backbones():
            models.backbone(TrainConfig(model="transfer", backbone=name, weights="imagenet"))
        tunable = hypermodel.load(sweep.hypermodel) if sweep.hypermodel else None
    except UserError as exc:
        events.put({"kind": "fatal", "worker": worker_id, "reason": str(exc)})
        return
    keras.backend.clear_session()
    events.put({"kind": "ready", "worker": worker_id})
    while not _WORKER["stop"] and not stop.is_set() and (deadline is None or time.time() < deadline):
        started = time.perf_counter()  # the trial's start, for its first_step_seconds
        claimed = claim(settings, storage)
        if claimed == "done":
            break
        if claimed == "wait":  # another worker's trial may still fail and be retried here
            stop.wait(WAIT_SECONDS)
            continue
        ok = _run_trial(settings, storage, splits, experiment, parent_run_id, events, worker_id, identity,
                        claimed, started, tunable)
        keras.backend.clear_session()  # memory must not grow from trial to trial
        gc.collect()
        if not ok:
            sys.exit(EXIT_TRIAL_FAILED)


Claimed = tuple[optuna.Study, optuna.Trial, dict[str, Any]]


def claim(settings: Settings, storage: optuna.storages.BaseStorage) -> Claimed | Literal["wait", "done"]:
    """Recover stale trials, then, if the budget allows, start the study's next trial and sample
    its parameters: ``(study, trial, params)``; else ``"wait"`` or ``"done"`` (see ``budget_state``).

    The sampler is seeded per trial from (sweep seed, number of trials so far), so a sequential
    sweep samples the same parameters in the same order on every run from scratch, across
    resumes and replaced workers. The worker's host, pid and start time are stamped on the trial
    at once, synchronously in storage: if the process dies, the parent (or a later run) finds its
    trial by them (queued events of a dying process can be lost).
    """
    sweep = settings.sweep
    study_id = storage.get_study_id_from_name(sweep.name)
    recover_stale(_study(settings, storage, sweep.sampler.seed))
    with budget_lock(settings.storage, storage, sweep.name):
        trials = storage.get_all_trials(study_id, deepcopy=False)
        state = budget_state(sweep, trials)
        if state != "open":
            return state
        study = _study(settings, storage, trial_seed(sweep.sampler.seed, len(trials)))
        with warnings.catch_warnings():  # we beat ourselves (``heartbeat``), outside Study.optimize
            warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used with Study.optimize")
            trial = study.ask()
        me = psutil.Process()
        # the host last: ``recover_stale`` looks at a trial only once its host is set
        for key, value in {"worker_pid": me.pid, "worker_started": me.create_time(),
                           "worker_host": socket.gethostname()}.items():
            trial.set_user_attr(key, value)
        rdb = _beating(storage)
        if rdb is not None:
            rdb.record_heartbeat(trial._trial_id)
    return study, trial, space.suggest(trial, sweep)


def _run_trial(settings: Settings, storage: optuna.storages.BaseStorage, splits: Any, experiment: str,
               parent_run_id: str, events: Any, worker_id: int, identity: Mapping[str, str],
               claimed: Claimed, started: float, tunable: Any = None) -> bool:
    """Run the ``claimed`` trial end to end, its heartbeat beating; False if it failed (the worker
    is then replaced). ``started`` is when the worker began the trial (``time.perf_counter``, before
    claiming it); ``tunable`` is the sweep's KerasTuner hypermodel, if it has one."""
    with heartbeat(storage, claimed[1]._trial_id):
        return _run_claimed(settings, splits, experiment, parent_run_id, events, worker_id, identity, claimed,
                            started, tunable)


def _run_claimed(settings: Settings, splits: Any, experiment: str, parent_run_id: str, events: Any,
                 worker_id: int, identity: Mapping[str, str], claimed: Claimed, started: float,
                 tunable: Any) -> bool:
    from cifar_exp import hypermodel, train

    sweep = settings.sweep
    study, trial, params = claimed
    seed = trial_seed(sweep.sampler.seed, trial.number)
    metric = sweep.objective.metric
    logged = {k: v for k, v in sweep.logged_params(params).items()
              # a hypermodel that overrides fit chooses its own batch size
              if not (tunable is not None and k == "batch_size" and hypermodel.overrides_fit(tunable))}
    tracked = one_trial.start(experiment, parent_run_id, trial.number, sweep, logged, seed, sweep.epochs,
                             one_trial.run_tags(sweep, "optuna", identity, {**settings.tags, "worker": worker_id}))
    run_id = tracked.run_id
    trial.set_user_attr("mlflow_run_id", run_id)
    trial.set_user_attr("seed", seed)
    events.put({"kind": "start", "worker": worker_id, "trial": trial.number, "run_id": run_id, "params": params})

    def on_epoch(epoch: int, logs: Mapping[str, float]) -> None:
        _WORKER["training"] = False
        if metric not in logs:
            raise ValueError(f"training logs no {metric} (only {', '.join(sorted(logs))}): compile the model "
                             f"with metrics=['accuracy']")
        tracked.log_epoch(epoch, logs)
        trial.report(logs[metric], epoch + 1)
        events.put({"kind": "epoch", "trial": trial.number, "epoch": epoch + 1, "epochs": sweep.epochs,
                    "value": logs[metric], "logs": logs})
        if _WORKER["stop"]:
            raise Interrupted()
        if epoch + 1 < sweep.epochs and trial.should_prune():  # a finished trial is not pruned
            raise optuna.TrialPruned(f"pruned after epoch {epoch + 1}: {metric}={logs[metric]:.4f}")
        _WORKER["training"] = True

    try:
        one_trial.log_sweep(tracked, sweep)  # a full disk here fails the trial, not the worker
        hp, custom = None, None
        if tunable is not None:
            hp = hypermodel.OptunaHyperParameters(trial)
            tunable.build(hp)  # declares, so samples, every active hyperparameter
            log_hyperparameters(run_id, hp.values, sweep)
            custom = hypermodel.custom_model(tunable, hp)
        _WORKER["training"] = True
        try:
            result = train.train(sweep.train_config(params), splits, epochs=sweep.epochs, seed=seed,
                                 on_epoch=[on_epoch], custom=custom, on_first_step=tracked.on_first_step,
                                 started=started)
        finally:
            _WORKER["training"] = False
        if hp is not None:  # hyperparameters first declared in the hypermodel's fit
            log_hyperparameters(run_id, hp.values, sweep)
        value = result.history[metric][-1]
        evaluated = one_trial.evaluate(tracked, result, splits, title=f"{sweep.name} trial {trial.number}")
        for key, v in {"test_loss": result.test_loss, "test_accuracy": result.test_accuracy,
                       "epochs_run": tracked.epochs_run, "model_uri": evaluated.model_uri, **evaluated.verdict}.items():
            trial.set_user_attr(key, v)
        study.tell(trial, value)
        one_trial.end_complete(tracked, evaluated)
        events.put({"kind": "end", "trial": trial.number, "state": "COMPLETE", "value": value,
                    "run_id": run_id, "test_accuracy": result.test_accuracy, **evaluated.verdict})
        return True
    except optuna.TrialPruned as exc:
        verdict = one_trial.judge(tracked.history, None, splits)
        for key, v in {"epochs_run": tracked.epochs_run, **verdict}.items():
            trial.set_user_attr(key, v)
        study.tell(trial, state=TrialState.PRUNED)
        one_trial.end_pruned(tracked, verdict)
        events.put({"kind": "end", "trial": trial.number, "state": "PRUNED", "reason": str(exc),
                    "run_id": run_id, **verdict})
        return True
    except Interrupted:
        _interrupted(study, trial, run_id, events)
    except Exception as exc:
        if _WORKER["stop"]:
            # Raised from the signal handler inside Keras, Interrupted can come out as another
            # exception (one raised by a `finally` of the fit loop on its way out): still a stop.
            _interrupted(study, trial, run_id, events)
        reason = one_trial.failure_reason(exc)
        _fail(study, trial, run_id, reason, "FAILED")
        events.put({"kind": "end", "trial": trial.number, "state": "FAIL", "reason": reason, "run_id": run_id})
        return False


def log_hyperparameters(run_id: str, values: Mapping[str, Any], sweep: Sweep) -> None:
    """A hypermodel's hyperparameters: MLflow params, and typed in ``hyperparameters.json`` (what a
    rerun builds from). Names that are also sweep dimensions are refused: one name, one concept."""
    clashes = sorted(set(values) & set(sweep.space))
    if clashes:
        raise ValueError(f"the hypermodel's hyperparameter {clashes[0]} is also a dimension of the sweep: "
                         f"rename one of them")
    logged = track.get_run(run_id).params
    track.log_params(run_id, {k: v for k, v in values.items() if k not in logged})
    track.log_text(run_id, json.dumps(dict(values), sort_keys=True), "hyperparameters.json")


def _interrupted(study: optuna.Study, trial: optuna.Trial, run_id: str, events: Any) -> NoReturn:
    _fail(study, trial, run_id, "interrupted (Ctrl-C or SIGTERM)", "KILLED", interrupted=True)
    events.put({"kind": "end", "trial": trial.number, "state": "FAIL", "reason": "interrupted", "run_id": run_id})
    raise SystemExit(0) from None


def _fail(study: optuna.Study, trial: optuna.Trial, run_id: str, reason: str, run_status: str,
          interrupted: bool = False) -> None:
    try:
        trial.set_user_attr("fail_reason", reason)
        if interrupted:
            trial.set_user_attr("interrupted", True)
        study.tell(trial, state=TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return  # already failed as stale by another process, which closed the run too
    try:
        one_trial.end_failed(run_id, reason, run_status)
    except Exception as exc:  # tracking down: the Optuna record above already holds the reason
        print(f"cifar_exp: could not close MLflow run {run_id}: {exc}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Parent side


def create_study(settings: Settings) -> optuna.Study:
    """Create the study, or load it when it exists (the same command resumes a sweep)."""
    sweep = settings.sweep
    storage = open_storage(settings.storage)
    direction = sweep.objective.direction
    try:
        study = optuna.create_study(study_name=sweep.name, storage=storage, direction=direction,
                                    sampler=make_sampler(sweep.sampler, sweep.sampler.seed),
                                    pruner=make_pruner(sweep.pruner, sweep.epochs), load_if_exists=True)
    except ValueError as exc:  # e.g. an existing study with the other direction
        raise ConfigError(f"study '{sweep.name}' in {mask_credentials(settings.storage)}: {exc}") from None
    check_identity(study, sweep.identity(settings.data_checksum), settings.storage)
    return study


# What a resume would change, and how to keep the study's value.
_KEEP = {"data_checksum": "pass the --data it started with",
         "train_images": "pass --train-images {old}",
         "epochs": "pass --epochs {old}",
         "validation_fraction": "restore data.validation_fraction: {old} in the sweep file",
         "sweep_seed": "pass --seed {old}",
         "searched_sha256": "restore the sweep file's space, fixed and objective"}


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
            show = (lambda v: str(v)[:12]) if key.endswith(("checksum", "sha256")) else str
            raise ConfigError(
                f"study '{study.study_name}' in {mask_credentials(storage)} was started with {key} {show(old)}, "
                f"not {show(value)}: its trials would not be comparable. To resume it, "
                f"{'drop --train-images' if key == 'train_images' and old is None else _KEEP[key].format(old=old)}"
                f"; to start a new study, copy the sweep file under another name "
                f"or pass another --storage")
    for key, value in identity.items():
        if key not in recorded and (key != "data_checksum" or value):
            study.set_user_attr(key, value)


def load_existing_attr(settings: Settings, key: str) -> Any:
    """The study's user attribute ``key`` as storage holds it now (not as a cached Study saw it)."""
    storage = open_storage(settings.storage)
    return storage.get_study_user_attrs(storage.get_study_id_from_name(settings.sweep.name)).get(key)


def run_sweep(settings: Settings, on_event: Callable[[Event], None] = lambda e: None) -> Summary:
    """Run (or resume) the sweep until its budget, its timeout, an interruption, or too many
    consecutive failures. ``on_event`` receives every worker event (for a progress display)."""
    sweep = settings.sweep
    study = create_study(settings)
    if study.direction.name.lower() != sweep.objective.direction:
        raise ConfigError(f"study '{sweep.name}' already exists with direction "
                          f"{study.direction.name.lower()}; use another sweep name or storage")
    track.configure(settings.tracking_uri)
    experiment = track.experiment_id(sweep.name)
    with budget_lock(settings.storage, study._storage, sweep.name):  # one parent run, however many hosts
        parent = track.start_parent(
            experiment, load_existing_attr(settings, "mlflow_parent_run_id"), f"{sweep.name}-study",
            {**settings.tags, "sweep": sweep.name, "sweep_file": str(sweep.path),
             "sweep_sha256": sweep.content_hash, "objective": f"{sweep.objective.direction} {sweep.objective.metric}",
             "sampler": f"{sweep.sampler.name} seed={sweep.sampler.seed}", "pruner": sweep.pruner.name,
             "epochs": str(sweep.epochs), "budget_trials": str(sweep.trials), "optuna_study": sweep.name,
             "optuna_storage": settings.storage, "deterministic": str(sweep.deterministic).lower(),
             "engine": "optuna"})
        study.set_user_attr("mlflow_parent_run_id", parent)
    study.set_user_attr("mlflow_experiment_id", experiment)

    for trial in recover_stale(study):  # left RUNNING by a run of this command that was killed
        on_event({"kind": "stale", "trial": trial.number, "reason": trial.user_attrs.get("fail_reason", "")})
    ctx = mp.get_context("spawn")  # fork after importing TensorFlow/JAX threads is unsafe
    stop = ctx.Event()
    events: Any = ctx.Queue()
    deadline = time.time() + sweep.timeout if sweep.timeout else None
    state = _ParentState(study, parent, sweep.objective.metric, on_event)
    state.publish = lambda: _publish_quietly(study, parent, sweep)

    def start_worker(worker_id: int) -> mp.process.BaseProcess:
        process = ctx.Process(target=worker_main, name=f"cifar_exp-worker-{worker_id}", daemon=True,
                              args=(settings, experiment, parent, stop, events, worker_id, deadline, os.getpid()))
        process.start()
        assert process.pid is not None
        state.pids.add(process.pid)
        return process

    def on_stop_signal(signum: int, frame: object) -> None:
        state.interrupted = True

    previous = {s: signal.signal(s, on_stop_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    workers: dict[int, mp.process.BaseProcess] = {}
    try:
        trials = study.get_trials(deepcopy=False)
        if budget_state(sweep, trials) != "done":
            left = sweep.trials - len(counted(trials)) if sweep.trials is not None else settings.workers
            for worker_id in range(max(1, min(settings.workers, left))):
                workers[worker_id] = start_worker(worker_id)
        stop_sent = 0.0
        while workers:
            try:
                state.handle(events.get(timeout=0.2))
                continue
            except queue.Empty:
                pass
            if (state.interrupted or state.stop_reason or state.fatal) and not stop_sent:
                stop.set()
                if state.interrupted:
                    for process in workers.values():
                        if process.pid and process.is_alive():
                            os.kill(process.pid, signal.SIGTERM)
                stop_sent = time.time()
            if stop_sent and time.time() - stop_sent > STOP_GRACE_SECONDS:
                for process in workers.values():
                    process.kill()
            for worker_id, process in list(workers.items()):
                if process.is_alive():
                    continue
                process.join()
                _drain(events, state)
                del workers[worker_id]
                if process.exitcode not in (0, EXIT_TRIAL_FAILED):
                    state.worker_died(process.pid, process.exitcode)  # type: ignore[arg-type]
                if process.exitcode != 0 and not stop.is_set() and \
                        budget_state(sweep, study.get_trials(deepcopy=False)) != "done":
                    workers[worker_id] = start_worker(worker_id)
                if state.failures_in_a_row >= sweep.max_consecutive_failures and not state.stop_reason:
                    state.stop_reason = (f"stopped after {state.failures_in_a_row} consecutive failed trials "
                                         f"(max_consecutive_failures); see fail_reason on the failed runs")
        _drain(events, state)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for process in workers.values():
            process.kill()
        state.close_orphans("interrupted: the sweep stopped before this trial ended")
        events.close()

    if state.fatal:  # nothing trained: the parent run records why, the CLI exits with code 2
        track.end_run(parent, "FAILED", {"fail_reason": state.fatal})
        raise UserError(state.fatal)
    trials = study.get_trials(deepcopy=False)
    best = best_trials(study, 5)
    _finish_parent(study, parent, trials, best, sweep, interrupted=state.interrupted)
    counts = {s.name: sum(t.state == s for t in trials) for s in (TrialState.COMPLETE, TrialState.PRUNED,
                                                                  TrialState.FAIL, TrialState.RUNNING)}
    return Summary(sweep.name, experiment, parent, counts, best, state.interrupted, state.stop_reason)


def _drain(events: Any, state: _ParentState) -> None:
    while True:
        try:
            state.handle(events.get(timeout=0.05))
        except queue.Empty:
            return


class _ParentState:
    """What the parent knows while the sweep runs: its workers' pids, best so far, failure streak."""

    def __init__(self, study: optuna.Study, parent_run_id: str, metric: str,
                 on_event: Callable[[Event], None]) -> None:
        self.study = study
        self.parent_run_id = parent_run_id
        self.metric = metric
        self.on_event = on_event
        self.pids: set[int] = set()  # every worker this run started
        self.best: float | None = None
        self.failures_in_a_row = 0
        self.interrupted = False
        self.stop_reason = ""
        self.fatal = ""  # a worker found the sweep cannot run at all (e.g. weights unavailable)
        self.publish: Callable[[], None] | None = None
        self.published = 0.0
        self.maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE

    def handle(self, event: Event) -> None:
        if event["kind"] == "fatal":
            self.fatal = self.fatal or event["reason"]
        if event["kind"] == "end":
            if event["state"] == "FAIL" and event.get("reason") != "interrupted":
                self.failures_in_a_row += 1
            elif event["state"] != "FAIL":
                self.failures_in_a_row = 0
            if self.publish is not None and time.time() - self.published > REPORT_EVERY_SECONDS:
                self.publish()  # the report follows the sweep, at most once a minute
                self.published = time.time()
            if event["state"] == "COMPLETE":
                value = event["value"]
                if self.best is None or (value > self.best if self.maximize else value < self.best):
                    self.best = value
                    track.log_metrics(self.parent_run_id, {f"best_{self.metric}": value}, step=event["trial"])
        self.on_event(event)

    def _running(self, pids: set[int]) -> list[FrozenTrial]:
        return [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if t.user_attrs.get("worker_pid") in pids]

    def worker_died(self, pid: int, exitcode: int | None) -> None:
        """A worker ended abnormally (crash, SIGKILL, OOM kill): fail its trial in both systems, and
        retry it once (with the same parameters) unless the sweep is stopping."""
        self.failures_in_a_row += 1
        for trial in self._running({pid}):
            reason = f"worker process died (exit code {exitcode})"
            if self.interrupted:
                reason = "interrupted: the worker was stopped before the trial ended"
            if not self._fail_record(trial, reason, "KILLED" if self.interrupted else "FAILED", self.interrupted):
                continue  # a worker found it stale first, and retried it
            retried = not self.interrupted and "retry_of" not in trial.user_attrs
            if retried:
                self.study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            self.on_event({"kind": "end", "trial": trial.number, "state": "FAIL", "retried": retried,
                           "reason": "interrupted" if self.interrupted else reason})

    def close_orphans(self, reason: str) -> None:
        """Trials of this run's workers still RUNNING when the sweep stops end as interrupted."""
        for trial in self._running(self.pids):
            self._fail_record(trial, reason, "KILLED", interrupted=True)

    def _fail_record(self, trial: FrozenTrial, reason: str, run_status: str, interrupted: bool) -> bool:
        """Fail ``trial`` in both systems; False if another process (a worker recovering stale
        trials) already ended it."""
        storage = self.study._storage
        try:
            storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
            if interrupted:
                storage.set_trial_user_attr(trial._trial_id, "interrupted", True)
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            return False
        close_run(self.study, storage.get_trial(trial._trial_id), run_status, reason)
        return True


def publish(study: optuna.Study, parent: str, sweep: Sweep) -> dict[str, str]:
    """(Re)build the study's report (plots, trials table, cost ledger; see ``overview``) into its
    MLflow parent run, with the ledger's seconds as parent metrics. Returns the plots not drawn
    yet, with why."""
    with tempfile.TemporaryDirectory() as tmp:
        skipped = overview.write(study, Path(tmp), sweep.epochs, sweep.objective.metric)
        track.log_dir(parent, Path(tmp))
        cost = json.loads((Path(tmp) / "cost.json").read_text())
    track.log_metrics(parent, {f"cost_{k}": float(v) for k, v in cost.items()}, step=len(study.trials))
    return skipped


def _publish_quietly(study: optuna.Study, parent: str, sweep: Sweep) -> None:
    try:
        publish(study, parent, sweep)
    except Exception as exc:  # a report is never worth a crashed sweep; the next rebuild retries
        print(f"cifar_exp: could not update the study report: {type(exc).__name__}: {exc}", file=sys.stderr)


def _finish_parent(study: optuna.Study, parent: str, trials: Sequence[FrozenTrial], best: list[FrozenTrial],
                   sweep: Sweep, interrupted: bool) -> None:
    tags: dict[str, Any] = {"trials_finished": len(counted(trials))}
    if best:
        top = best[0]
        tags.update({"best_trial": top.number, "best_run_id": top.user_attrs.get("mlflow_run_id", ""),
                     **{f"best.{k}": v for k, v in top.params.items()}})
        metrics = {f"best_{sweep.objective.metric}": top.value or 0.0}
        metrics.update({f"best_{k}": v for k, v in top.user_attrs.items()
                        if k.startswith("test_") and isinstance(v, float)})
        track.log_metrics(parent, metrics, step=top.number)
    _publish_quietly(study, parent, sweep)
    track.end_run(parent, "KILLED" if interrupted else "FINISHED", tags)
