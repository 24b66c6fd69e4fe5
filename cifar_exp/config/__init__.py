"""Sweep definitions: the typed schema of ``sweeps/*.yaml`` and every default.

This is the one place where defaults live. ``TrainConfig`` holds every training setting a sweep
can fix or search (its field names are the sweep keys, the Optuna parameter names and the MLflow
param names); ``Sweep`` holds one parsed sweep file. ``sweepfile.load_sweep`` reads a file into
a valid ``Sweep`` or raises ``ConfigError`` whose message names the file, the key and the fix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_type_hints

from cifar_exp.config.goals import SPEED_METRICS, Bound, Objective, PrunerConfig, SamplerConfig, WarmStart

PACKAGE_DIR = Path(__file__).resolve().parent.parent
# Sweep names resolve against ./sweeps first (a user's own sweeps), then the project's: sweeps/
# of the checkout, or the copy an installed wheel holds in the package.
SWEEP_DIRS = (Path("sweeps"), next((d for d in (PACKAGE_DIR / "_sweeps", PACKAGE_DIR.parent / "sweeps") if d.is_dir()),
                                   PACKAGE_DIR.parent / "sweeps"))
DEFAULT_STORE = Path("mlruns")
DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
DEFAULT_STORAGE = "mlruns/optuna.journal"
DEFAULT_SWEEP = "lr_dropout"  # the main job: python -m cifar_exp.sweep lr_dropout
class UserError(Exception):
    """Bad input from the user: the CLI prints the message on one line and exits with code 2.
    Line breaks that come with the input (a YAML key, a file name) are shown escaped."""

    def __init__(self, message: str) -> None:
        super().__init__(message.replace("\r", "\\r").replace("\n", "\\n"))


class ConfigError(UserError):
    """A sweep file or a command-line override is invalid; the message says where and how to fix it."""


def _range(low: float, high: float | None = None, *, open_high: bool = False) -> dict[str, Any]:
    return {"range": (low, high, open_high)}


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of one training run, with its default. Plain values only.

    Field names are the sweep keys, the Optuna parameter names and the MLflow param names.
    """

    # Which model: "cnn", the classic Conv-BatchNorm-pooling family below, "airbench", the fast CIFAR-10 recipe
    # (Jordan, 2024) in Keras (see models.build_airbench), or "transfer", a keras.applications
    # backbone with a new head (the transfer settings further down).
    model: Literal["cnn", "transfer", "airbench"] = "cnn"
    # CNN: ``blocks`` conv blocks of ``convs_per_block`` convolutions; block i has
    # ``filters * filter_growth**i`` filters, ends in 2x2 pooling and dropout
    # ``dropout + i * dropout_growth`` (0.2, 0.3, 0.4 is 0.2 growing by 0.1).
    blocks: int = field(default=3, metadata=_range(1, 5))
    filters: int = field(default=32, metadata=_range(4, 512))
    filter_growth: float = field(default=2.0, metadata=_range(1.0, 4.0))
    convs_per_block: int = field(default=2, metadata=_range(1, 3))
    batch_norm: bool = True
    # Not Keras' 0.99, which averages the moving statistics over ~100 steps: in a short trial
    # they lag the weights and validation sits at chance (README, "Short runs", has the numbers).
    bn_momentum: float = field(default=0.9, metadata=_range(0.0, 1.0, open_high=True))
    activation: Literal["relu", "leaky_relu", "gelu"] = "relu"
    pooling: Literal["max", "avg"] = "max"
    dropout: float = field(default=0.25, metadata=_range(0.0, 1.0, open_high=True))
    dropout_growth: float = field(default=0.0, metadata=_range(0.0, 0.5))
    # The head (both models): pooling of the last feature map, an optional hidden dense layer.
    # Not flatten, the former default: its 2,048 inputs to the dense layer kept the CNN at chance with
    # Adam at 1e-2 (3 epochs on 5,000 images: test 0.1000, training accuracy 0.09), where global
    # average pooling reached 0.2370 (README, "Short runs").
    head: Literal["flatten", "global_avg", "global_max"] = "global_avg"
    dense_units: int = field(default=128, metadata=_range(0, 4096))  # 0: no hidden dense layer
    head_dropout: float = field(default=0.5, metadata=_range(0.0, 1.0, open_high=True))
    # Transfer learning: a keras.applications backbone without its top, the images resized to
    # ``image_size`` (0: the backbone's smallest size, see models.BACKBONES). ``weights`` is
    # "imagenet" (Keras downloads and caches it), "none", or the path of a weights file.
    backbone: Literal["mobilenet_v2", "vgg16", "resnet50", "xception", "efficientnet_b0"] = "mobilenet_v2"
    weights: str = "imagenet"
    image_size: int = field(default=0, metadata=_range(0, 512))
    # The first ``frozen_layers`` layers of the backbone are frozen; without it, the first
    # ``frozen_fraction`` of them (1.0: the whole backbone, Keras' guide's first phase).
    # BatchNormalization layers stay frozen and in inference mode throughout (Keras' guide).
    frozen_layers: int | None = field(default=None, metadata=_range(0, 10_000))
    frozen_fraction: float = field(default=1.0, metadata=_range(0.0, 1.0))
    # Optional second phase: the last ``fine_tune_epochs`` of the budget train with the top
    # ``fine_tune_layers`` backbone layers unfrozen, at the constant ``fine_tune_learning_rate``.
    fine_tune_epochs: int = field(default=0, metadata=_range(0, 100_000))
    fine_tune_layers: int = field(default=20, metadata=_range(0, 10_000))
    fine_tune_learning_rate: float = field(default=1e-5, metadata=_range(1e-9, 1.0))
    # Augmentation, inside the model so that it runs on the accelerator.
    flip: bool = True
    translate: float = field(default=0.125, metadata=_range(0.0, 0.5))  # fraction of the side
    cutout: int = field(default=0, metadata=_range(0, 32))  # side of a zeroed square, pixels
    # Optimisation.
    optimizer: Literal["adam", "adamax", "sgd", "adamw"] = "adam"
    learning_rate: float = field(default=1e-3, metadata=_range(1e-7, 10.0))
    # Derived learning rate: "linear" trains at learning_rate * batch_size / base_batch_size
    # (Goyal et al.'s rule), "sqrt" at the square root of that ratio; the realized rate is the
    # per-epoch metric ``learning_rate``.
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    base_batch_size: int = field(default=256, metadata=_range(1, 8192))
    momentum: float = field(default=0.9, metadata=_range(0.0, 1.0, open_high=True))  # sgd
    nesterov: bool = True  # sgd
    # sgd and adamw: Keras' decoupled decay, each step weights -= weights * weight_decay * lr.
    weight_decay: float = field(default=1e-4, metadata=_range(0.0, 1.0))
    lr_schedule: Literal["constant", "step", "exponential", "cosine", "cosine_warmup", "one_cycle",
                         "plateau"] = "constant"
    step_stages: int = field(default=3, metadata=_range(2, 10))  # step: equal stages
    step_factor: float = field(default=0.1, metadata=_range(0.0, 1.0))  # step: lr *= factor
    decay_rate: float = field(default=0.9, metadata=_range(0.0, 1.0))  # exponential, per epoch
    warmup_epochs: int = field(default=1, metadata=_range(0, 1000))  # cosine_warmup: linear warmup
    warmup_fraction: float = field(default=0.3, metadata=_range(0.0, 1.0, open_high=True))  # one_cycle
    plateau_factor: float = field(default=0.1, metadata=_range(0.0, 1.0, open_high=True))  # plateau
    plateau_patience: int = field(default=2, metadata=_range(1, 1000))  # plateau: epochs
    batch_size: int = field(default=128, metadata=_range(1, 8192))
    label_smoothing: float = field(default=0.0, metadata=_range(0.0, 1.0, open_high=True))
    # "mixed_bfloat16": Keras' mixed precision (bfloat16 compute, float32 weights and
    # probabilities): tensor-core speed on GPUs; on CPUs it is slower.
    precision: Literal["float32", "mixed_bfloat16"] = "float32"

    @property
    def peak_learning_rate(self) -> float:
        """``learning_rate`` after ``lr_scaling``: what the schedule starts from (or peaks at)."""
        ratio = self.batch_size / self.base_batch_size
        return self.learning_rate * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[self.lr_scaling]


@dataclass(frozen=True)
class Dimension:
    """One searched parameter: ``float``/``int`` in [low, high] (optionally log or stepped) or
    ``categorical`` over ``choices``."""

    name: str
    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    # Sampled only when every named dimension (in ``space`` or ``fixed``) takes one of the given
    # values; a dimension conditioned on an inactive one is inactive too (conditions nest).
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()


@dataclass(frozen=True)
class DataConfig:
    # "keras" (Keras' download and cache), a cifar-10-python.tar.gz, an extracted
    # cifar-10-batches-py/, or an image-folder tree / .zip of train/<class>/, test/<class>/.
    source: str = "keras"
    validation_fraction: float = field(default=0.1, metadata=_range(0.01, 0.5))
    # Train on a class-balanced, seeded subset of this many images of the training split (the
    # validation and test sets stay whole): a quick look at a sweep. None: every image.
    train_images: int | None = field(default=None, metadata=_range(1, None))


@dataclass(frozen=True)
class Sweep:
    """One sweep file, validated. ``space`` and ``fixed`` keys are ``TrainConfig`` field names."""

    name: str
    path: Path
    content_hash: str  # sha256 of ``text``
    text: str = field(default="", repr=False)  # the file as written, logged with every trial
    description: str = ""
    # The first is the one pruning follows and the one-number summaries show (``objective``).
    objectives: tuple[Objective, ...] = (Objective(),)
    constraints: Mapping[str, Bound] = field(default_factory=dict)  # metric -> bound (``goals.METRICS``)
    space: Mapping[str, Dimension] = field(default_factory=dict)
    fixed: Mapping[str, Any] = field(default_factory=dict)
    sampler: SamplerConfig = SamplerConfig()
    pruner: PrunerConfig = PrunerConfig()
    warm_start: WarmStart | None = None  # enqueue another study's best trials first (``sweep.warmstart``)
    enqueue: tuple[Mapping[str, Any], ...] = ()  # settings to try first, each a trial
    data: DataConfig = DataConfig()
    epochs: int = 10
    trials: int | None = 20
    timeout: float | None = None  # seconds; no new trial starts after it
    trial_timeout: float | None = None  # seconds; a trial running past it fails alone, with that reason
    max_consecutive_failures: int = 5
    # Seconds a worker may go without a heartbeat (a thread touches a file every quarter of this,
    # at most every 10 s) before it is taken for frozen, killed, and its trial failed and retried.
    heartbeat_grace: float = 60.0
    # Deterministic kernels (TensorFlow op determinism, XLA's deterministic GPU ops): what makes
    # a trial rerunnable bit for bit. Default kernels give other numbers, so reruns must match.
    deterministic: bool = True
    # Which epoch's weights a trial keeps, so its objective value, test pass, artifacts and logged
    # model: "best" by the first objective's metric (training still runs every epoch, pruning
    # hears each), or "last".
    model_epoch: Literal["best", "last"] = "best"
    # ``register`` retrains the best confirm_candidates trials (on a multi-objective study, the
    # front members its rule admits) with confirm_seeds further seeds each and promotes on their
    # means (``registry.confirm``); 0: register on the one seed the sweep ran.
    confirm_seeds: int = 0
    confirm_candidates: int = 3
    # When the sweep ends, keep the logged models of this many best complete trials (and the
    # registered versions'), deleting the others' (``cifar-exp gc``); None: keep every model.
    keep_models: int | None = None
    registered_model: str = ""  # Model Registry name of the best model; "" means cifar10-<name>
    # A KerasTuner hypermodel, "module:attribute", that builds (and compiles) the model instead of
    # TrainConfig's: its hp.* calls join the trial's parameters. See cifar_exp/hypermodel.py.
    hypermodel: str = ""

    @property
    def objective(self) -> Objective:
        return self.objectives[0]

    @property
    def measures_speed(self) -> bool:
        """Whether its trials measure ``latency_ms`` and ``throughput`` (only where judged on them)."""
        return any(m in SPEED_METRICS for m in [*(o.metric for o in self.objectives), *self.constraints])

    @property
    def best_by(self) -> tuple[str, Literal["maximize", "minimize"]] | None:
        """The best-epoch rule ``training.train`` takes: the first objective's metric and
        direction with ``model_epoch: best``, None with ``last``."""
        return (self.objective.metric, self.objective.direction) if self.model_epoch == "best" else None

    @property
    def model_name(self) -> str:
        return self.registered_model or f"cifar10-{self.name}"

    def active(self, name: str, values: Mapping[str, Any]) -> bool:
        """Whether the space dimension ``name`` is sampled, given the ``values`` sampled so far
        (dimensions absent from ``values`` are inactive, so conditions on them are false)."""
        for parent, allowed in self.space[name].when:
            value = self.fixed[parent] if parent in self.fixed else values.get(parent, _ABSENT)
            if value is _ABSENT or value not in allowed:
                return False
        return True

    def train_config(self, sampled: Mapping[str, Any]) -> TrainConfig:
        """The full training configuration of a trial: defaults, then ``fixed``, then ``sampled``."""
        return dataclasses.replace(TrainConfig(), **{**self.fixed, **sampled})

    def possible(self, name: str) -> tuple[Any, ...]:
        """The values the ``TrainConfig`` field ``name`` can take in a trial of this sweep
        (a searched int or float field: its bounds)."""
        if name in self.space:
            dim = self.space[name]
            default = (getattr(TrainConfig(), name),) if dim.when else ()
            return (*dim.choices, *((dim.low, dim.high) if dim.type != "categorical" else ()), *default)
        return (self.fixed[name],) if name in self.fixed else (getattr(TrainConfig(), name),)

    def imagenet_backbones(self) -> tuple[Any, ...]:
        """The backbones this sweep may build with ImageNet weights (each must be downloadable)."""
        if "transfer" in self.possible("model") and "imagenet" in self.possible("weights"):
            return tuple(dict.fromkeys(self.possible("backbone")))
        return ()

    def logged_params(self, sampled: Mapping[str, Any]) -> dict[str, Any]:
        """The trial's MLflow params: the ``TrainConfig`` values that apply to it (see ``applies``;
        with a hypermodel, only ``HYPERMODEL_FIELDS``), and every sampled value. Inactive
        dimensions are left out, so are the settings of a schedule, model family or optimizer
        the trial does not use."""
        cfg = self.train_config(sampled)
        return {key: value for key, value in dataclasses.asdict(cfg).items()
                if (key in sampled or (key not in self.space and applies(key, cfg)))
                and (not self.hypermodel or key in HYPERMODEL_FIELDS)}

    def identity(self, data_checksum: str) -> dict[str, Any]:
        """What makes the trials of one study comparable: a resume must not change any of it.
        ``searched_sha256`` hashes what defines the trials (objectives, constraints, space, fixed values,
        hypermodel, the epoch a trial keeps), not the budget, sampler, pruner or description."""
        judged: dict[str, Any] = {"objective": dataclasses.asdict(self.objective)}
        if len(self.objectives) > 1 or self.constraints:  # a one-objective study keeps its old identity
            judged = {"objectives": [dataclasses.asdict(o) for o in self.objectives],
                      "constraints": {k: dataclasses.asdict(v) for k, v in self.constraints.items()}}
        searched = json.dumps({**judged, "hypermodel": self.hypermodel, "model_epoch": self.model_epoch,
                               "space": {k: dataclasses.asdict(v) for k, v in self.space.items()},
                               "fixed": dict(self.fixed)}, sort_keys=True, default=str)
        return {"data_checksum": data_checksum, "train_images": self.data.train_images, "epochs": self.epochs,
                "validation_fraction": self.data.validation_fraction, "sweep_seed": self.sampler.seed,
                "searched_sha256": hashlib.sha256(searched.encode()).hexdigest()}


def _not_transfer(cfg: TrainConfig) -> bool:
    return cfg.model != "transfer"


def _transfer(cfg: TrainConfig) -> bool:
    return cfg.model == "transfer"


# When a TrainConfig field takes part in training (fields not named here always do). One rule
# for every sweep: a run logs the settings that apply to it, not those of a schedule, a model
# family or an optimizer it does not use.
_APPLIES: dict[str, Callable[[TrainConfig], bool]] = {
    **dict.fromkeys(("blocks", "filters", "convs_per_block", "batch_norm", "pooling", "dropout",
                     "dropout_growth"), _not_transfer),
    "filter_growth": lambda c: _not_transfer(c) and c.blocks > 1,
    "bn_momentum": lambda c: _not_transfer(c) and c.batch_norm,
    "activation": lambda c: _not_transfer(c) or c.dense_units > 0,  # the head's hidden layer
    **dict.fromkeys(("backbone", "weights", "image_size", "fine_tune_epochs"), _transfer),
    "frozen_layers": lambda c: _transfer(c) and c.frozen_layers is not None,
    "frozen_fraction": lambda c: _transfer(c) and c.frozen_layers is None,
    **dict.fromkeys(("fine_tune_layers", "fine_tune_learning_rate"), lambda c: _transfer(c) and c.fine_tune_epochs > 0),
    **dict.fromkeys(("momentum", "nesterov"), lambda c: c.optimizer == "sgd"),
    "weight_decay": lambda c: c.optimizer in ("sgd", "adamw"),
    "base_batch_size": lambda c: c.lr_scaling != "none",
    **dict.fromkeys(("step_stages", "step_factor"), lambda c: c.lr_schedule == "step"),
    "decay_rate": lambda c: c.lr_schedule == "exponential",
    "warmup_epochs": lambda c: c.lr_schedule == "cosine_warmup",
    "warmup_fraction": lambda c: c.lr_schedule == "one_cycle",
    **dict.fromkeys(("plateau_factor", "plateau_patience"), lambda c: c.lr_schedule == "plateau"),
}


def applies(name: str, cfg: TrainConfig) -> bool:
    """Whether the ``TrainConfig`` field ``name`` takes part in training ``cfg``."""
    return bool(_APPLIES.get(name, lambda c: True)(cfg))


# The TrainConfig settings that apply around a hypermodel (which builds and compiles the rest).
HYPERMODEL_FIELDS = ("batch_size", "flip", "translate", "cutout")
_ABSENT = object()
TRAIN_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TRAIN_TYPES = get_type_hints(TrainConfig)


_CREDENTIALS = re.compile(r"(?P<scheme>\b[A-Za-z][\w+.-]*://)(?P<user>[^:/@\s]*):(?P<password>[^@\s]*)@")


def mask_credentials(text: str) -> str:
    """``text`` with the password of every URL in it hidden: ``postgresql://me:***@db/optuna``.
    Whatever reaches MLflow (params, tags) or the terminal goes through this."""
    return _CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)




# The tracking URIs MLflow can use here: a database (SQLAlchemy URL) or a tracking server.
_TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https")


def check_tracking_uri(uri: str) -> str:
    """``uri`` if MLflow can track there: ``sqlite:///PATH``, a database URL with a host, or
    ``http(s)://HOST[:PORT]``; ``UserError`` naming the problem otherwise (checked before
    anything is written: MLflow would create ``mlruns/`` for some of these before failing)."""
    import urllib.parse

    fix = "give sqlite:///PATH, postgresql://HOST/DB or http://HOST:PORT (default sqlite:///mlruns/mlflow.db)"
    if not uri.strip():
        raise UserError(f"--tracking-uri is empty: {fix}")
    try:
        parts = urllib.parse.urlsplit(uri)
        parts.port  # noqa: B018 (raises on a port that is not a number)
    except ValueError as exc:
        raise UserError(f"--tracking-uri {mask_credentials(uri)} is malformed ({exc}): {fix}") from None
    scheme = parts.scheme.partition("+")[0]
    if scheme not in _TRACKING_SCHEMES:
        raise UserError(f"--tracking-uri {mask_credentials(uri)}: MLflow cannot track to "
                        f"{parts.scheme + '://' if parts.scheme else 'a plain path'} here: {fix}")
    if scheme == "sqlite" and (not uri.startswith("sqlite:///") or uri.rstrip("/") == "sqlite:"):
        raise UserError(f"--tracking-uri {mask_credentials(uri)}: a SQLite store is sqlite:///PATH (three slashes, "
                        f"then the file)")
    if scheme != "sqlite" and not parts.hostname:
        raise UserError(f"--tracking-uri {mask_credentials(uri)} names no host: {fix}")
    return uri


def check_storage(url: str) -> str:
    """``url`` if it can be an Optuna storage: a journal file path (not a folder) or a database URL."""
    if not url.strip():
        raise UserError(f"--storage is empty: give a journal file path (default {DEFAULT_STORAGE}) or a database URL")
    if "://" not in url and (Path(url).is_dir() or url.endswith(("/", "."))):
        raise UserError(f"--storage {url} is a folder: give a journal file path, e.g. {url.rstrip('/')}/optuna.journal")
    return url


def existing_storage(url: str) -> None:
    """``UserError`` if ``url`` names a journal or SQLite file that is not there (opening it would
    create an empty one); a server database is asked when it is opened. Cheap: no Optuna import."""
    path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url
    if "://" not in path and not Path(path).is_file():
        raise UserError(f"no Optuna storage at {path}: run the sweep first, or pass --storage")


@dataclass(frozen=True)
class Settings:
    """Everything a sweep needs, resolved: the sweep (with overrides applied) and where things go."""

    sweep: Sweep
    storage: str
    tracking_uri: str
    workers: int = 1
    gpus: tuple[str, ...] = ()  # worker i sees GPU gpus[i % len(gpus)] only; () leaves the environment alone
    tags: dict[str, str] = field(default_factory=dict)  # provenance for the parent run
    data_checksum: str = ""  # of the data the sweep trains on: part of the study's identity
    log_file: str = ""  # where workers write their output (library log lines); "" leaves it on the terminal
    checkpoint_dir: str = ""  # where running trials keep their checkpoints; "" beside the storage (sweep.sidecar)
