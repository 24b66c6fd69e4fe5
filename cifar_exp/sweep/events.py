"""What a sweep's workers tell the sweep command, as typed events, and the one tally of them.

A worker (``worker``) or the KerasTuner engine (``tuner``) emits these; the supervisor
(``study``) and the progress display (``progress``) both count them with ``Tally``, so the
budget count, the failure streak and the best value are worked out in one place.
Imports nothing of the package: every floor may use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

INTERRUPTED = "interrupted"  # the reason of a trial ended by Ctrl-C or SIGTERM (it does not count)


@dataclass(frozen=True)
class Ready:
    """A worker loaded the data and checked the sweep's models; it claims trials now."""

    worker: int


@dataclass(frozen=True)
class Fatal:
    """A worker found the sweep cannot run at all (ImageNet weights missing, a broken hypermodel)."""

    worker: int
    reason: str


@dataclass(frozen=True)
class Started:
    worker: int
    trial: int
    run_id: str
    params: Mapping[str, Any]


@dataclass(frozen=True)
class Epoch:
    trial: int
    epoch: int  # 1-based: epochs completed
    epochs: int
    value: float  # the objective's metric
    logs: Mapping[str, float] = field(default_factory=dict)  # Keras' logs of the epoch


@dataclass(frozen=True)
class Steps:
    """Progress inside an epoch: ``step`` of its ``steps`` training steps are done (at most one of
    these every ``lifecycle.steps.PROGRESS_SECONDS``)."""

    trial: int
    epoch: int  # 1-based: the epoch under way
    epochs: int
    step: int
    steps: int


@dataclass(frozen=True)
class Tick:
    """No worker's: the sweep command's own clock, about once a second, so that a live display's
    elapsed time, estimate and running trials move between the workers' events."""


@dataclass(frozen=True)
class Ended:
    """A trial's end. ``reason`` is why it was pruned or failed (``INTERRUPTED`` for a stop);
    ``retried`` says a failed trial is queued once more (so it does not count)."""

    trial: int
    state: Literal["COMPLETE", "PRUNED", "FAIL"]
    run_id: str = ""
    value: float | None = None
    test_accuracy: float | None = None
    reason: str = ""
    degenerate: str = ""
    infeasible: str = ""  # the constraints a complete trial broke: it is never the best
    retried: bool = False

    @property
    def counts(self) -> bool:
        """Whether the trial counts against the budget (``storage.counted`` on the stored trials)."""
        return not (self.reason.startswith(INTERRUPTED) or self.retried)


@dataclass(frozen=True)
class Stale:
    """A trial left RUNNING by a worker that is gone: failed, and retried once."""

    trial: int
    reason: str


@dataclass(frozen=True)
class Warmed:
    """A warm-start trial enqueued (or a source dropped): one line of ``sweep.warmstart.seed``."""

    line: str


Event = Ready | Fatal | Started | Epoch | Steps | Ended | Stale | Warmed | Tick


@dataclass
class Tally:
    """The counts a sweep shows and acts on, from the trials before this run (``finished``,
    ``states``, ``best``) plus every ``Ended`` event since."""

    maximize: bool
    finished: int = 0  # trials that count against the budget
    states: dict[str, int] = field(default_factory=lambda: {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0})
    best: tuple[float, int] | None = None  # (value, trial), of the feasible complete trials
    infeasible: int = 0  # complete trials that broke a constraint
    failures_in_a_row: int = 0

    def add(self, event: Ended) -> bool:
        """Count ``event``; True if it is a new best."""
        self.states[event.state] = self.states.get(event.state, 0) + 1
        self.finished += event.counts
        if event.state == "FAIL":
            self.failures_in_a_row += event.reason != INTERRUPTED
            return False
        self.failures_in_a_row = 0
        if event.state != "COMPLETE" or event.value is None:
            return False
        if event.infeasible:
            self.infeasible += 1
            return False
        if self.best is None or (event.value > self.best[0] if self.maximize else event.value < self.best[0]):
            self.best = (event.value, event.trial)
            return True
        return False
