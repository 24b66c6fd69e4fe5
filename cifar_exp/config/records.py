"""The typed records modules hand each other through the stores: what a trial keeps in Optuna
(``TrialAttrs``, its ``user_attrs``) and what a trial's MLflow run holds for a rerun
(``TrialRecipe``, its params and tags). Each is written and read by one class, so a writer and its
readers cannot disagree on a key. Imports neither Optuna nor MLflow: a record takes the plain
mappings the stores hand out.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from cifar_exp.config import UserError
from cifar_exp.config.values import train_values_from_strings


class HasUserAttrs(Protocol):
    """An Optuna trial (``Trial`` or ``FrozenTrial``): what ``TrialAttrs.of`` reads."""

    @property
    def user_attrs(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class TrialAttrs:
    """A trial's Optuna ``user_attrs``, typed. Written with ``encode`` (one attribute per field, a
    phase per ``*_seconds`` attribute), read with ``of``. Every field is unset (None) until the
    step that owns it writes it:

    - the claim (``sweep.storage.claim``): ``worker_pid``, ``worker_started``, ``worker_host``;
    - a retry, when it is enqueued: ``retry_of`` (the original trial's number); a warm start's
      trial (``sweep.warmstart``): ``warm_start``, its source;
    - the trial's run (``sweep.worker``): ``mlflow_run_id``, ``seed``, ``resumed_epochs``; at its
      end ``epochs_run``, ``compiled``, ``phases`` and, when complete, ``test_loss``,
      ``test_accuracy``, ``model_uri``, ``model_epoch`` (the epoch it kept), ``param_count``
      (and ``latency_ms``, ``throughput`` in a sweep judged on speed); ``degenerate`` when its
      numbers mean nothing; ``infeasible`` (the constraints it breaks) when it breaks one;
    - a failure (``sweep.recovery.fail_trial``): ``fail_reason``, and ``interrupted`` for Ctrl-C or
      SIGTERM (an interrupted trial does not count against the budget).
    """

    worker_pid: int | None = None
    worker_started: float | None = None
    worker_host: str | None = None
    retry_of: int | None = None
    warm_start: str | None = None  # where an enqueued warm-start trial's settings came from
    mlflow_run_id: str | None = None
    seed: int | None = None
    resumed_epochs: int | None = None
    epochs_run: int | None = None
    compiled: str | None = None
    test_loss: float | None = None
    test_accuracy: float | None = None
    model_uri: str | None = None
    model_epoch: int | None = None
    param_count: int | None = None
    latency_ms: float | None = None
    throughput: float | None = None
    degenerate: str | None = None
    infeasible: str | None = None
    fail_reason: str | None = None
    interrupted: bool = False
    phases: dict[str, float] = field(default_factory=dict)  # seconds by phase: claim_seconds, fit_seconds, ...

    @classmethod
    def of(cls, trial: HasUserAttrs) -> TrialAttrs:
        """The attributes of ``trial`` (attributes this class does not know are left out)."""
        attrs = trial.user_attrs
        known = {f.name for f in dataclasses.fields(cls)} - {"phases"}
        return cls(**{k: v for k, v in attrs.items() if k in known},
                   phases={k: float(v) for k, v in attrs.items() if k.endswith("_seconds")})

    @classmethod
    def encode(cls, **values: Any) -> dict[str, Any]:
        """The ``user_attrs`` items for ``values`` (field names; ``phases`` a mapping of
        ``*_seconds`` keys), ready for ``set_user_attr``. ``TypeError`` names an unknown field."""
        known = {f.name for f in dataclasses.fields(cls)}
        encoded: dict[str, Any] = {}
        for key, value in values.items():
            if key not in known:
                raise TypeError(f"TrialAttrs has no field {key!r}")
            if key == "phases":
                bad = [k for k in value if not k.endswith("_seconds")]
                if bad:
                    raise TypeError(f"TrialAttrs phases are *_seconds keys, not {bad[0]!r}")
                encoded.update({k: float(v) for k, v in value.items()})
            else:
                encoded[key] = value
        return encoded

    def test_metrics(self) -> dict[str, float]:
        """``test_loss`` and ``test_accuracy`` where set (a complete trial's)."""
        return {k: v for k, v in {"test_loss": self.test_loss, "test_accuracy": self.test_accuracy}.items()
                if v is not None}

    def judged(self) -> dict[str, float]:
        """What the finished trial measured that it can be judged on, beside its objectives: the
        test metrics, ``param_count``, ``latency_ms``, ``throughput`` (where set)."""
        measured = {**self.test_metrics(), "param_count": self.param_count, "latency_ms": self.latency_ms,
                    "throughput": self.throughput}
        return {k: float(v) for k, v in measured.items() if v is not None}

    def shown(self) -> dict[str, Any]:
        """The set attributes, flat (phases as their ``*_seconds`` keys), for a table or a report."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("phases",)}
        return {**{k: v for k, v in values.items() if v is not None and k != "interrupted"}, **self.phases}


@dataclass(frozen=True)
class StudyAttrs:
    """A study's Optuna ``user_attrs`` that the project keeps beside the study's identity
    (``Sweep.identity``, checked by ``sweep.storage``), typed. Written with ``encode`` (an unknown
    key is a ``TypeError``), read with ``of``:

    - the parent run (``sweep.supervisor.start_parent_run``): ``mlflow_parent_run_id``,
      ``mlflow_experiment_id``;
    - a warm start, once it is enqueued (``sweep.warmstart``): ``warm_started``;
    - ``cifar-exp gc`` (``cli.gc.collect_models``): ``models_collected``, the trials whose
      logged models it deleted (their runs, metrics and artifacts stay).
    """

    mlflow_parent_run_id: str | None = None
    mlflow_experiment_id: str | None = None
    warm_started: bool = False
    models_collected: frozenset[int] = frozenset()

    @classmethod
    def of(cls, study: HasUserAttrs) -> StudyAttrs:
        """The attributes of ``study`` (an Optuna ``Study`` or ``FrozenStudy``)."""
        return cls.read(study.user_attrs)

    @classmethod
    def read(cls, attrs: Mapping[str, Any]) -> StudyAttrs:
        """The attributes in ``attrs``, a study's ``user_attrs`` as a storage returns them."""
        return cls(mlflow_parent_run_id=attrs.get("mlflow_parent_run_id"),
                   mlflow_experiment_id=attrs.get("mlflow_experiment_id"),
                   warm_started=bool(attrs.get("warm_started", False)),
                   models_collected=frozenset(int(n) for n in attrs.get("models_collected", ())))

    @staticmethod
    def encode(**values: Any) -> dict[str, Any]:
        """``values`` as the study's user attributes (``models_collected`` a sorted list); a key no
        field names is a ``TypeError``."""
        known = {f.name for f in dataclasses.fields(StudyAttrs)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TypeError(f"StudyAttrs has no field {unknown[0]}")
        return {k: sorted(v) if k == "models_collected" else v for k, v in values.items()}


class RecipeError(UserError):
    """A run lacks what a rerun needs (it was logged before the recipe existed, or is no trial)."""


@dataclass(frozen=True)
class TrialRecipe:
    """Everything a rerun needs to train a trial again, as its MLflow run holds it: ``to_params``
    (the trial's ``TrainConfig`` values as logged, its ``seed`` and ``epochs``) and ``to_tags`` (the
    sweep's name and file hash, the sweep seed and validation fraction that fix the split, the
    training subset, the data source and checksum, the determinism mode). ``from_run`` reads
    back what ``to_params``/``to_tags`` wrote (MLflow keeps strings)."""

    sweep: str
    sweep_sha256: str
    sweep_seed: int
    validation_fraction: float
    train_images: int | None  # None: all of the training split
    data_source: str
    data_checksum: str
    deterministic: bool
    seed: int
    epochs: int
    values: dict[str, Any] = field(default_factory=dict)  # the TrainConfig values logged as params

    TAGS = ("sweep", "sweep_sha256", "sweep_seed", "validation_fraction", "train_images", "data_source",
            "data_checksum", "deterministic")

    def to_params(self) -> dict[str, Any]:
        return {**self.values, "seed": self.seed, "epochs": self.epochs}

    def to_tags(self) -> dict[str, str]:
        return {"sweep": self.sweep, "sweep_sha256": self.sweep_sha256, "sweep_seed": str(self.sweep_seed),
                "validation_fraction": str(self.validation_fraction),
                "train_images": "all" if self.train_images is None else str(self.train_images),
                "data_source": self.data_source, "data_checksum": self.data_checksum,
                "deterministic": str(self.deterministic).lower()}

    @classmethod
    def from_run(cls, run_id: str, params: Mapping[str, str], tags: Mapping[str, str],
                 fields: Collection[str] | None = None) -> TrialRecipe:
        """The recipe of the run ``run_id`` from its ``params`` and ``tags``; ``RecipeError`` names
        what is missing or unreadable. ``fields``: the ``TrainConfig`` fields to read (a
        hypermodel's trial logs its own hyperparameters beside them); all by default."""
        missing = [k for k in ("seed", "epochs") if k not in params] + [k for k in cls.TAGS if k not in tags
                                                                         and k not in ("train_images", "deterministic")]
        if missing:
            kind = "param" if missing[0] in ("seed", "epochs") else "tag"
            raise RecipeError(f"run {run_id} has no '{missing[0]}' {kind}, "
                              f"so it cannot be rebuilt (was it logged before reruns existed?); rerun a trial of a "
                              f"newer sweep")
        try:
            # "all", or absent: a run from before training subsets
            subset = tags.get("train_images", "all")
            return cls(sweep=tags["sweep"], sweep_sha256=tags["sweep_sha256"], sweep_seed=int(tags["sweep_seed"]),
                       validation_fraction=float(tags["validation_fraction"]),
                       train_images=None if subset == "all" else int(subset), data_source=tags["data_source"],
                       data_checksum=tags["data_checksum"], deterministic=tags.get("deterministic") == "true",
                       seed=int(params["seed"]), epochs=int(params["epochs"]),
                       values=train_values_from_strings(
                           {k: v for k, v in params.items() if fields is None or k in fields}, f"run {run_id}"))
        except ValueError as exc:
            raise RecipeError(f"run {run_id}: a seed, epochs or split value is not a number ({exc})") from None


def trial_seed(sweep_seed: int, trial_number: int) -> int:
    """The seed of trial ``trial_number``: a hash of (sweep seed, trial number), 31 bits."""
    digest = hashlib.sha256(f"{sweep_seed}:{trial_number}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
