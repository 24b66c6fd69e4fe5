"""Property-based fuzzing of the sweep-file loader (hypothesis): whatever the file holds, it either
loads into a valid ``Sweep`` or raises ``ConfigError`` with a one-line message naming the file:
never another exception."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cifar_exp.config import TRAIN_FIELDS, ConfigError, Sweep
from cifar_exp.config.sweepfile import available_sweeps, parse_sweep

WHERE = Path("fuzz.yaml")
SHIPPED = [yaml.safe_load(path.read_text()) for path in available_sweeps().values()]
KEYS = sorted({*TRAIN_FIELDS, "objective", "space", "fixed", "sampler", "pruner", "data", "epochs", "trials",
               "timeout", "type", "low", "high", "log", "step", "choices", "when", "metric", "direction",
               "name", "seed", "min_epochs", "hypermodel", "deterministic", "max_consecutive_failures"})
SCALARS = (st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=12) | st.sampled_from(["relu", "cnn", "transfer", "imagenet", "none", "tpe", "1e-3"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=4),
                      max_leaves=12)


def check(text: str) -> None:
    try:
        sweep = parse_sweep("fuzz", text, WHERE)
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith(str(WHERE)) and "\n" not in message.strip(), message
    else:
        assert isinstance(sweep, Sweep)
        assert set(sweep.space) | set(sweep.fixed) <= set(TRAIN_FIELDS)  # every knob is a TrainConfig field


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_any_text_loads_or_is_one_config_error(text: str) -> None:
    check(text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), VALUES, max_size=6))
def test_any_mapping_loads_or_is_one_config_error(document: dict[str, Any]) -> None:
    check(yaml.safe_dump(document))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(range(len(SHIPPED))), st.lists(st.sampled_from(KEYS), min_size=1, max_size=3), VALUES)
def test_a_shipped_sweep_with_one_value_changed_loads_or_is_one_config_error(which: int, path: list[str],
                                                                            value: Any) -> None:
    """Mutations of real sweep files reach the deep checks (dimensions, conditions, ranges)."""
    document = copy.deepcopy(SHIPPED[which])
    node = document
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[path[-1]] = value
    check(yaml.safe_dump(document))
