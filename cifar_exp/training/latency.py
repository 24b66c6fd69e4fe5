"""How fast a trained model answers, on the device it trained on: ``latency_ms`` (one image at a
time, as a service answering single requests sees it) and ``throughput`` (images per second at
the predict batch, as a batch job sees it). Imports neither Optuna nor MLflow.

Decisions: ``predict_on_batch`` rather than ``predict`` (which builds a dataset and a progress
loop per call: on the 2-core CPU machine, the seed CNN's batch-1 call took a median 99.5 ms
through ``predict`` and 2.9 ms through ``predict_on_batch`` under TensorFlow, 4.5 ms and 2.6 ms
under JAX, so ``predict`` would time its loop, not the model). Warm-up calls first: the first
call of a shape traces and compiles. The median of the repeats, so one scheduling hiccup does
not move the figure.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np

WARMUP = 5
REPEATS = 30  # batch-1 calls timed
BATCH_REPEATS = 3  # predict-batch calls timed
PREDICT_BATCH = 256


def measure(model: Any, images: np.ndarray, repeats: int = REPEATS, batch: int = PREDICT_BATCH) -> dict[str, float]:
    """``latency_ms``: the median over ``repeats`` batch-1 ``predict_on_batch`` calls of ``model``
    (uint8 images in) after warm-up; ``throughput``: images per second of a ``batch``-image call
    (median of a few, after one warm-up; ``images`` repeated to fill the batch)."""
    one = images[:1]
    for _ in range(WARMUP):
        model.predict_on_batch(one)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.asarray(model.predict_on_batch(one))  # asarray: wait for the device's answer
        seconds.append(time.perf_counter() - start)
    full = np.resize(images, (batch, *images.shape[1:])) if len(images) < batch else images[:batch]
    np.asarray(model.predict_on_batch(full))
    batches = []
    for _ in range(BATCH_REPEATS):
        start = time.perf_counter()
        np.asarray(model.predict_on_batch(full))
        batches.append(time.perf_counter() - start)
    return {"latency_ms": 1000 * statistics.median(seconds), "throughput": batch / statistics.median(batches)}
