"""A sweep as a Kubernetes Indexed Job: ``parallelism`` pods at a time, one GPU each, every pod
running ``cifar-exp sweep NAME --workers 1`` against one database storage and one MLflow server.

How a pod's end is read (``podFailurePolicy``, by ``cluster.Exit``): exit 2 (bad input) fails the
whole Job, a retry cannot help; exit 1 (repeated trial failures) fails that index for a person to
look at; exit 130 (SIGTERM: the pod was terminated, its trial ended so that its retry resumes)
and a disruption (preemption, eviction, a drained node: the ``DisruptionTarget`` condition) are
not counted against the index's ``backoffLimitPerIndex``, and the pod is replaced once the old one
has failed (``podReplacementPolicy: Failed``: never two pods of one index at once). Any other
failure (an OOM kill) counts.

Credentials stay out of the manifest: the storage and tracking URIs may name the variables of a
Secret as ``$(VAR)``, which Kubernetes expands in a container's arguments (``--secret NAME`` puts
the Secret's keys in the environment), e.g. ``postgresql://optuna:$(PGPASSWORD)@db/optuna``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cifar_exp.cluster import Exit

CONTAINER = "sweep"
# The seconds a terminated pod gets between SIGTERM and SIGKILL: the running trial's epoch
# checkpoint and the end of its run (the supervisor gives its workers 60 s).
GRACE_SECONDS = 120


@dataclass(frozen=True)
class IndexedJob:
    """What the Job runs: the ``sweep`` (a shipped name, or a path inside the image), the
    ``storage`` and ``tracking_uri`` every pod reaches, the ``checkpoint_dir`` every pod mounts
    (``checkpoint_claim``, a ReadWriteMany PersistentVolumeClaim, when given); ``completions``
    indexes, ``parallelism`` pods at once, ``gpus`` each, from ``image``; optional ``namespace``,
    Kueue ``queue``, ``secret`` (its keys as environment variables) and the retries of an index
    (``backoff_per_index``)."""

    sweep: str
    storage: str
    tracking_uri: str
    checkpoint_dir: str
    completions: int
    parallelism: int
    image: str
    gpus: int = 1
    namespace: str = ""
    queue: str = ""
    secret: str = ""
    checkpoint_claim: str = ""
    backoff_per_index: int = 3

    @property
    def name(self) -> str:
        """The Job's name: ``cifar-exp-`` and the sweep's file name, as Kubernetes names go
        (lower case, digits and hyphens, short enough for the pods' index suffixes)."""
        stem = re.sub(r"[^a-z0-9-]+", "-", Path(self.sweep).stem.lower()).strip("-")
        return f"cifar-exp-{stem}"[:50].rstrip("-")


def manifest(job: IndexedJob) -> dict[str, Any]:
    """The Job of ``job`` as a Kubernetes object (``batch/v1``), ready for ``yaml.safe_dump``."""
    labels = {"app.kubernetes.io/name": "cifar-exp", "app.kubernetes.io/instance": job.name}
    metadata: dict[str, Any] = {"name": job.name, "labels": dict(labels)}
    if job.namespace:
        metadata["namespace"] = job.namespace
    if job.queue:
        metadata["labels"]["kueue.x-k8s.io/queue-name"] = job.queue
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": {
        "completionMode": "Indexed", "completions": job.completions, "parallelism": job.parallelism,
        "backoffLimitPerIndex": job.backoff_per_index, "podReplacementPolicy": "Failed",
        "podFailurePolicy": {"rules": [
            {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                                  "values": [int(Exit.BAD_INPUT)]}},
            {"action": "FailIndex", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                                    "values": [int(Exit.FAILED)]}},
            {"action": "Ignore", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                                 "values": [int(Exit.INTERRUPTED)]}},
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]},
        "template": {"metadata": {"labels": labels}, "spec": _pod(job)},
    }}


def _pod(job: IndexedJob) -> dict[str, Any]:
    """The pod of every index (``restartPolicy: Never``, as a pod failure policy requires)."""
    container: dict[str, Any] = {
        "name": CONTAINER, "image": job.image,
        "command": ["cifar-exp", "sweep", job.sweep, "--workers", "1", "--storage", job.storage,
                    "--tracking-uri", job.tracking_uri, "--checkpoint-dir", job.checkpoint_dir],
        # The pod's own name and namespace, tagged on each trial's run (``cluster.placement``).
        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}],
    }
    if job.gpus:
        container["resources"] = {"limits": {"nvidia.com/gpu": job.gpus}}
    if job.secret:
        container["envFrom"] = [{"secretRef": {"name": job.secret}}]
    pod: dict[str, Any] = {"restartPolicy": "Never", "terminationGracePeriodSeconds": GRACE_SECONDS,
                           "containers": [container]}
    if job.checkpoint_claim:
        container["volumeMounts"] = [{"name": "checkpoints", "mountPath": job.checkpoint_dir}]
        pod["volumes"] = [{"name": "checkpoints", "persistentVolumeClaim": {"claimName": job.checkpoint_claim}}]
    return pod
