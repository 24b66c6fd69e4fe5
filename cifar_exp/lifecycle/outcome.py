"""How a trial ends, as ``run_trial`` returns it and its engine records it: ``Completed``,
``Pruned``, ``Infeasible`` or ``Failed``; the tags and status each ends its MLflow run with
(``end_tags``); the time limit that can end it (``TimeLimit``) and the exceptions that stop it
(``Prune``, ``Interruption``). Imports neither Optuna, MLflow nor Keras.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cifar_exp.config.goals import Objective


@dataclass(frozen=True)
class Completed:
    """A complete trial's outcome, as logged: the objective's value (that of ``model_epoch``, the
    epoch whose weights it kept, counted from 1 as the terminal and the curves count: its metrics
    are MLflow's step ``model_epoch - 1``), test metrics, model (``""`` where the plan kept none),
    verdict (``{"degenerate": why}`` or ``{}``), seconds by phase, how its program came
    (``compiled``: new, reused or cache), ``metrics``: every value it can be judged on
    (``config.goals.METRICS``), and ``measured``: those with everything its test pass logged
    (per-class precision, recall and F1)."""

    run_id: str
    value: float
    test_loss: float
    test_accuracy: float
    model_uri: str
    verdict: dict[str, str]
    phases: dict[str, float]
    compiled: str
    epochs_run: int
    metrics: dict[str, float] = field(default_factory=dict)
    model_epoch: int = 0
    measured: dict[str, float] = field(default_factory=dict)

    def values(self, objectives: Sequence[Objective]) -> list[float]:
        """The values of ``objectives``, in order (what Optuna is told)."""
        return [self.metrics[o.metric] for o in objectives]


@dataclass(frozen=True)
class Pruned:
    """A trial its engine stopped early (``Prune``), or a replay that stopped where its original
    did (``TrialPlan.stop_after``): verdict, seconds by phase, ``compiled``, epochs run, why."""

    run_id: str
    verdict: dict[str, str]
    phases: dict[str, float]
    compiled: str
    epochs_run: int
    reason: str = ""


@dataclass(frozen=True)
class Infeasible:
    """A trial its static metrics (``param_count``) rule out before training: never trained."""

    run_id: str
    metrics: dict[str, float]
    reason: str  # the constraints broken, one line


@dataclass(frozen=True)
class Failed:
    """A trial that raised (``reason``, its ``fail_reason``) or was interrupted (Ctrl-C, SIGTERM)."""

    run_id: str
    reason: str
    interrupted: bool = False
    epochs_run: int = 0

    @property
    def status(self) -> str:
        return "KILLED" if self.interrupted else "FAILED"


@dataclass(frozen=True)
class Closed:
    """A run closed after its trial ended elsewhere (its worker could not close it: a full disk, a
    tracking server down), as the study recorded it: ``state`` COMPLETE, PRUNED or FAIL (with
    ``reason``; KILLED where ``interrupted``); a complete trial's ``model_uri``."""

    run_id: str
    state: str
    reason: str = ""
    interrupted: bool = False
    model_uri: str = ""


Outcome = Completed | Pruned | Infeasible | Failed


def end_tags(outcome: Outcome | Closed) -> tuple[str, dict[str, Any]]:
    """The MLflow status and tags a trial's run ends with, by its outcome."""
    if isinstance(outcome, Closed):
        if outcome.state in ("COMPLETE", "PRUNED"):
            return "FINISHED", {"state": outcome.state}
        return "KILLED" if outcome.interrupted else "FAILED", {"state": "FAIL", "fail_reason": outcome.reason}
    if isinstance(outcome, Completed):
        return "FINISHED", {"state": "COMPLETE", **({"model_uri": outcome.model_uri} if outcome.model_uri else {}),
                            "model_epoch": outcome.model_epoch, **outcome.verdict}
    if isinstance(outcome, Pruned):
        return "FINISHED", {"state": "PRUNED", "pruned": "true", "pruned_epoch": outcome.epochs_run,
                            **outcome.verdict}
    if isinstance(outcome, Infeasible):
        return "FINISHED", {"state": "PRUNED", "pruned": "true", "pruned_epoch": 0, "infeasible": outcome.reason}
    return outcome.status, {"state": "FAIL", "fail_reason": outcome.reason}


class Prune(Exception):
    """Raised by an engine's ``epoch`` to stop the trial as pruned; its message is the reason."""


class Interruption(BaseException):
    """A stop from outside (SIGTERM in a worker): the trial ends KILLED and the exception goes on.
    A BaseException, so that ``except Exception`` lets it through; ``KeyboardInterrupt`` counts too."""


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


def kept_metrics(history: Mapping[str, Sequence[float]], kept_epoch: int) -> dict[str, float]:
    """The per-epoch metrics (``config.goals.EPOCH_METRICS``) of the epoch ``kept_epoch``."""
    from cifar_exp.config.goals import EPOCH_METRICS

    return {k: v[kept_epoch] for k, v in history.items() if k in EPOCH_METRICS}
