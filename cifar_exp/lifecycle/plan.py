"""What an engine decides about one trial: ``TrialPlan``. Imports neither Optuna, MLflow nor Keras."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cifar_exp.config import Sweep, TrainConfig
from cifar_exp.config.records import TrialRecipe

if TYPE_CHECKING:
    from cifar_exp.training.checkpoints import Slot


def _all_values(hp: Any) -> dict[str, Any]:
    return dict(hp.values)


@dataclass(frozen=True)
class TrialPlan:
    """What an engine decides about one trial of ``sweep``. The run goes into ``experiment``:
    under ``parent_run_id`` as trial ``number`` (a sweep's trial), or named ``name`` (a rerun, a
    confirmation seed); ``params`` default to the recipe's; ``tags`` are the engine's, added to the
    recipe's and ``engine``. ``hypermodel`` (the sweep's, loaded) builds the model from
    ``hyperparameters`` (a KerasTuner ``HyperParameters``: Optuna's, the tuner's or fixed values),
    of which ``own`` picks the hypermodel's own to log. ``checkpoint`` (with ``resumed_from``, the
    trial whose file it took over), ``time_limit`` (seconds), ``stop_after`` (a replay of a trial
    that stopped early: that many epochs, then ``Pruned``) and ``keep_model`` (confirmation seeds
    log none) complete it."""

    sweep: Sweep
    recipe: TrialRecipe
    engine: str  # the run's engine tag: optuna, keras-tuner, rerun, confirmation
    cfg: TrainConfig
    experiment: str
    title: str = ""
    tags: Mapping[str, Any] = field(default_factory=dict)
    parent_run_id: str | None = None
    number: int | None = None
    name: str = ""
    params: Mapping[str, Any] | None = None
    hypermodel: Any = None
    hyperparameters: Any = None
    own: Callable[[Any], dict[str, Any]] = _all_values
    checkpoint: Slot | None = None
    resumed_from: int | None = None
    time_limit: float | None = None
    stop_after: int | None = None
    keep_model: bool = True
