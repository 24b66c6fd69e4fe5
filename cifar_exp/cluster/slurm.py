"""A sweep as a Slurm job array: one ``cifar-exp sweep NAME --workers 1`` per array task, each
with its own GPUs (``--gres``), against one database storage and one MLflow server.

The batch script is the task's supervisor: it starts the sweep in the background and forwards
SIGTERM to it (Slurm's ``scancel --signal=TERM``, the time limit's ``--signal``), so the running
trial ends as interrupted (exit 130, ``cluster.Exit.INTERRUPTED``) with its checkpoint on the
shared ``--checkpoint-dir``; the script then requeues its own task, and the retry of the trial
resumes from that checkpoint on whichever node the task lands. Exit 0 (the budget is met) and 2
(bad input) end the task for good; 1 (repeated failures) too, for a person to look at.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

# Seconds before the time limit at which Slurm sends the batch script SIGTERM: enough for the
# running trial to finish its epoch's checkpoint write and end its run (the supervisor gives
# workers 60 s), inside Slurm's default KillWait of 30 s after the limit itself.
SIGNAL_LEAD_SECONDS = 120


@dataclass(frozen=True)
class ArrayJob:
    """What the job array runs: the ``sweep`` (a name or a .yaml path the nodes can read), the
    ``storage`` and ``tracking_uri`` every node reaches, the shared ``checkpoint_dir``; ``tasks``
    array tasks, at most ``at_once`` running together, each with ``gpus`` GPUs and ``cpus`` cores
    for ``time`` (Slurm's format, e.g. ``4:00:00``); where the tasks start (``workdir``) and log
    (``logs``); the Python that has cifar-exp installed (``python``); optional ``partition`` and
    ``account``."""

    sweep: str
    storage: str
    tracking_uri: str
    checkpoint_dir: str
    tasks: int
    at_once: int
    gpus: int
    cpus: int
    time: str
    workdir: str
    logs: str
    python: str
    partition: str = ""
    account: str = ""

    @property
    def name(self) -> str:
        """The job's name: ``cifar-exp-`` and the sweep's file name without .yaml."""
        return f"cifar-exp-{Path(self.sweep).stem}"


def script(job: ArrayJob) -> str:
    """The sbatch script of ``job`` (bash)."""
    options = [f"--job-name={job.name}", f"--array=0-{job.tasks - 1}%{job.at_once}", "--ntasks=1",
               f"--cpus-per-task={job.cpus}", *([f"--gres=gpu:{job.gpus}"] if job.gpus else []),
               f"--time={job.time}", "--requeue", "--open-mode=append", f"--signal=B:TERM@{SIGNAL_LEAD_SECONDS}",
               f"--output={job.logs}/%x-%A_%a.out",
               *([f"--partition={job.partition}"] if job.partition else []),
               *([f"--account={job.account}"] if job.account else [])]
    command = shlex.join([job.python, "-m", "cifar_exp", "sweep", job.sweep, "--workers", "1",
                          "--storage", job.storage, "--tracking-uri", job.tracking_uri,
                          "--checkpoint-dir", job.checkpoint_dir])
    lines = ["#!/bin/bash", f"# {job.name}: written by cifar-exp launch slurm; submit with sbatch",
             *(f"#SBATCH {option}" for option in options), "",
             "set -u", f"cd {shlex.quote(job.workdir)}",
             "# The sweep in the background, so that this shell can forward SIGTERM to it.",
             f"{command} &", 'child=$!', """trap 'kill -TERM "$child" 2>/dev/null' TERM""",
             'wait "$child"; code=$?',
             '# wait returns at the trapped signal: wait again for the sweep to end its trial',
             'while kill -0 "$child" 2>/dev/null; do wait "$child"; code=$?; done',
             'if [ "$code" -eq 130 ]; then  # interrupted: this task runs again, its trial resumes',
             '    scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"',
             'fi',
             'exit "$code"', ""]
    return "\n".join(lines)
