"""The house rules of ``cifar_exp/``, checked in its source: imports flow one way (floor by
floor, see docs/architecture.md), training imports neither Optuna nor MLflow, only ``track``
imports MLflow, and no module or function grows past what a newcomer reads in one sitting."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGE = ROOT / "cifar_exp"
MODULES = {(p.relative_to(PACKAGE).with_suffix("").as_posix().replace("/__init__", "").replace("/", ".")): p
           for p in sorted(PACKAGE.rglob("*.py")) if p.name != "__init__.py" or p.parent != PACKAGE}
# Lowest first: a module may import modules of its own floor and below, never above.
FLOORS = [
    {"config", "events", "safeyaml"},
    {"sweepfile", "formats", "backend", "space", "plots", "liveness", "sidecar"},
    {"data", "evaluation"},
    {"models", "layers", "optimizers", "programs", "checkpoints"},
    {"train", "hypermodel"},
    {"track", "track.models", "track.ui"},
    {"trial", "overview", "registry"},
    {"storage", "reproduce", "tuner"},
    {"worker"},
    {"study"},
    {"progress", "commands", "results", "cli", "sweep", "rerun", "register", "report", "compare", "ui", "predict",
     "evaluate"},
]
FLOOR = {name: level for level, names in enumerate(FLOORS) for name in names}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def package_imports(path: Path) -> set[str]:
    return {name.removeprefix("cifar_exp.") for name in imports(path) if name.removeprefix("cifar_exp.") in FLOOR}


def test_every_module_has_a_floor() -> None:
    assert set(MODULES) == set(FLOOR)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_flow_one_way(name: str) -> None:
    upward = {other for other in package_imports(MODULES[name]) if FLOOR[other] > FLOOR[name]}
    assert not upward, f"{name} (floor {FLOOR[name]}) imports {sorted(upward)} from above"


@pytest.mark.parametrize("name", ["data", "formats", "models", "layers", "optimizers", "programs", "checkpoints",
                                  "train"])
def test_training_imports_neither_optuna_nor_mlflow(name: str) -> None:
    assert not {m for m in imports(MODULES[name]) if m.split(".")[0] in ("optuna", "mlflow")}


def test_only_track_imports_mlflow() -> None:
    users = {name for name, path in MODULES.items() if any(m.split(".")[0] == "mlflow" for m in imports(path))}
    assert users <= {"track", "track.models", "track.ui"}, users


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_and_functions_stay_readable(name: str) -> None:
    source = MODULES[name].read_text()
    assert len(source.splitlines()) <= MAX_MODULE_LINES
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{name}: {', '.join(long)} over {MAX_FUNCTION_LINES} lines"
