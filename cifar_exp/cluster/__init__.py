"""Sweeps on the schedulers people already have. A scheduler only starts ``cifar-exp sweep NAME
--workers 1`` in each task (a Slurm array task, a pod of a Kubernetes Indexed Job); the
coordination layer stays Optuna's database storage and an MLflow server: every task claims trials
of the one study under its budget lock until the budget is met, so the number of tasks is
parallelism, not the budget. Nothing here imports Optuna, MLflow or Keras.

Decision: no Ray, Dask or scheduler of our own in the core: each would claim and end trials
outside the budget lock, the heartbeats, pruning and program reuse that the storage and the
worker already keep.

The exit codes of ``cifar-exp sweep`` are the contract a scheduler reads (``Exit``).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from enum import IntEnum


class Exit(IntEnum):
    """What a sweep process's exit code means, and what a scheduler should do with it."""

    DONE = 0  # the study's budget is met (or its timeout passed): nothing left, do not rerun
    FAILED = 1  # the sweep stopped on repeated trial failures: look before rerunning
    BAD_INPUT = 2  # bad input (one line on stderr, nothing written): a retry cannot succeed
    INTERRUPTED = 130  # SIGINT or SIGTERM: the running trial ended so that its retry resumes; run again


# The variables a scheduler sets that say where a trial ran, and the run tag each becomes.
_PLACES = {
    "SLURM_JOB_ID": "slurm_job_id",
    "SLURM_ARRAY_JOB_ID": "slurm_array_job_id",
    "SLURM_ARRAY_TASK_ID": "slurm_array_task_id",
    "SLURM_RESTART_COUNT": "slurm_restart_count",
    "SLURMD_NODENAME": "slurm_node",
    "JOB_COMPLETION_INDEX": "k8s_completion_index",
    "POD_NAME": "k8s_pod",
    "POD_NAMESPACE": "k8s_namespace",
}


def placement(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Where this process runs, as run tags: ``host``, the GPUs it sees
    (``cuda_visible_devices``, "" for all or none) and, where a scheduler started it, its job,
    array task or pod (``slurm_*``, ``k8s_*``; a pod's name is its ``HOSTNAME`` when the pod
    does not set ``POD_NAME``)."""
    env = os.environ if environ is None else environ
    tags = {"host": socket.gethostname(), "cuda_visible_devices": env.get("CUDA_VISIBLE_DEVICES", "")}
    tags.update({tag: env[name] for name, tag in _PLACES.items() if env.get(name)})
    if "k8s_completion_index" in tags and "k8s_pod" not in tags and env.get("HOSTNAME"):
        tags["k8s_pod"] = env["HOSTNAME"]
    return tags


# A share of a GPU's memory left to the CUDA context and the driver when workers split it.
_HEADROOM = 0.9


def check_gpus(gpus: tuple[str, ...], environ: Mapping[str, str] | None = None) -> None:
    """``ValueError`` (one line) when ``gpus`` (``--gpus`` indices) cannot be honoured: with
    ``CUDA_VISIBLE_DEVICES`` already set by a scheduler (Slurm's ``--gres``, a pod's device
    plugin), they index into its list and must lie within it."""
    env = os.environ if environ is None else environ
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if gpus and "CUDA_VISIBLE_DEVICES" in env and any(int(g) >= len(visible) for g in gpus):
        raise ValueError(f"--gpus {','.join(gpus)}: this process may use {len(visible)} GPU(s) "
                         f"(CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}, set by its scheduler), and --gpus "
                         f"indexes into them: give indices below {len(visible)}, or leave --gpus out")


def devices(worker: int, workers: int, gpus: tuple[str, ...],
            environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment worker ``worker`` (of ``workers``) sets before Keras first touches CUDA.
    With ``gpus``, ``CUDA_VISIBLE_DEVICES`` is ``gpus[worker % len(gpus)]``, itself an index into
    the scheduler's ``CUDA_VISIBLE_DEVICES`` when one was set (a scheduler's assignment wins:
    this never reaches a GPU it did not give). Workers that share one GPU (several on one index,
    or several without ``--gpus``) each get an equal share of its memory under JAX
    (``XLA_PYTHON_CLIENT_MEM_FRACTION``, unless set), not the whole card; TensorFlow grows its
    memory as it needs it (``TF_FORCE_GPU_ALLOW_GROWTH``, set by the command)."""
    env = os.environ if environ is None else environ
    changes: dict[str, str] = {}
    sharing = workers
    if gpus:
        mine = gpus[worker % len(gpus)]
        given = env.get("CUDA_VISIBLE_DEVICES")
        changes["CUDA_VISIBLE_DEVICES"] = given.split(",")[int(mine)].strip() if given else mine
        sharing = sum(gpus[w % len(gpus)] == mine for w in range(workers))
    if sharing > 1 and "XLA_PYTHON_CLIENT_MEM_FRACTION" not in env:
        changes["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{_HEADROOM / sharing:.3f}"
    return changes
