"""The built wheel on its own: it holds every module and the type marker, and installed apart from
the checkout, it lists and loads every sweep of sweeps/ (a checkout's editable install finds them
beside the package; a wheel must ship them)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_sweep import clean_env

pytestmark = pytest.mark.slow

SCRIPT = """
import json, cifar_exp
from cifar_exp.config.sweepfile import available_sweeps, load_sweep
print(json.dumps({"package": cifar_exp.__file__,
                  "sweeps": {name: load_sweep(name).name for name in available_sweeps()}}))
"""


def test_the_wheel_installed_without_the_checkout_lists_and_loads_every_sweep(tmp_path: Path) -> None:
    source, dist, site, elsewhere = (tmp_path / name for name in ("source", "dist", "site", "elsewhere"))
    anywhere = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache", ".whl")

    def ignore(folder: str, names: list[str]) -> set[str]:
        # the checkout's own stores and data (not the package's cifar_exp/data/)
        top = {"mlruns", "data", "cache"} & set(names) if Path(folder) == ROOT else set()
        return set(anywhere(folder, names)) | top

    shutil.copytree(ROOT, source, ignore=ignore)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(source)],
                   check=True, timeout=600, capture_output=True)
    wheel = next(dist.glob("cifar_exp-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {Path(name).name for name in names if name.startswith("cifar_exp/_sweeps/")}
    assert shipped == {path.name for path in (ROOT / "sweeps").glob("*.yaml")}
    # every module of the package (pyproject lists the packages by name), and the type marker
    assert {f"cifar_exp/{p.relative_to(ROOT / 'cifar_exp').as_posix()}"
            for p in (ROOT / "cifar_exp").rglob("*.py")} <= set(names)
    assert "cifar_exp/py.typed" in names
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, timeout=600, capture_output=True)
    elsewhere.mkdir()  # no sweeps/ here, and the checkout is not on the path
    env = clean_env(PYTHONPATH=str(site))
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=elsewhere, env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    found = json.loads(out.strip().splitlines()[-1])
    assert Path(found["package"]).is_relative_to(site)  # the installed copy, not the checkout
    assert found["sweeps"] == {path.stem: path.stem for path in sorted((ROOT / "sweeps").glob("*.yaml"))}
    listed = subprocess.run([sys.executable, "-m", "cifar_exp.sweep", "--list"], cwd=elsewhere, env=env,
                            capture_output=True, text=True, timeout=300, check=True).stdout
    assert all(name in listed for name in found["sweeps"])
