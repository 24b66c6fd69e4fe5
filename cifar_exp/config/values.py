"""Checking a value against the schema (``config``): a type (``coerce``), a range
(``check_range``), a dataclass section (``section``), a ``TrainConfig`` field
(``check_train_value``, and from MLflow's strings ``train_values_from_strings``), a weights file
(``check_weights``). Every error is
a ``ConfigError`` prefixed by ``where``, the place in the file or the flag."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from cifar_exp.config import _TRAIN_TYPES, TRAIN_FIELDS, ConfigError, Dimension
from cifar_exp.config.safeyaml import short

_CONTAINERS = {str: "text", list: "a list", dict: "a mapping of key: value"}
_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def unknown_key(key: str, known: Any, where: str) -> ConfigError:
    key = short(key)[1:-1] if len(key) > 60 else key
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(sorted(known))}"
    return ConfigError(f"{where}: unknown key '{key}' ({hint})")


def coerce(value: Any, typ: Any, where: str) -> Any:
    """Return ``value`` checked against the type ``typ`` (int, float, bool, str, Literal, X | None).

    A number written as text (quoted) is refused, for int and float alike.
    """
    origin = get_origin(typ)
    if origin is Literal:
        allowed = get_args(typ)
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            raise ConfigError(f"{where}: {short(value)} is not one of {', '.join(map(str, allowed))}")
        return value
    if origin is Union or (origin is not None and type(None) in get_args(typ)):
        if value is None and type(None) in get_args(typ):
            return None
        (inner,) = [a for a in get_args(typ) if a is not type(None)]
        return coerce(value, inner, where)
    return _scalar(value, typ, where)


def _scalar(value: Any, typ: Any, where: str) -> Any:
    """``coerce`` for a plain type: bool, int, float, str, list, dict."""
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {short(value)}")
        return value
    # One rule for numbers: a quoted number is text, for int and float keys alike (the loader
    # reads 1e-4 as a number already: ``safeyaml``).
    quoted = " (text: write the number without quotes)" if isinstance(value, str) and \
        _FLOAT_RE.match(value.strip()) else ""
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {short(value)}{quoted}")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {short(value)}{quoted}")
        return float(value)
    if typ in _CONTAINERS:
        if not isinstance(value, typ):
            raise ConfigError(f"{where}: expected {_CONTAINERS[typ]}, got {short(value)}")
        return value
    raise TypeError(f"unsupported type {typ!r}")  # a bug in this module, not user input


def check_range(value: float, bounds: tuple[Any, ...], where: str) -> None:
    low, high = bounds[0], bounds[1]
    open_high = bounds[2] if len(bounds) > 2 else False
    if value < low or (high is not None and (value >= high if open_high else value > high)):
        span = f"[{low}, {high})" if open_high else f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(f"{where}: {short(value)} is out of range {span}")


def section(cls: Any, raw: Any, where: str) -> Any:
    """Build the dataclass ``cls`` from the mapping ``raw``, rejecting unknown keys."""
    raw = coerce(raw, dict, where)
    hints = get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        if key not in known:
            raise unknown_key(str(key), known, where)
        values[key] = coerce(value, hints[key], f"{where}.{key}")
        if "range" in known[key].metadata and values[key] is not None:
            check_range(values[key], known[key].metadata["range"], f"{where}.{key}")
    return cls(**values)


def check_train_value(name: str, value: Any, where: str) -> Any:
    """``value`` validated for the ``TrainConfig`` field ``name``."""
    value = coerce(value, _TRAIN_TYPES[name], where)
    if "range" in TRAIN_FIELDS[name].metadata:
        check_range(value, TRAIN_FIELDS[name].metadata["range"], where)
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


def within(dim: Dimension, value: Any) -> str:
    """Why ``value`` is not one the dimension ``dim`` can take (``""`` when it is)."""
    if dim.type == "categorical":
        return "" if any(value == c and type(value) is type(c) for c in dim.choices) else \
            f"not one of {', '.join(map(str, dim.choices))}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "not a number"
    if dim.type == "int" and value != int(value):
        return "not an integer"
    assert dim.low is not None and dim.high is not None
    if not dim.low <= value <= dim.high:
        return f"outside {dim.low}..{dim.high}"
    if dim.step and abs((value - dim.low) / dim.step - round((value - dim.low) / dim.step)) > 1e-9:
        return f"not on its step {dim.step}"
    return ""


_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"  # the first bytes of every HDF5 file (Keras' .weights.h5)


def check_weights(value: str, where: str) -> str:
    """``value`` if it is "imagenet", "none" or an existing Keras weights file: a regular
    ``.weights.h5`` file that starts as HDF5 does (``/etc/passwd`` would fail every trial)."""
    if value in ("imagenet", "none"):
        return value
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"{where}: {value[:60]!r} is neither imagenet, none, nor an existing weights file "
                          f"(give the path of a .weights.h5 file saved from the backbone)")
    try:
        with path.open("rb") as f:
            head = f.read(len(_HDF5_MAGIC))
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {value[:60]!r} ({exc.strerror or exc})") from None
    if not value.endswith(".weights.h5") or head != _HDF5_MAGIC:
        raise ConfigError(f"{where}: {value[:60]!r} is not a Keras weights file (a .weights.h5 file in HDF5, saved "
                          f"with backbone.save_weights)")
    return value
