"""Judging finished trials by a sweep's objectives and constraints: a trial's values, whether it
is feasible, the Pareto front, the ranking every command shows (``ranked``), and the rule a user
states to pick one trial of the front (``Rule``: ``--pick METRIC --where 'METRIC<=X'``).

Pure: works on anything shaped like Optuna's ``FrozenTrial`` (``number``, ``state``, ``values``,
``constraints``, ``user_attrs``), imports neither Optuna nor MLflow.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cifar_exp.config import ConfigError
from cifar_exp.config.goals import BETTER, METRICS, Bound, Objective, shown
from cifar_exp.config.records import TrialAttrs


class Judged(Protocol):
    """An Optuna trial as ``FrozenTrial`` shows it."""

    @property
    def number(self) -> int: ...
    @property
    def state(self) -> Any: ...  # Optuna's TrialState (its ``name``: COMPLETE, PRUNED, ...)
    @property
    def values(self) -> list[float] | None: ...
    @property
    def constraints(self) -> dict[str, float]: ...
    @property
    def user_attrs(self) -> dict[str, Any]: ...


def value(trial: Judged) -> float | None:
    """The trial's first objective's value (the one pruning follows), None before it completes."""
    return trial.values[0] if trial.values else None


def feasible(trial: Judged) -> bool:
    """Every constraint met (Optuna's convention: a constraint value of 0 or less)."""
    return all(c <= 0 for c in trial.constraints.values())


def metric(trial: Judged, objectives: Sequence[Objective], name: str) -> float | None:
    """The trial's value of ``name``: an objective's, else what the trial recorded (test metrics,
    ``param_count``, ``latency_ms``, ``throughput``); None where it has none."""
    for i, objective in enumerate(objectives):
        if objective.metric == name and trial.values and i < len(trial.values):
            return float(trial.values[i])
    recorded = TrialAttrs.of(trial).judged()
    return recorded.get(name)


def _dominates(a: Sequence[float], b: Sequence[float], signs: Sequence[int]) -> bool:
    return all(s * x >= s * y for x, y, s in zip(a, b, signs, strict=True)) and \
        any(s * x > s * y for x, y, s in zip(a, b, signs, strict=True))


def candidates(trials: Sequence[Judged]) -> list[Judged]:
    """The complete, feasible trials with values: the only ones that can be best."""
    return [t for t in trials if t.state.name == "COMPLETE" and t.values and feasible(t)]


def front(trials: Sequence[Judged], objectives: Sequence[Objective]) -> list[Judged]:
    """The Pareto front of the feasible complete trials (no other is at least as good in every
    objective and better in one), ordered by the first objective, best first. With one
    objective: the best trial (and any tied with it)."""
    signs = [1 if o.direction == "maximize" else -1 for o in objectives]
    pool = candidates(trials)
    n = len(signs)
    kept = [t for t in pool if not any(_dominates((o.values or [])[:n], (t.values or [])[:n], signs)
                                       for o in pool if o is not t)]
    return sorted(kept, key=lambda t: (-signs[0] * (t.values or [0.0])[0], t.number))


def ranked(trials: Sequence[Judged], objectives: Sequence[Objective]) -> list[Judged]:
    """The feasible complete trials, best first: the front (by the first objective), then the
    rest by the first objective. Infeasible trials are never ranked."""
    sign = 1 if objectives[0].direction == "maximize" else -1
    on_front = front(trials, objectives)
    ids = {t.number for t in on_front}
    rest = sorted((t for t in candidates(trials) if t.number not in ids),
                  key=lambda t: (-sign * (t.values or [0.0])[0], t.number))
    return [*on_front, *rest]


_OPS: dict[str, Callable[[float, float], bool]] = {"<=": operator.le, ">=": operator.ge, "<": operator.lt,
                                                   ">": operator.gt}
# A number as Python writes one (no inf or nan, no digits of other scripts): 2, -0.5, 1e-3, .5
_CONDITION = re.compile(r"^\s*([a-z_]+)\s*(<=|>=|<|>)\s*([-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)\s*$",
                        re.ASCII)


@dataclass(frozen=True)
class Rule:
    """How to pick one trial: the best ``pick`` metric among the front members (or, with
    ``anywhere``, all feasible trials) that meet every condition of ``where``."""

    pick: str
    where: tuple[tuple[str, str, float], ...] = ()

    @classmethod
    def parse(cls, pick: str, where: Sequence[str] = ()) -> Rule:
        """``pick`` a metric name; ``where`` conditions such as ``latency_ms<=2``. ``ConfigError``
        names a malformed condition or an unknown metric."""
        if pick not in METRICS:
            raise ConfigError(f"--pick {pick}: not a metric a trial is judged on (one of {', '.join(METRICS)})")
        conditions = []
        for text in where:
            for part in text.split(","):
                match = _CONDITION.match(part)
                if not match or match.group(1) not in METRICS or not math.isfinite(float(match.group(3))):
                    raise ConfigError(f"--where {part.strip()!r}: write METRIC<=NUMBER (or >=, <, >) with a metric "
                                      f"among {', '.join(METRICS)}, e.g. latency_ms<=2")
                conditions.append((match.group(1), match.group(2), float(match.group(3))))
        return cls(pick, tuple(conditions))

    def __str__(self) -> str:
        where = " and ".join(f"{m}{op}{v:g}" for m, op, v in self.where)
        return f"best {self.pick} on the Pareto front" + (f" where {where}" if where else "")

    def admitted(self, trials: Sequence[Judged], objectives: Sequence[Objective]) -> list[Judged]:
        """The front members that meet the rule's conditions, best ``pick`` first."""
        def meets(t: Judged) -> bool:
            return all((v := metric(t, objectives, m)) is not None and _OPS[op](v, bound)
                       for m, op, bound in self.where)

        pool = [t for t in front(trials, objectives) if meets(t) and metric(t, objectives, self.pick) is not None]
        sign = 1 if BETTER[self.pick] == "maximize" else -1
        return sorted(pool, key=lambda t: (-sign * (metric(t, objectives, self.pick) or 0.0), t.number))

    def choose(self, trials: Sequence[Judged], objectives: Sequence[Objective]) -> Judged | None:
        """The front member this rule picks, None if none meets its conditions."""
        pool = self.admitted(trials, objectives)
        return pool[0] if pool else None


def constraint_values(constraints: Mapping[str, Bound], measured: Mapping[str, float]) -> dict[str, float]:
    """Optuna's constraint value per constrained metric ``measured`` has (0 or less: met)."""
    return {name: bound.excess(measured[name]) for name, bound in constraints.items() if name in measured}


def broken(constraints: Mapping[str, Bound], measured: Mapping[str, float]) -> str:
    """The constraints ``measured`` breaks, as one line (``param_count 2100000, not <= 1000000``);
    ``""`` when it breaks none."""
    return "; ".join(f"{name} {shown(measured[name])}, not {constraints[name]}"
                     for name, excess in constraint_values(constraints, measured).items() if excess > 0)
