"""YAML for files a user hands us: safe (no Python objects), bounded in size and nesting, no
anchors or aliases, no key written twice; every value a message quotes is cut short. Scalars are
read as YAML 1.2's core schema reads them, not as PyYAML's YAML 1.1: ``190:20:30`` is text (1.1:
the sexagesimal 685230), ``yes``/``no``/``on``/``off`` are text (1.1: booleans), ``010`` is ten
(1.1: octal eight), ``1e-4`` is a number (1.1: text), and ``2026-01-01`` stays text."""

from __future__ import annotations

import re
import reprlib
from typing import Any

import yaml

from cifar_exp.config import ConfigError

# A sweep file is a few hundred bytes; these bound what a malformed or hostile one can cost.
MAX_SWEEP_BYTES = 64 * 1024  # 40 times the largest shipped sweep (a 1 MB flow list took 3 s to load here)
MAX_YAML_DEPTH = 20  # a sweep file nests 4 levels (space: name: when: value)
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = _SHORT.maxlong = 60


def short(value: Any) -> str:
    """``repr(value)`` bounded (strings, numbers and containers cut): messages never embed an
    unbounded value from a sweep file."""
    try:
        return _SHORT.repr(value)
    except ValueError:  # an int beyond Python's digit limit for str()
        return "<a number too long to show>"


_BaseLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C parser where PyYAML has it


# YAML 1.2's core schema (yaml.org/spec/1.2.2, 10.3.2): the plain scalars that are not text.
_CORE: dict[str, re.Pattern[str]] = {
    "tag:yaml.org,2002:bool": re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    "tag:yaml.org,2002:int": re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
    "tag:yaml.org,2002:float": re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    "tag:yaml.org,2002:null": re.compile(r"^(?:~|null|Null|NULL|)$"),
}


class _SweepLoader(_BaseLoader):
    """Safe YAML in the core schema of YAML 1.2 (see the module), refusing a key written twice in
    one mapping (PyYAML lets the last one win)."""

    yaml_implicit_resolvers = {None: list(_CORE.items())}  # tried on every plain scalar, in this order

    def construct_yaml_int(self, node: Any) -> int:
        text = self.construct_scalar(node)
        if text.startswith(("0o", "0x")):
            return int(text[2:], 8 if text[1] == "o" else 16)
        return int(text)  # "010" is ten, not YAML 1.1's octal eight

    def construct_yaml_float(self, node: Any) -> float:
        text = self.construct_scalar(node).lower()
        return float(text.replace(".inf", "inf").replace(".nan", "nan"))

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable: the constructor below names it
                continue
            if duplicate:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: {short(key)} is written twice in one "
                                  f"mapping: keep one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_SweepLoader.add_constructor("tag:yaml.org,2002:int", _SweepLoader.construct_yaml_int)
_SweepLoader.add_constructor("tag:yaml.org,2002:float", _SweepLoader.construct_yaml_float)


def load_yaml(text: str, where: str) -> Any:
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
        raise ConfigError(f"{where}: invalid YAML: {at}{short(problem)[1:-1]}") from None
    except (ValueError, RecursionError, MemoryError) as exc:  # e.g. an int of 5,000 digits
        raise ConfigError(f"{where}: invalid YAML: {type(exc).__name__}: {short(str(exc))[1:-1]}") from None


