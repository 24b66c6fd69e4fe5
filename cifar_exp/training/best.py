"""The best epoch of a run: the variables of the epoch that scored best on the objective's
metric, kept in memory while training goes on, and put back into the model when it ends
(``model_epoch: best``), so that the test pass, the artifacts and the logged model are that
epoch's. Imports neither optuna nor mlflow.

Decision: a copy of the variables in host memory, taken only when an epoch beats every earlier
one, not a file per epoch (what a checkpoint callback writes): the seed CNN's 288,554 float32
parameters (plus BatchNorm statistics) are about 1.2 MB, copied a few times per trial. Ties keep
the earlier epoch: the same score with fewer steps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import keras
import numpy as np


@dataclass
class Kept:
    """The best epoch so far: its index (0-based, the step of its metrics), its value, and the
    train model's variables after it (``snapshot``)."""

    epoch: int
    value: float
    variables: list[np.ndarray]


class BestEpoch(keras.callbacks.Callback):
    """After every epoch, keeps the train model's variables if the epoch's ``metric`` beats every
    earlier epoch's (``direction`` maximize or minimize); an epoch without the metric, or with a
    value that is not finite, never counts. ``kept`` may start from a resumed checkpoint's."""

    def __init__(self, metric: str, direction: Literal["maximize", "minimize"], kept: Kept | None = None) -> None:
        super().__init__()
        self.metric, self.sign = metric, 1.0 if direction == "maximize" else -1.0
        self.kept = kept

    def better(self, value: float) -> bool:
        return math.isfinite(value) and (self.kept is None or self.sign * value > self.sign * self.kept.value)

    def on_epoch_end(self, epoch, logs=None):  # type: ignore[no-untyped-def]
        value = float((logs or {}).get(self.metric, math.nan))
        if self.better(value):
            self.kept = Kept(epoch, value, snapshot(self.model))


def snapshot(model: keras.Model) -> list[np.ndarray]:
    """Copies of ``model.variables`` in host memory (bfloat16 as float32, which holds it exactly)."""
    arrays = [np.array(keras.ops.convert_to_numpy(v)) for v in model.variables]
    return [a.astype(np.float32) if a.dtype.name == "bfloat16" else a for a in arrays]


def assign(model: keras.Model, arrays: list[np.ndarray]) -> None:
    """Set ``model.variables`` to ``arrays`` (as ``snapshot`` took them)."""
    if len(arrays) != len(model.variables):
        raise RuntimeError(f"{len(arrays)} kept arrays for {len(model.variables)} variables")
    for variable, array in zip(model.variables, arrays, strict=True):
        variable.assign(keras.ops.cast(array, variable.dtype))


def chosen_epoch(history: Mapping[str, list[float]], metric: str, direction: Literal["maximize", "minimize"]) -> int:
    """The epoch ``BestEpoch`` keeps for ``history`` (the first best finite value of ``metric``);
    the last epoch where no value is finite."""
    values = history.get(metric, [])
    sign = 1.0 if direction == "maximize" else -1.0
    finite = [(sign * v, -i) for i, v in enumerate(values) if math.isfinite(v)]
    return -max(finite)[1] if finite else max(len(values) - 1, 0)
