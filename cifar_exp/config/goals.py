"""What a sweep searches for and how: its objectives, constraints, sampler and pruner (the
``objective(s)``, ``constraints``, ``sampler`` and ``pruner`` sections of a sweep file), and the
metrics a trial can be judged on. Imports nothing of the package: the schema (``config``) builds on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# What a trial can be judged on (objectives, constraints, ``register --pick/--where``). The
# Keras logs keys come per epoch: the first objective must be one of them, since pruning follows
# its learning curve. The others are measured once a trial has trained: its test pass, its model's
# size (known before training: a constraint on it is checked before any epoch), and its inference
# model's speed on the device it trained on (``training.latency``).
EPOCH_METRICS = ("val_accuracy", "val_loss", "accuracy", "loss")
FINAL_METRICS = ("test_accuracy", "test_loss", "param_count", "latency_ms", "throughput")
METRICS = EPOCH_METRICS + FINAL_METRICS
SPEED_METRICS = ("latency_ms", "throughput")  # measured only in sweeps that judge on them
BETTER: dict[str, Literal["maximize", "minimize"]] = {
    "val_accuracy": "maximize", "accuracy": "maximize", "test_accuracy": "maximize", "throughput": "maximize",
    "val_loss": "minimize", "loss": "minimize", "test_loss": "minimize", "param_count": "minimize",
    "latency_ms": "minimize"}
Metric = Literal["val_accuracy", "val_loss", "accuracy", "loss", "test_accuracy", "test_loss", "param_count",
                 "latency_ms", "throughput"]


def shown(value: float) -> str:
    """A metric's value for a line of text: a whole number whole (a parameter count), else 4 digits."""
    return f"{value:.0f}" if float(value).is_integer() and abs(value) < 1e15 else f"{value:.4g}"


def _range(low: float, high: float | None = None) -> dict[str, Any]:
    return {"range": (low, high, False)}


@dataclass(frozen=True)
class Objective:
    metric: Metric = "val_accuracy"
    direction: Literal["maximize", "minimize"] = "maximize"


@dataclass(frozen=True)
class Bound:
    """A constraint on one metric: feasible when ``min <= value <= max`` (either may be open)."""

    min: float | None = None
    max: float | None = None

    def excess(self, value: float) -> float:
        """How far ``value`` is outside the bound (Optuna's constraint value: 0 or less is feasible)."""
        over = value - self.max if self.max is not None else -float("inf")
        under = self.min - value if self.min is not None else -float("inf")
        return max(over, under)

    def __str__(self) -> str:
        return " and ".join(part for part in (f">= {shown(self.min)}" if self.min is not None else "",
                                              f"<= {shown(self.max)}" if self.max is not None else "") if part)


# The samplers a sweep can name, the options each takes, and which take several objectives.
# Optuna's GPSampler is not offered: it needs PyTorch, which this project does not install.
SAMPLER_OPTIONS = {"tpe": {"multivariate", "group", "constant_liar", "n_startup_trials"},
                   "nsga2": {"population_size"}, "nsga3": {"population_size"}, "cmaes": set(), "random": set()}
MULTI_OBJECTIVE_SAMPLERS = ("tpe", "nsga2", "nsga3", "random")


@dataclass(frozen=True)
class SamplerConfig:
    """An option left unset takes the value written out in ``sweep.space.make_sampler`` (Optuna
    5.1's defaults, passed explicitly so that a study samples the same on 5.0 and 5.1)."""

    name: Literal["tpe", "nsga2", "nsga3", "cmaes", "random"] = "tpe"
    seed: int = field(default=0, metadata=_range(0, 2**32 - 1))  # what NumPy and the samplers accept
    # TPE: multivariate (default: true with one objective, false with several), group (default:
    # true where the space has when: conditions), constant_liar (default true: parallel workers
    # do not sample the same point), n_startup_trials (random trials first, default 10).
    multivariate: bool | None = None
    group: bool | None = None
    constant_liar: bool | None = None
    n_startup_trials: int | None = field(default=None, metadata=_range(0, 10_000))
    population_size: int | None = field(default=None, metadata=_range(2, 10_000))  # NSGA-II/III, default 50

    def options(self) -> set[str]:
        """The options this file sets (not left to their defaults)."""
        return {name for name in ("multivariate", "group", "constant_liar", "n_startup_trials", "population_size")
                if getattr(self, name) is not None}


@dataclass(frozen=True)
class WarmStart:
    """Start with the ``top`` best complete feasible trials of the study ``sweep`` (same storage)."""

    sweep: str = ""
    top: int = field(default=5, metadata=_range(1, 1000))


@dataclass(frozen=True)
class PrunerConfig:
    name: Literal["hyperband", "median", "none"] = "hyperband"
    min_epochs: int = field(default=1, metadata=_range(1, 10_000))  # no pruning before this
    reduction_factor: int = field(default=3, metadata=_range(2, 10))  # hyperband
