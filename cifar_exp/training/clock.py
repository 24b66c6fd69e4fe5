"""A trial's seconds by phase, the XLA compilation seconds booked apart (``Clock``). Imports
neither optuna nor mlflow."""

from __future__ import annotations

import time

from cifar_exp.training import backend


class Clock:
    """A trial's seconds by phase (``TrainResult.phases``), from its creation: each ``lap`` books
    the seconds since the last one to a phase, less the XLA compilation seconds in them (JAX),
    which go to compile_seconds. A caller that passes its own to ``train`` still reads the phases
    done when training raised (a pruned trial's)."""

    def __init__(self) -> None:
        self.meter = backend.CompileMeter()
        self.phases = {"compile_seconds": 0.0}
        self.reused = False  # set by train: the trial ran a program a previous one compiled
        self.feed = "fit"  # set by train: how the batches reached the model (``feed``)
        self._mark()

    def _mark(self) -> None:
        self.wall, self.compiling = time.perf_counter(), self.meter.seconds or 0.0

    def first_step(self, at: float) -> None:
        """Under TensorFlow, which reports no compile events, the seconds from the mark to the
        first training step (``at``, ``time.perf_counter``) of a program not reused are its
        compile seconds."""
        if not self.meter.active and not self.reused:
            self.phases["compile_seconds"] += at - self.wall
            self.wall = at

    def origin(self) -> str:
        """``TrainResult.compiled``: "reused", "cache" (every program from JAX's persistent
        compilation cache) or "new"."""
        if self.reused:
            return "reused"
        return "cache" if self.meter.cache_hits and not self.meter.compilations else "new"

    def lap(self, phase: str) -> None:
        compiling = (self.meter.seconds or 0.0) - self.compiling
        self.phases[phase] = time.perf_counter() - self.wall - compiling
        self.phases["compile_seconds"] += compiling
        self._mark()
