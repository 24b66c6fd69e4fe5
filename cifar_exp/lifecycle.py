"""One tracked trial, start to end: its MLflow run with the tags every trial carries, its
per-epoch metrics (the first with ``first_step_seconds``), its test evaluation and model, the
verdict on degenerate numbers, and the run's end with the outcome and its reason.

The Optuna worker (``study``), the KerasTuner engine (``tuner``) and reruns (``reproduce``) all
track a trial through this module, so the engines cannot drift apart; each keeps its own search
algorithm (ask, report, prune, tell) between these steps. Imports neither optuna nor keras.
"""

from __future__ import annotations

import hashlib
import json
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cifar_exp import track
from cifar_exp.config import Sweep
from cifar_exp.evaluate import degenerate


def run_tags(sweep: Sweep, engine: str, identity: Mapping[str, str], extra: Mapping[str, Any]) -> dict[str, Any]:
    """The tags of a trial's run: ``extra`` (provenance, engine details), the process ``identity``
    (backend, versions, device) and what a rerun needs to rebuild the trial's data and mode."""
    return {**extra, **identity, "sweep": sweep.name, "engine": engine, "sweep_sha256": sweep.content_hash,
            "sweep_seed": sweep.sampler.seed, "validation_fraction": sweep.data.validation_fraction,
            "train_images": sweep.data.train_images or "all", "deterministic": str(sweep.deterministic).lower()}


def trial_seed(sweep_seed: int, trial_number: int) -> int:
    """The seed of trial ``trial_number``: a hash of (sweep seed, trial number), 31 bits."""
    digest = hashlib.sha256(f"{sweep_seed}:{trial_number}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


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


def failure_reason(exc: BaseException) -> str:
    """The one-line ``fail_reason`` of a trial that raised ``exc``."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:500]


class TrialTimeout(Exception):
    """A trial ran past the sweep's ``trial_timeout``."""


class TimeLimit:
    """The sweep's ``trial_timeout`` over one trial (a context manager, in the main thread: SIGALRM).
    Past it, the alarm raises ``TrialTimeout`` at once if ``interruptible()`` (Keras is computing);
    elsewhere (a storage or tracking write, which must not be cut in two) ``check()``, called at
    the next safe point, raises it. Without ``seconds`` it never expires."""

    def __init__(self, seconds: float | None, interruptible: Callable[[], bool]) -> None:
        self.seconds, self.interruptible = seconds, interruptible
        self.expired = False
        self.reason = f"TrialTimeout: ran past trial_timeout ({seconds:g} s)" if seconds else ""
        self._before: Any = None

    def _ring(self, signum: int, frame: object) -> None:
        self.expired = True
        if self.interruptible():
            raise TrialTimeout(self.reason.removeprefix("TrialTimeout: "))

    def check(self) -> None:
        if self.expired:
            raise TrialTimeout(self.reason.removeprefix("TrialTimeout: "))

    def __enter__(self) -> TimeLimit:
        if self.seconds:
            self._before = signal.signal(signal.SIGALRM, self._ring)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.seconds:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._before)


@dataclass
class Tracked:
    """A trial's open run: ``log_epoch`` is the training hook that logs each epoch's metrics (the
    first epoch's with the seconds ``on_first_step`` received) and keeps them in ``history``."""

    run_id: str
    history: dict[str, list[float]] = field(default_factory=dict)
    # Seconds by phase, logged when the trial ends: claim_seconds (the engine's), then those of
    # training (``train.Clock``), artifacts_seconds and model_seconds (``evaluate``).
    phases: dict[str, float] = field(default_factory=dict)
    _first_step: dict[str, float] = field(default_factory=dict)

    def on_first_step(self, seconds: float) -> None:
        # From the trial's start (claim, run, build, compile) to its first launched training
        # step; logged with the first epoch's metrics, in the same batch.
        self._first_step["first_step_seconds"] = seconds

    def log_epoch(self, epoch: int, logs: Mapping[str, float]) -> None:
        track.log_metrics(self.run_id, {**logs, **self._first_step}, step=epoch)
        self._first_step.clear()
        for key, value in logs.items():
            self.history.setdefault(key, []).append(value)

    @property
    def epochs_run(self) -> int:
        return max((len(values) for values in self.history.values()), default=0)


def start(experiment: str, parent_run_id: str, number: int, sweep: Sweep, params: Mapping[str, Any], seed: int,
          epochs: int, tags: Mapping[str, Any], claim_seconds: float = 0.0) -> Tracked:
    """Open the run of trial ``number``: ``params`` (the trial's settings), ``seed`` and ``epochs``
    as params, ``tags`` (see ``run_tags``). Everything a rerun needs is on it once ``log_sweep``
    has added the sweep file. ``claim_seconds``: what the engine spent getting the trial."""
    return Tracked(track.start_trial_run(experiment, parent_run_id, number,
                                         params={**params, "seed": seed, "epochs": epochs}, tags=tags),
                   phases={"claim_seconds": claim_seconds})


def log_sweep(tracked: Tracked, sweep: Sweep) -> None:
    """The sweep file as the run's ``sweep.yaml`` (call it where a full disk fails the trial)."""
    track.log_text(tracked.run_id, sweep.text, "sweep.yaml")


@dataclass(frozen=True)
class Evaluated:
    model_uri: str
    verdict: dict[str, str]  # {"degenerate": why}, or {} for numbers that mean something
    phases: dict[str, float]  # the trial's seconds by phase (``Tracked.phases``), as logged


def judge(history: Mapping[str, Sequence[float]], y_prob: Any, splits: Any) -> dict[str, str]:
    """``{"degenerate": why}`` for a trial whose numbers mean nothing (``evaluation.degenerate``;
    ``y_prob`` None for a trial that never reached the test set), ``{}`` otherwise."""
    why = degenerate(history, y_prob, len(splits.y_val), splits.class_names)
    return {"degenerate": why} if why else {}


def evaluate(tracked: Tracked, result: Any, splits: Any, title: str) -> Evaluated:
    """Log a finished training's test evaluation, artifacts and model, judge its numbers, and log
    the trial's phases (metrics ``*_seconds``, see ``Tracked.phases``) with the tag ``compiled``
    (``new``, ``reused`` or ``cache``, see ``train.TrainResult``). ``result`` is a
    ``train.TrainResult``."""
    clock = time.perf_counter()
    track.log_test(tracked.run_id, result, splits, title=title)
    artifacts, clock = time.perf_counter() - clock, time.perf_counter()
    model_uri = track.models.log_model(tracked.run_id, result.model, splits.x_test[:2], splits.class_names)
    phases = {**tracked.phases, **result.phases, "artifacts_seconds": artifacts,
              "model_seconds": result.phases.get("model_seconds", 0.0) + time.perf_counter() - clock}
    log_phases(tracked, phases, result.compiled)
    return Evaluated(model_uri, judge(result.history, result.y_prob, splits), phases)


def log_phases(tracked: Tracked, phases: Mapping[str, float], compiled: str) -> None:
    """The trial's seconds by phase as metrics, and how its program came (tag ``compiled``)."""
    track.log_metrics(tracked.run_id, phases)
    track.set_tags(tracked.run_id, {"compiled": compiled})


def end_complete(tracked: Tracked, evaluated: Evaluated) -> None:
    track.end_run(tracked.run_id, "FINISHED", {"state": "COMPLETE", "model_uri": evaluated.model_uri,
                                               **evaluated.verdict})


def end_pruned(tracked: Tracked, verdict: Mapping[str, str]) -> None:
    track.end_run(tracked.run_id, "FINISHED", {"state": "PRUNED", "pruned": "true",
                                               "pruned_epoch": tracked.epochs_run, **verdict})


def end_failed(run_id: str, reason: str, status: str = "FAILED") -> None:
    """End a failed trial's run: ``status`` FAILED, or KILLED for an interruption."""
    track.end_run(run_id, status, {"state": "FAIL", "fail_reason": reason})
