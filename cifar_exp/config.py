"""Sweep definitions: the typed schema of ``sweeps/*.yaml``, every default, and validation on load.

This is the one place where defaults live. ``TrainConfig`` holds every training setting a sweep
can fix or search (its field names are the sweep keys, the Optuna parameter names and the MLflow
param names); ``Sweep`` holds one parsed sweep file. ``load_sweep`` either returns a valid
``Sweep`` or raises ``ConfigError`` whose message names the file, the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import reprlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

PACKAGE_DIR = Path(__file__).resolve().parent
# Sweep names resolve against ./sweeps first (a user's own sweeps), then the project's sweeps/.
SWEEP_DIRS = (Path("sweeps"), PACKAGE_DIR.parent / "sweeps")
DEFAULT_STORE = Path("mlruns")
DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
DEFAULT_STORAGE = "mlruns/optuna.journal"
# Metrics a sweep may optimise: validation metrics only. The test set is for final evaluation,
# never for pruning or model selection.
OBJECTIVE_METRICS = ("val_accuracy", "val_loss")


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

    # Which model: "cnn", the notebooks' family below, "airbench", the fast CIFAR-10 recipe
    # (Jordan, 2024) in Keras (see models.build_airbench), or "transfer", a keras.applications
    # backbone with a new head (the transfer settings further down).
    model: Literal["cnn", "transfer", "airbench"] = "cnn"
    # CNN: ``blocks`` conv blocks of ``convs_per_block`` convolutions; block i has
    # ``filters * filter_growth**i`` filters, ends in 2x2 pooling and dropout
    # ``dropout + i * dropout_growth`` (the notebooks' 0.2, 0.3, 0.4 is 0.2 growing by 0.1).
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
class Objective:
    metric: Literal["val_accuracy", "val_loss"] = "val_accuracy"
    direction: Literal["maximize", "minimize"] = "maximize"


@dataclass(frozen=True)
class SamplerConfig:
    name: Literal["tpe", "random", "cmaes"] = "tpe"
    seed: int = field(default=0, metadata=_range(0, 2**32 - 1))  # what NumPy and the samplers accept


@dataclass(frozen=True)
class PrunerConfig:
    name: Literal["hyperband", "median", "none"] = "hyperband"
    min_epochs: int = field(default=1, metadata=_range(1, 10_000))  # no pruning before this
    reduction_factor: int = field(default=3, metadata=_range(2, 10))  # hyperband


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
    objective: Objective = Objective()
    space: Mapping[str, Dimension] = field(default_factory=dict)
    fixed: Mapping[str, Any] = field(default_factory=dict)
    sampler: SamplerConfig = SamplerConfig()
    pruner: PrunerConfig = PrunerConfig()
    data: DataConfig = DataConfig()
    epochs: int = 10
    trials: int | None = 20
    timeout: float | None = None  # seconds; no new trial starts after it
    max_consecutive_failures: int = 5
    # Deterministic kernels (TensorFlow op determinism, XLA's deterministic GPU ops): what makes
    # a trial rerunnable bit for bit. Default kernels give other numbers, so reruns must match.
    deterministic: bool = True
    registered_model: str = ""  # Model Registry name of the best model; "" means cifar10-<name>
    # A KerasTuner hypermodel, "module:attribute", that builds (and compiles) the model instead of
    # TrainConfig's: its hp.* calls join the trial's parameters. See cifar_exp/hypermodel.py.
    hypermodel: str = ""

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
        ``searched_sha256`` hashes what defines the trials (objective, space, fixed values,
        hypermodel), not the budget, sampler, pruner or description."""
        searched = json.dumps({"objective": dataclasses.asdict(self.objective), "hypermodel": self.hypermodel,
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
    return _APPLIES.get(name, lambda c: True)(cfg)


# Top-level keys of a sweep file, with the type each must have.
_TOP_LEVEL: dict[str, Any] = {
    "description": str,
    "objective": Objective,
    "space": dict,
    "fixed": dict,
    "sampler": SamplerConfig,
    "pruner": PrunerConfig,
    "data": DataConfig,
    "epochs": int,
    "trials": int | None,
    "timeout": float | None,
    "max_consecutive_failures": int,
    "deterministic": bool,
    "registered_model": str,
    "hypermodel": str,
}
# The TrainConfig settings that apply around a hypermodel (which builds and compiles the rest).
HYPERMODEL_FIELDS = ("batch_size", "flip", "translate", "cutout")
_HYPERMODEL_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
_TOP_LEVEL_RANGES = {"epochs": (1, 100_000), "trials": (1, 1_000_000), "timeout": (1.0, None),
                     "max_consecutive_failures": (1, 1_000_000)}
_DIMENSION_KEYS = {"type", "low", "high", "log", "step", "choices", "when"}
_ABSENT = object()
_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
TRAIN_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TRAIN_TYPES = get_type_hints(TrainConfig)


# A sweep file is a few hundred bytes; these bound what a malformed or hostile one can cost.
MAX_SWEEP_BYTES = 64 * 1024  # 40 times the largest shipped sweep (a 1 MB flow list took 3 s to load here)
MAX_YAML_DEPTH = 20  # a sweep file nests 4 levels (space: name: when: value)
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = _SHORT.maxlong = 60


def _short(value: Any) -> str:
    """``repr(value)`` bounded (strings, numbers and containers cut): messages never embed an
    unbounded value from a sweep file."""
    try:
        return _SHORT.repr(value)
    except ValueError:  # an int beyond Python's digit limit for str()
        return "<a number too long to show>"


_BaseLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C parser where PyYAML has it


class _SweepLoader(_BaseLoader):  # type: ignore[misc, valid-type]
    """Safe YAML, refusing a key written twice in one mapping (PyYAML lets the last one win)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable: the constructor below names it
                continue
            if duplicate:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: {_short(key)} is written twice in one "
                                  f"mapping: keep one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str, where: str) -> Any:
    """The YAML ``text`` loaded, after a pass over its events refusing anchors and aliases (an
    alias bomb expands 1 KB into gigabytes) and nesting deeper than ``MAX_YAML_DEPTH``."""
    if len(text) > MAX_SWEEP_BYTES:
        raise ConfigError(f"{where}: {len(text)} characters; a sweep file is a few KB (limit {MAX_SWEEP_BYTES})")
    try:
        depth = 0
        for event in yaml.parse(text, Loader=_BaseLoader):
            line = f"line {event.start_mark.line + 1}" if event.start_mark else "the file"
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise ConfigError(f"{where}: {line}: YAML anchors and aliases (&name, *name) are not allowed in a "
                                  f"sweep file: write the values out")
            if isinstance(event, yaml.MappingStartEvent | yaml.SequenceStartEvent):
                depth += 1
                if depth > MAX_YAML_DEPTH:
                    raise ConfigError(f"{where}: {line}: nested deeper than {MAX_YAML_DEPTH} levels (a sweep file "
                                      f"needs 4)")
            elif isinstance(event, yaml.MappingEndEvent | yaml.SequenceEndEvent):
                depth -= 1
        loader = _SweepLoader(text)  # a safe loader (no Python objects), without duplicate keys
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except ConfigError as exc:
        raise ConfigError(str(exc) if str(exc).startswith(where) else f"{where}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {at}{_short(problem)[1:-1]}") from None
    except (ValueError, RecursionError, MemoryError) as exc:  # e.g. an int of 5,000 digits
        raise ConfigError(f"{where}: invalid YAML: {type(exc).__name__}: {_short(str(exc))[1:-1]}") from None


def _unknown(key: str, known: Any, where: str) -> ConfigError:
    key = _short(key)[1:-1] if len(key) > 60 else key
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(sorted(known))}"
    return ConfigError(f"{where}: unknown key '{key}' ({hint})")


def coerce(value: Any, typ: Any, where: str) -> Any:
    """Return ``value`` checked against the type ``typ`` (int, float, bool, str, Literal, X | None).

    Strings such as ``1e-4`` (which YAML 1.1 reads as text) are accepted where a float is due.
    """
    origin = get_origin(typ)
    if origin is Literal:
        allowed = get_args(typ)
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            raise ConfigError(f"{where}: {_short(value)} is not one of {', '.join(map(str, allowed))}")
        return value
    if origin is Union or (origin is not None and type(None) in get_args(typ)):
        if value is None and type(None) in get_args(typ):
            return None
        (inner,) = [a for a in get_args(typ) if a is not type(None)]
        return coerce(value, inner, where)
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {_short(value)}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {_short(value)}")
        return value
    if typ is float:
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {_short(value)}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected text, got {_short(value)}")
        return value
    if typ is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of key: value, got {_short(value)}")
        return value
    raise TypeError(f"unsupported type {typ!r}")  # a bug in this module, not user input


def _check_range(value: float, bounds: tuple[Any, ...], where: str) -> None:
    low, high = bounds[0], bounds[1]
    open_high = bounds[2] if len(bounds) > 2 else False
    if value < low or (high is not None and (value >= high if open_high else value > high)):
        span = f"[{low}, {high})" if open_high else f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(f"{where}: {_short(value)} is out of range {span}")


def _section(cls: Any, raw: Any, where: str) -> Any:
    """Build the dataclass ``cls`` from the mapping ``raw``, rejecting unknown keys."""
    raw = coerce(raw, dict, where)
    hints = get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        if key not in known:
            raise _unknown(str(key), known, where)
        values[key] = coerce(value, hints[key], f"{where}.{key}")
        if "range" in known[key].metadata and values[key] is not None:
            _check_range(values[key], known[key].metadata["range"], f"{where}.{key}")
    return cls(**values)


def check_train_value(name: str, value: Any, where: str) -> Any:
    """``value`` validated for the ``TrainConfig`` field ``name``."""
    value = coerce(value, _TRAIN_TYPES[name], where)
    if "range" in TRAIN_FIELDS[name].metadata:
        _check_range(value, TRAIN_FIELDS[name].metadata["range"], where)
    return value


def train_values_from_strings(params: Mapping[str, str], where: str) -> dict[str, Any]:
    """The ``TrainConfig`` fields among ``params`` (as MLflow stores them: ``str(value)``), typed
    and validated; other keys are ignored."""
    values: dict[str, Any] = {}
    for name, text in params.items():
        if name not in TRAIN_FIELDS:
            continue
        typ = _TRAIN_TYPES[name]
        value: Any = text
        if type(None) in get_args(typ):  # an optional setting: str(None) is "None"
            if text == "None":
                values[name] = None
                continue
            (typ,) = [a for a in get_args(typ) if a is not type(None)]
        try:
            if typ is bool:
                value = {"True": True, "False": False}.get(text, text)
            elif typ is int:
                value = int(text)
            elif typ is float:
                value = float(text)
        except ValueError:
            pass  # left as text: check_train_value names the problem
        values[name] = check_train_value(name, value, f"{where}: param {name}")
    return values


def _dimension(name: str, raw: Any, where: str) -> Dimension:
    raw = coerce(raw, dict, where)
    for key in raw:
        if key not in _DIMENSION_KEYS:
            raise _unknown(str(key), _DIMENSION_KEYS, where)
    kind = coerce(raw.get("type"), Literal["float", "int", "categorical"], f"{where}.type")
    field_type = _TRAIN_TYPES[name]
    if type(None) in get_args(field_type):  # an optional int or float is searched as one
        (field_type,) = [a for a in get_args(field_type) if a is not type(None)]
    if kind == "categorical":
        extra = sorted(set(raw) - {"type", "choices", "when"})
        if extra:
            raise ConfigError(f"{where}: '{extra[0]}' does not apply to a categorical dimension")
        choices = raw.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}.choices: give a non-empty list of values")
        checked = tuple(check_train_value(name, c, f"{where}.choices") for c in choices)
        if len(set(checked)) != len(checked):
            raise ConfigError(f"{where}.choices: values must be distinct")
        return Dimension(name, "categorical", choices=checked)
    if field_type is not (int if kind == "int" else float):
        expected = "categorical" if get_origin(field_type) is Literal or field_type is bool else (
            "int" if field_type is int else "float")
        raise ConfigError(f"{where}.type: '{name}' takes type {expected}, not {kind}")
    if "choices" in raw:
        raise ConfigError(f"{where}: 'choices' applies only to type categorical")
    for key in ("low", "high"):
        if key not in raw:
            raise ConfigError(f"{where}: '{key}' is required for type {kind}")
    low = check_train_value(name, raw["low"], f"{where}.low")
    high = check_train_value(name, raw["high"], f"{where}.high")
    if not high > low:
        raise ConfigError(f"{where}: high ({high}) must be greater than low ({low})")
    log = coerce(raw.get("log", False), bool, f"{where}.log")
    step = raw.get("step")
    if step is not None:
        step = coerce(step, int if kind == "int" else float, f"{where}.step")
        if step <= 0:
            raise ConfigError(f"{where}.step: must be greater than 0, got {_short(step)}")
        if step > high - low:
            raise ConfigError(f"{where}.step: {_short(step)} is wider than the range {low}..{high}, so every trial "
                              f"would get {low}: give a step of at most {high - low}")
        if log:
            raise ConfigError(f"{where}: log and step cannot be combined (drop one)")
    if log and low <= 0:
        raise ConfigError(f"{where}: log scale needs low > 0, got low ({low})")
    return Dimension(name, kind, low=low, high=high, log=log, step=step)


def parse_sweep(name: str, text: str, path: Path) -> Sweep:
    """Parse and validate the YAML ``text`` of the sweep ``name``; errors are prefixed by ``path``."""
    where = str(path)
    raw = _load_yaml(text, where)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of settings at the top level")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in _TOP_LEVEL:
            raise _unknown(str(key), _TOP_LEVEL, where)
        typ = _TOP_LEVEL[key]
        if dataclasses.is_dataclass(typ):
            values[key] = _section(typ, value, f"{where}: {key}")
        else:
            values[key] = coerce(value, typ, f"{where}: {key}")
            if key in _TOP_LEVEL_RANGES and values[key] is not None:
                _check_range(values[key], _TOP_LEVEL_RANGES[key], f"{where}: {key}")
    space = {}
    raw_space = values.pop("space", {})
    for dim_name, spec in raw_space.items():
        if dim_name not in TRAIN_FIELDS:
            raise _unknown(str(dim_name), TRAIN_FIELDS, f"{where}: space")
        space[dim_name] = _dimension(dim_name, spec, f"{where}: space.{dim_name}")
    fixed = {}
    for key, value in values.pop("fixed", {}).items():
        if key not in TRAIN_FIELDS:
            raise _unknown(str(key), TRAIN_FIELDS, f"{where}: fixed")
        if key in space:
            raise ConfigError(f"{where}: fixed.{key}: '{key}' is also in space (keep one)")
        fixed[key] = check_train_value(key, value, f"{where}: fixed.{key}")
    hypermodel = values.get("hypermodel", "")
    if hypermodel:
        if not _HYPERMODEL_RE.match(hypermodel):
            raise ConfigError(f"{where}: hypermodel: {_short(hypermodel)} is not module:attribute "
                              f"(e.g. my_models:build_model)")
        for key in [*space, *fixed]:
            if key not in HYPERMODEL_FIELDS:
                raise ConfigError(f"{where}: {key} does not apply with a hypermodel, which builds and compiles "
                                  f"its own model (these do: {', '.join(HYPERMODEL_FIELDS)})")
    elif not space:
        raise ConfigError(f"{where}: space: declare at least one dimension to search")
    for dim_name, dim in space.items():
        when = _conditions(dim_name, raw_space[dim_name].get("when"), space, fixed,
                           f"{where}: space.{dim_name}.when")
        space[dim_name] = dataclasses.replace(dim, when=when)
    space = _sampling_order(space, where)
    declared = set(space) | set(fixed)
    if {"frozen_layers", "frozen_fraction"} <= declared:
        raise ConfigError(f"{where}: frozen_layers and frozen_fraction both set: keep one (a layer count, "
                          f"or a fraction of the backbone)")
    weights = space["weights"].choices if "weights" in space else (fixed["weights"],) if "weights" in fixed else ()
    for value in weights:
        check_weights(value, f"{where}: weights")
    objective = values.get("objective", Objective())
    if objective.metric == "val_loss" and objective.direction == "maximize" or (
            objective.metric == "val_accuracy" and objective.direction == "minimize"):
        raise ConfigError(f"{where}: objective: {objective.direction} {objective.metric} "
                          f"optimises the wrong way (swap the direction)")
    if "registered_model" in values and not _NAME_RE.match(values["registered_model"]):
        raise ConfigError(f"{where}: registered_model: {_short(values['registered_model'])} is not a valid name "
                          f"(letters, digits, '_', '-' and '.', starting with a letter or digit)")
    if values.get("trials", 20) is None and values.get("timeout") is None:
        raise ConfigError(f"{where}: give a budget: trials, timeout, or both")
    return Sweep(name=name, path=path, content_hash=hashlib.sha256(text.encode()).hexdigest(), text=text,
                 space=space, fixed=fixed, **values)


def _conditions(name: str, raw: Any, space: Mapping[str, Dimension], fixed: Mapping[str, Any],
                where: str) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    """``when: {parent: value | [values]}`` checked against the parents' declared values."""
    if raw is None:
        return ()
    raw = coerce(raw, dict, where)
    if not raw:
        raise ConfigError(f"{where}: name at least one dimension and its values, e.g. {{lr_schedule: step}}")
    conditions = []
    for parent, wanted in raw.items():
        parent = str(parent)
        if parent == name:
            raise ConfigError(f"{where}: '{name}' cannot depend on itself")
        if parent not in space and parent not in fixed:
            known = sorted(space) + sorted(fixed)
            raise ConfigError(f"{where}: condition on '{parent}', which is neither in space nor in fixed "
                              f"(declare it, or condition on one of: {', '.join(known)})")
        wanted = tuple(wanted) if isinstance(wanted, list) else (wanted,)
        if not wanted:
            raise ConfigError(f"{where}.{parent}: give a value or a non-empty list of values")
        if parent in space:
            dim = space[parent]
            if dim.type != "categorical":
                raise ConfigError(f"{where}: condition on '{parent}', a {dim.type} dimension: conditions "
                                  f"need a categorical one")
            for value in wanted:
                checked = check_train_value(parent, value, f"{where}.{parent}")
                if checked not in dim.choices:
                    raise ConfigError(f"{where}.{parent}: '{name}' depends on {parent}={value}, which is not "
                                      f"among {parent}'s choices ({', '.join(map(str, dim.choices))})")
        else:
            wanted = tuple(check_train_value(parent, v, f"{where}.{parent}") for v in wanted)
            if fixed[parent] not in wanted:
                raise ConfigError(f"{where}.{parent}: '{name}' would never be searched: fixed {parent} is "
                                  f"{fixed[parent]} (drop the dimension, or the condition)")
        conditions.append((parent, tuple(check_train_value(parent, v, f"{where}.{parent}") for v in wanted)))
    return tuple(conditions)


def _sampling_order(space: Mapping[str, Dimension], where: str) -> dict[str, Dimension]:
    """``space`` reordered so that every dimension comes after the dimensions it depends on
    (declaration order otherwise); a cycle of conditions is an error naming it."""
    ordered: dict[str, Dimension] = {}
    visiting: list[str] = []

    def visit(name: str) -> None:
        if name in ordered:
            return
        if name in visiting:
            cycle = " -> ".join([*visiting[visiting.index(name):], name])
            raise ConfigError(f"{where}: space: conditions form a cycle ({cycle}); remove one of them")
        visiting.append(name)
        for parent, _ in space[name].when:
            if parent in space:
                visit(parent)
        visiting.pop()
        ordered[name] = space[name]

    for name in space:
        visit(name)
    return ordered


def check_weights(value: str, where: str) -> str:
    """``value`` if it is "imagenet", "none" or an existing weights file."""
    if value not in ("imagenet", "none") and not Path(value).is_file():
        raise ConfigError(f"{where}: {_short(value)} is neither imagenet, none, nor an existing weights file "
                          f"(give the path of a .weights.h5 file saved from the backbone)")
    return value


def check_name(name: str) -> str:
    """``name`` if it is a plain sweep name (letters, digits, ``_.-``); no paths, no NUL bytes."""
    if not _NAME_RE.match(name) or ".." in name:
        raise ConfigError(f"invalid sweep name {name!r}: use letters, digits, '_', '-' and '.' only")
    return name


def available_sweeps() -> dict[str, Path]:
    """Sweep name -> file, for every ``*.yaml`` in the sweep directories (earlier ones win)."""
    found: dict[str, Path] = {}
    for directory in SWEEP_DIRS:
        for path in sorted(directory.glob("*.yaml")) if directory.is_dir() else []:
            found.setdefault(path.stem, path)
    return found


_CREDENTIALS = re.compile(r"(?P<scheme>\b[A-Za-z][\w+.-]*://)(?P<user>[^:/@\s]*):(?P<password>[^@\s]*)@")


def mask_credentials(text: str) -> str:
    """``text`` with the password of every URL in it hidden: ``postgresql://me:***@db/optuna``.
    Whatever reaches MLflow (params, tags) or the terminal goes through this."""
    return _CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)


def load_sweep(name_or_path: str) -> Sweep:
    """Load a sweep by name (``lr_dropout``) or by file path (``my/sweep.yaml``)."""
    if name_or_path.endswith((".yaml", ".yml")):
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError(f"sweep file {path} does not exist")
        name = check_name(path.stem)
    else:
        name = check_name(name_or_path)
        sweeps = available_sweeps()
        if name not in sweeps:
            close = difflib.get_close_matches(name, list(sweeps), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(f"unknown sweep '{name}': {hint}available: {', '.join(sorted(sweeps))}"
                              f" (or pass a path to a .yaml file)")
        path = sweeps[name]
    try:
        size = path.stat().st_size
        if size > MAX_SWEEP_BYTES:
            raise ConfigError(f"{path}: {size} bytes; a sweep file is a few KB (limit {MAX_SWEEP_BYTES})")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the sweep file ({exc})") from None
    return parse_sweep(name, text, path)
