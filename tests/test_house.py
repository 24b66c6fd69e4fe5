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
# The subpackages (and top-level modules), lowest first: a module may import from its own package
# and the packages below, never above. The ``python -m`` entry points (``cifar_exp.__main__`` for
# every command, ``sweep.__main__`` for the main job) sit above everything.
PACKAGE_FLOORS = [
    {"config", "cluster"},
    {"data", "metrics"},
    {"training"},
    {"track"},
    {"lifecycle", "report"},
    {"sweep"},
    {"rerun"},
    {"registry"},
    {"cli"},
    {"__main__"},
]
# Module by module, lowest first: inside a package too, imports flow one way.
FLOORS = [
    {"config", "config.goals", "sweep.events", "config.safeyaml", "sweep", "training", "cluster", "cluster.slurm",
     "cluster.k8s"},
    {"config.values"},
    {"config.sweepfile", "config.records", "data.formats", "training.backend", "sweep.space", "metrics.plots",
     "sweep.liveness", "sweep.sidecar"},
    {"data", "metrics", "config.outcomes", "training.best"},
    {"training.models", "training.layers", "training.optimizers", "training.programs", "training.checkpoints",
     "training.clock", "training.feed",
     "training.latency"},
    {"training.train", "training.hypermodel"},
    {"track", "track.models", "track.server", "track.ui", "track.view", "track.collect", "lifecycle.outcome",
     "lifecycle.plan"},
    {"lifecycle.steps"},
    {"lifecycle", "report", "registry"},
    {"sweep.recovery", "sweep.pruning"},
    {"sweep.storage", "rerun", "sweep.tuner", "sweep.hyperparameters", "sweep.warmstart"},
    {"sweep.dashboard"},
    {"sweep.worker", "registry.confirm"},
    {"sweep.supervisor"},
    {"registry.study"},
    {"cli.progress", "cli.environment", "cli.arguments"},
    {"cli.sweep", "cli.rerun", "cli.register", "cli.report", "cli.compare", "cli.gc", "cli.ui", "cli.predict",
     "cli.evaluate", "cli.launch", "cli.dashboard"},
    {"cli"},
    {"sweep.__main__", "__main__"},
]
FLOOR = {name: level for level, names in enumerate(FLOORS) for name in names}
PACKAGE_FLOOR = {name: level for level, names in enumerate(PACKAGE_FLOORS) for name in names}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = {f"{node.module}.{alias.name}" for alias in node.names}
            found |= names
            # ``from package import module`` imports the module; anything else, the package's own names
            if any(name.removeprefix("cifar_exp.") not in MODULES for name in names):
                found.add(node.module)
    return found


def package_imports(path: Path) -> set[str]:
    return {name.removeprefix("cifar_exp.") for name in imports(path) if name.removeprefix("cifar_exp.") in FLOOR}


def package(name: str) -> str:
    """The subpackage (or top-level module) that module ``name`` belongs to, for the floors."""
    return "__main__" if name.endswith(".__main__") else name.split(".")[0]


def test_every_module_has_a_floor() -> None:
    assert set(MODULES) == set(FLOOR)
    assert {package(name) for name in MODULES} == set(PACKAGE_FLOOR)


def test_the_top_level_holds_packages_and_entry_points_only() -> None:
    """Beside ``python -m cifar_exp COMMAND``'s entry point only subpackages, named for what they
    are (nouns); the commands (verbs) are modules of ``cli``, and only the main job keeps a
    ``python -m cifar_exp.sweep`` of its own."""
    flat = {p.stem for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    assert flat == {"__main__"}, flat
    assert {p.parent.name for p in PACKAGE.glob("*/__main__.py")} == {"sweep"}
    from cifar_exp import cli

    assert {p.stem for p in (PACKAGE / "cli").glob("*.py")} - {"__init__", "arguments", "environment",
                                                                 "progress"} == set(cli.COMMANDS)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_packages_import_downward(name: str) -> None:
    upward = {other for other in package_imports(MODULES[name])
              if package(other) != package(name) and PACKAGE_FLOOR[package(other)] >= PACKAGE_FLOOR[package(name)]}
    assert not upward, f"{name} (package {package(name)}) imports {sorted(upward)} from its floor or above"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_flow_one_way(name: str) -> None:
    upward = {other for other in package_imports(MODULES[name]) if FLOOR[other] > FLOOR[name]}
    assert not upward, f"{name} (floor {FLOOR[name]}) imports {sorted(upward)} from above"


@pytest.mark.parametrize("name", ["data", "data.formats", *sorted(n for n in MODULES if n.startswith("training."))])
def test_training_imports_neither_optuna_nor_mlflow(name: str) -> None:
    assert not {m for m in imports(MODULES[name]) if m.split(".")[0] in ("optuna", "mlflow")}


def test_only_track_imports_mlflow() -> None:
    users = {name for name, path in MODULES.items() if any(m.split(".")[0] == "mlflow" for m in imports(path))}
    assert users <= {"track", "track.models", "track.server", "track.ui", "track.view"}, users


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_and_functions_stay_readable(name: str) -> None:
    source = MODULES[name].read_text()
    assert len(source.splitlines()) <= MAX_MODULE_LINES
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{name}: {', '.join(long)} over {MAX_FUNCTION_LINES} lines"


def test_every_path_splits_the_data_through_one_call() -> None:
    """``data.splits(sweep, dataset)`` is the one way a trial's splits are carved (the worker, the
    KerasTuner engine, the sweep command, reruns and confirmation seeds called ``data.split`` with
    the sweep's numbers, each its own way)."""
    direct = []
    for name, path in MODULES.items():
        if package(name) == "data":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "split" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "data":
                direct.append(f"{name}:{node.lineno}")
    assert direct == []
