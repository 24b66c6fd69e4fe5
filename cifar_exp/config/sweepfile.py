"""Reading a sweep file: ``load_sweep`` returns a valid ``Sweep`` (see ``config``) or raises
``ConfigError`` whose one-line message names the file, the key and the fix. Unknown keys are
errors, with the closest known key as a hint."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from cifar_exp.config import (
    _TRAIN_TYPES,
    HYPERMODEL_FIELDS,
    SWEEP_DIRS,
    TRAIN_FIELDS,
    ConfigError,
    DataConfig,
    Dimension,
    Sweep,
)
from cifar_exp.config.goals import (
    BETTER,
    EPOCH_METRICS,
    METRICS,
    MULTI_OBJECTIVE_SAMPLERS,
    SAMPLER_OPTIONS,
    Bound,
    Objective,
    PrunerConfig,
    SamplerConfig,
    WarmStart,
)
from cifar_exp.config.safeyaml import MAX_SWEEP_BYTES, load_yaml, short
from cifar_exp.config.values import check_range, check_train_value, check_weights, coerce, section, unknown_key, within

# Top-level keys of a sweep file, with the type each must have.
_TOP_LEVEL: dict[str, Any] = {
    "description": str,
    "objective": Objective,
    "objectives": list,
    "constraints": dict,
    "warm_start": WarmStart,
    "enqueue": list,
    "space": dict,
    "fixed": dict,
    "sampler": SamplerConfig,
    "pruner": PrunerConfig,
    "data": DataConfig,
    "epochs": int, "trials": int | None,
    "timeout": float | None, "trial_timeout": float | None,
    "max_consecutive_failures": int,
    "heartbeat_grace": float,
    "deterministic": bool,
    "model_epoch": Literal["best", "last"],
    "confirm_seeds": int, "confirm_candidates": int,
    "keep_models": int | None,
    "registered_model": str,
    "hypermodel": str,
}
_HYPERMODEL_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
# The bounds of the top-level numbers, for the file and for the flags that override it alike.
# Seconds are bounded by what the timers hold with room to spare (setitimer and a thread's wait
# overflow near 1e10): a trial of 30 days, a sweep of a year, a grace of a day.
TOP_LEVEL_RANGES = {"epochs": (1, 100_000), "trials": (1, 1_000_000), "timeout": (1.0, 31_536_000.0),
                    "trial_timeout": (1.0, 2_592_000.0), "max_consecutive_failures": (1, 1_000_000),
                    "heartbeat_grace": (5.0, 86_400.0), "confirm_seeds": (0, 1000), "confirm_candidates": (1, 1000),
                    "keep_models": (1, None)}
_DIMENSION_KEYS = {"type", "low", "high", "log", "step", "choices", "when"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def _dimension(name: str, raw: Any, where: str) -> Dimension:
    raw = coerce(raw, dict, where)
    for key in raw:
        if key not in _DIMENSION_KEYS:
            raise unknown_key(str(key), _DIMENSION_KEYS, where)
    kind = coerce(raw.get("type"), Literal["float", "int", "categorical"], f"{where}.type")
    field_type = _TRAIN_TYPES[name]
    if type(None) in get_args(field_type):  # an optional int or float is searched as one
        (field_type,) = [a for a in get_args(field_type) if a is not type(None)]
    if kind == "categorical":
        return _categorical(name, raw, where)
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
    step = None if raw.get("step") is None else _step(raw["step"], kind, low, high, log, where)
    if log and low <= 0:
        raise ConfigError(f"{where}: log scale needs low > 0, got low ({low})")
    return Dimension(name, kind, low=low, high=high, log=log, step=step)


def _categorical(name: str, raw: Mapping[str, Any], where: str) -> Dimension:
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


def _step(raw: Any, kind: str, low: Any, high: Any, log: bool, where: str) -> Any:
    step = coerce(raw, int if kind == "int" else float, f"{where}.step")
    if step <= 0:
        raise ConfigError(f"{where}.step: must be greater than 0, got {short(step)}")
    if step > high - low:
        raise ConfigError(f"{where}.step: {short(step)} is wider than the range {low}..{high}, so every trial "
                          f"would get {low}: give a step of at most {high - low}")
    if log:
        raise ConfigError(f"{where}: log and step cannot be combined (drop one)")
    return step


def _space_and_fixed(raw_space: Mapping[str, Any], raw_fixed: Mapping[str, Any], hypermodel: str,
                     where: str) -> tuple[dict[str, Dimension], dict[str, Any]]:
    """The ``space`` dimensions (without their conditions yet) and the ``fixed`` values, checked
    against ``TrainConfig`` and against what a ``hypermodel`` leaves to the sweep."""
    space = {}
    for dim_name, spec in raw_space.items():
        if dim_name not in TRAIN_FIELDS:
            raise unknown_key(str(dim_name), TRAIN_FIELDS, f"{where}: space")
        space[dim_name] = _dimension(dim_name, spec, f"{where}: space.{dim_name}")
    fixed = {}
    for key, value in raw_fixed.items():
        if key not in TRAIN_FIELDS:
            raise unknown_key(str(key), TRAIN_FIELDS, f"{where}: fixed")
        if key in space:
            raise ConfigError(f"{where}: fixed.{key}: '{key}' is also in space (keep one)")
        fixed[key] = check_train_value(key, value, f"{where}: fixed.{key}")
    if hypermodel:
        if not _HYPERMODEL_RE.match(hypermodel):
            raise ConfigError(f"{where}: hypermodel: {short(hypermodel)} is not module:attribute "
                              f"(e.g. my_models:build_model)")
        if hypermodel.partition(".")[0].partition(":")[0] in sys.stdlib_module_names:  # os:system
            raise ConfigError(f"{where}: hypermodel: {short(hypermodel)} names Python's standard library, not a "
                              f"module of hypermodels: name your own (e.g. my_models:build_model)")
        for key in [*space, *fixed]:
            if key not in HYPERMODEL_FIELDS:
                raise ConfigError(f"{where}: {key} does not apply with a hypermodel, which builds and compiles "
                                  f"its own model (these do: {', '.join(HYPERMODEL_FIELDS)})")
    elif not space:
        raise ConfigError(f"{where}: space: declare at least one dimension to search")
    return space, fixed


def parse_sweep(name: str, text: str, path: Path) -> Sweep:
    """Parse and validate the YAML ``text`` of the sweep ``name``; errors are prefixed by ``path``."""
    where = str(path)
    raw = load_yaml(text, where)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of settings at the top level")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in _TOP_LEVEL:
            raise unknown_key(str(key), _TOP_LEVEL, where)
        typ = _TOP_LEVEL[key]
        if dataclasses.is_dataclass(typ):
            values[key] = section(typ, value, f"{where}: {key}")
        else:
            values[key] = coerce(value, typ, f"{where}: {key}")
            if key in TOP_LEVEL_RANGES and values[key] is not None:
                check_range(values[key], TOP_LEVEL_RANGES[key], f"{where}: {key}")
    values.update(_goals(values, where))
    raw_space = values.pop("space", {})
    space, fixed = _space_and_fixed(raw_space, values.pop("fixed", {}), values.get("hypermodel", ""), where)
    for dim_name, dim in space.items():
        when = _conditions(dim_name, raw_space[dim_name].get("when"), space, fixed,
                           f"{where}: space.{dim_name}.when")
        space[dim_name] = dataclasses.replace(dim, when=when)
    space = _sampling_order(space, where)
    values["enqueue"] = _enqueue(values.pop("enqueue", []), space, name, values.get("warm_start"), where)
    _check_together(values, space, fixed, where)
    return Sweep(name=name, path=path, content_hash=hashlib.sha256(text.encode()).hexdigest(), text=text,
                 space=space, fixed=fixed, **values)


def _goals(values: dict[str, Any], where: str) -> dict[str, Any]:
    """``objective`` or ``objectives`` (as ``objectives``, the first a per-epoch metric),
    ``constraints`` (metric -> ``Bound``) and the sampler's options, checked against each other."""
    if "objective" in values and "objectives" in values:
        raise ConfigError(f"{where}: objective and objectives both set: keep one (objectives: a list for several)")
    objectives = _objectives(values.pop("objectives"), where) if "objectives" in values else (
        values.pop("objective", Objective()),)
    key = "objectives" if len(objectives) > 1 else "objective"
    metrics = [o.metric for o in objectives]
    if metrics[0] not in EPOCH_METRICS:
        raise ConfigError(f"{where}: {key}: the first objective must be a per-epoch metric "
                          f"({', '.join(EPOCH_METRICS)}): pruning follows its learning curve; "
                          f"put {metrics[0]} after it")
    for o in objectives:
        if o.direction != BETTER[o.metric]:
            raise ConfigError(f"{where}: {key}: {o.direction} {o.metric} optimises the wrong way (swap the direction)")
    sampler = values.get("sampler", SamplerConfig())
    extra = sorted(sampler.options() - SAMPLER_OPTIONS[sampler.name])
    if extra:
        takes = ", ".join(sorted(SAMPLER_OPTIONS[sampler.name])) or "no options"
        raise ConfigError(f"{where}: sampler.{extra[0]}: does not apply to the {sampler.name} sampler "
                          f"(it takes {takes})")
    if sampler.group and sampler.multivariate is False:
        raise ConfigError(f"{where}: sampler: group needs multivariate (drop multivariate: false)")
    if len(objectives) > 1 and sampler.name not in MULTI_OBJECTIVE_SAMPLERS:
        raise ConfigError(f"{where}: sampler: {sampler.name} takes one objective; for several use one of "
                          f"{', '.join(MULTI_OBJECTIVE_SAMPLERS)}")
    return {"objectives": objectives, "constraints": _constraints(values.pop("constraints", {}), where)}


def _objectives(raw: list[Any], where: str) -> tuple[Objective, ...]:
    if not raw:
        raise ConfigError(f"{where}: objectives: give a list of {{metric, direction}}")
    objectives = tuple(section(Objective, o, f"{where}: objectives[{i}]") for i, o in enumerate(raw))
    if len({o.metric for o in objectives}) != len(objectives):
        raise ConfigError(f"{where}: objectives: each metric at most once")
    return objectives


def _constraints(raw: dict[str, Any], where: str) -> dict[str, Bound]:
    constraints = {}
    for name, raw_bound in raw.items():
        if name not in METRICS:
            raise unknown_key(str(name), METRICS, f"{where}: constraints")
        bound = section(Bound, raw_bound, f"{where}: constraints.{name}")
        if bound.min is None and bound.max is None or (bound.min is not None and bound.max is not None
                                                        and bound.min > bound.max):
            raise ConfigError(f"{where}: constraints.{name}: give max, min, or both with min <= max")
        constraints[str(name)] = bound
    return constraints


def _enqueue(raw: list[Any], space: Mapping[str, Dimension], name: str, warm: WarmStart | None,
             where: str) -> tuple[dict[str, Any], ...]:
    """``enqueue:`` settings, each a mapping of space dimensions to values they can take; and a
    ``warm_start`` that names a study (not this one)."""
    if warm is not None and (not warm.sweep or warm.sweep == name):
        raise ConfigError(f"{where}: warm_start.sweep: name another sweep's study (not {short(warm.sweep)})")
    settings = []
    for i, item in enumerate(raw):
        item = coerce(item, dict, f"{where}: enqueue[{i}]")
        for key, value in item.items():
            if key not in space:
                raise unknown_key(str(key), space, f"{where}: enqueue[{i}] (space dimensions)")
            why = within(space[key], check_train_value(key, value, f"{where}: enqueue[{i}].{key}"))
            if why:
                raise ConfigError(f"{where}: enqueue[{i}].{key}: {short(value)} is {why}")
        settings.append(dict(item))
    return tuple(settings)


def _check_together(values: Mapping[str, Any], space: Mapping[str, Dimension], fixed: Mapping[str, Any],
                   where: str) -> None:
    """The checks that take several of a sweep's settings at once."""
    declared = set(space) | set(fixed)
    if {"frozen_layers", "frozen_fraction"} <= declared:
        raise ConfigError(f"{where}: frozen_layers and frozen_fraction both set: keep one (a layer count, "
                          f"or a fraction of the backbone)")
    weights = space["weights"].choices if "weights" in space else (fixed["weights"],) if "weights" in fixed else ()
    for value in weights:
        check_weights(value, f"{where}: weights")
    if "registered_model" in values and not _NAME_RE.match(values["registered_model"]):
        raise ConfigError(f"{where}: registered_model: {short(values['registered_model'])} is not a valid name "
                          f"(letters, digits, '_', '-' and '.', starting with a letter or digit)")
    if values.get("confirm_seeds") == 1:
        raise ConfigError(f"{where}: confirm_seeds: 1 seed has no spread to judge a champion by: give 2 or more "
                          f"(or 0: no confirmation)")
    if values.get("trials", 20) is None and values.get("timeout") is None:
        raise ConfigError(f"{where}: give a budget: trials, timeout, or both")


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


def check_name(name: str, what: str = "sweep name") -> str:
    """``name`` if it is a plain sweep name (letters, digits, ``_.-``); no paths, no NUL bytes."""
    if not _NAME_RE.match(name) or ".." in name:
        raise ConfigError(f"invalid {what} {name!r}: use letters, digits, '_', '-' and '.' only")
    return name


def available_sweeps() -> dict[str, Path]:
    """Sweep name -> file, for every ``*.yaml`` in the sweep directories (earlier ones win)."""
    found: dict[str, Path] = {}
    for directory in SWEEP_DIRS:
        for path in sorted(directory.glob("*.yaml")) if directory.is_dir() else []:
            found.setdefault(path.stem, path)
    return found


def load_sweep(name_or_path: str, study: str | None = None) -> Sweep:
    """Load a sweep by name (``lr_dropout``) or by file path (``my/sweep.yaml``); with ``study``,
    the sweep under that name instead of its own (``--study``: its study, experiment, registered
    model and log file are named ``study``)."""
    if name_or_path.endswith((".yaml", ".yml")):
        path = Path(name_or_path)
        if not path.exists():
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
    if not path.is_file():  # a FIFO or a link to /dev/zero would hang the read
        raise ConfigError(f"sweep {name}: {path} is not a regular file (a pipe, device or dangling link): "
                          f"replace it with the sweep's .yaml file")
    try:
        size = path.stat().st_size
        if size > MAX_SWEEP_BYTES:
            raise ConfigError(f"{path}: {size} bytes; a sweep file is a few KB (limit {MAX_SWEEP_BYTES})")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the sweep file ({exc})") from None
    sweep = parse_sweep(name, text, path)
    return sweep if study is None else dataclasses.replace(sweep, name=check_name(study, "--study"))
