"""A worker's compiled programs: the train, validation and predict functions Keras traced and
compiled for one trial, kept for the next trial of the same structure.

Keras compiles a model's train step on its first ``fit`` and keeps it on the model. Every number a
sweep searches is a variable of the model (``layers.RuntimeDropout``) or of the optimizer
(``optimizers``), so two trials whose settings differ only in those numbers have one structure,
and the second can train the first one's model: its variables are overwritten with those of a
fresh build (weights initialised from the trial's seed, new optimizer state, the trial's values),
and Keras runs the program it already compiled. The numbers come out bit-identical to a fresh
build's: the same program on the same values.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import asdict, dataclass
from typing import Literal

import keras

from cifar_exp.config import TrainConfig
from cifar_exp.training.models import block_dropout

# TrainConfig fields that are variable values, not constants of the compiled program. The rest
# (layers, widths, activation, pooling, batch size, precision, augmentation, optimizer kind,
# Nesterov, BatchNorm momentum, transfer settings) make a new structure: docs/sweeps.md lists them.
RUNTIME = frozenset({
    "learning_rate", "lr_scaling", "base_batch_size", "lr_schedule", "step_stages", "step_factor", "decay_rate",
    "warmup_epochs", "warmup_fraction", "plateau_factor", "plateau_patience", "momentum", "weight_decay",
    "label_smoothing", "dropout", "dropout_growth", "head_dropout",
})
CAPACITY = 2  # programs a worker keeps: the last two structures it trained

Origin = Literal["new", "reused"]


def structure(cfg: TrainConfig, shapes: tuple[tuple[int, ...], ...], num_classes: int) -> Hashable:
    """The key of ``cfg``'s compiled programs on data of array ``shapes`` (training, validation
    and test images): every setting that is not a runtime value, which dropout layers exist (a
    rate of 0 builds none), the data's shapes, the class count and the backend."""
    fixed = tuple(sorted((k, v) for k, v in asdict(cfg).items() if k not in RUNTIME))
    dropouts = tuple(block_dropout(cfg, block) > 0 for block in range(cfg.blocks)) + (cfg.head_dropout > 0,)
    return fixed, dropouts, shapes, num_classes, keras.backend.backend()


@dataclass
class Program:
    """A compiled pair of ``models.build``: ``train_model`` (compiled, with its optimizer) and the
    inference ``model`` sharing its weights."""

    train_model: keras.Model
    model: keras.Model


def _copy(targets: list, sources: list, what: str) -> None:
    if len(targets) != len(sources):
        raise RuntimeError(f"cannot reuse the program: {len(sources)} {what} variables against {len(targets)}")
    for target, source in zip(targets, sources, strict=True):
        if tuple(target.shape) != tuple(source.shape):
            raise RuntimeError(f"cannot reuse the program: {what} variable {target.path} is {tuple(target.shape)}, "
                               f"{source.path} is {tuple(source.shape)}")
        target.assign(source)


class Programs:
    """The programs one worker compiled, by ``structure`` key, the ``CAPACITY`` most recent kept."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self._kept: OrderedDict[Hashable, Program] = OrderedDict()

    def __len__(self) -> int:
        return len(self._kept)

    def reuse(self, key: Hashable, fresh: keras.Model, optimizer: keras.optimizers.Optimizer) -> Program | None:
        """The program kept for ``key`` with the state of the freshly built ``fresh`` train model
        and the unbuilt ``optimizer`` copied into it; None if none is kept."""
        program = self._kept.get(key)
        if program is None:
            return None
        self._kept.move_to_end(key)
        _copy(program.train_model.variables, fresh.variables, "model")
        optimizer.build(fresh.trainable_variables)
        _copy(program.train_model.optimizer.variables, optimizer.variables, "optimizer")
        return program

    def keep(self, key: Hashable, program: Program) -> None:
        """Keep ``program`` (compiled by its first ``fit``) for ``key``; the oldest goes past capacity."""
        self._kept[key] = program
        self._kept.move_to_end(key)
        while len(self._kept) > self.capacity:
            self._kept.popitem(last=False)
