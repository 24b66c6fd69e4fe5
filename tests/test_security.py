"""What the project must never do, checked in its source: load models with safe_mode off, or
unpickle what it did not write."""

from __future__ import annotations

import re

import pytest

from tests.conftest import ROOT

SOURCES = sorted((ROOT / "cifar_exp").rglob("*.py"))


@pytest.mark.parametrize("pattern", [r"enable_unsafe_deserialization", r"safe_mode\s*=\s*False",
                                     r"allow_pickle\s*=\s*True", r"pickle\.loads?\(", r"cloudpickle\.",
                                     r"yaml\.load\(", r"yaml\.unsafe_load", r"\beval\(", r"\bexec\("])
def test_the_package_never_calls(pattern: str) -> None:
    found = [f"{path.name}:{n}" for path in SOURCES for n, line in enumerate(path.read_text().splitlines(), 1)
             if re.search(pattern, line)]
    assert found == []


def test_keras_models_are_loaded_with_safe_mode_on() -> None:
    loads = [line for path in SOURCES for line in path.read_text().splitlines()
             if re.search(r"(keras|mlflow\.keras|saving)\.load_model\b", line)]
    assert loads and all('"safe_mode": True' in line or "safe_mode=True" in line for line in loads), loads
