"""Bad input on the command line: one line on stderr, exit code 2, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


def sweep(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cifar_exp.sweep", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_list_names_every_sweep_with_a_line(isolated: Path) -> None:
    result = sweep("--list", cwd=isolated)
    assert result.returncode == 0
    names = {line.split()[0] for line in result.stdout.splitlines()}
    assert names == {p.stem for p in (ROOT / "sweeps").glob("*.yaml")}
    assert all(len(line.split()) > 3 for line in result.stdout.splitlines())


def _bad_sweep(folder: Path) -> str:
    path = folder / "bad.yaml"
    path.write_text("space:\n  dropout: {type: float, low: 0.5, high: 0.2}\n")
    return str(path)


@pytest.mark.parametrize("make_args, fragment", [
    (lambda d: ["lr_dropuot"], "unknown sweep 'lr_dropuot': did you mean 'lr_dropout'?"),
    (lambda d: [_bad_sweep(d)], "space.dropout: high (0.2) must be greater than low (0.5)"),
    (lambda d: ["lr_dropout", "--data", str(d / "nowhere")], "does not exist; give --data one of"),
    (lambda d: ["lr_dropout", "--data", str((d / "empty").mkdir() or d / "empty")],
     "not a recognisable CIFAR-10 layout"),
    (lambda d: ["lr_dropout", "--trials", "0"], "--trials must be greater than 0"),
    (lambda d: ["lr_dropout", "--train-images", "0"], "--train-images must be greater than 0"),
    (lambda d: ["lr_dropout", "--epochs", "two"], "--epochs takes a number"),
    (lambda d: ["lr_dropout", "--bogus"], "unrecognized arguments: --bogus"),
    (lambda d: ["../etc"], "invalid sweep name"),
    (lambda d: ["a\nb"], "invalid sweep name 'a\\nb'"),
    (lambda d: ["lr_dropout", "--gpus", "0,gpu1"], "--gpus '0,gpu1': give GPU indices separated by commas"),
    (lambda d: ["lr_dropout", "--storage", "postgresql://me:hunter2@127.0.0.1:1/optuna"],
     "cannot open the Optuna storage postgresql://me:***@127.0.0.1:1/optuna"),
    (lambda d: [], "name a sweep"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(isolated: Path, make_args, fragment: str) -> None:
    args = make_args(isolated)
    before = set(isolated.rglob("*"))
    result = sweep(*args, cwd=isolated)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr and "hunter2" not in result.stderr
    assert not (isolated / "mlruns").exists()
    assert {p for p in isolated.rglob("*") if "cache" not in p.parts} <= before


def test_jax_keeps_compiled_programs_in_the_project_cache(isolated: Path) -> None:
    # A worker's environment, then one epoch under JAX in a fresh process: the compiled train step
    # lands in $CIFAR_EXP_CACHE/jax, where the next process (any worker, any run) finds it.
    script = """
from cifar_exp.cli import set_environment
set_environment(False)
from cifar_exp import data, train
from cifar_exp.config import TrainConfig
from tests.conftest import synthetic_images
x, y = synthetic_images(64)
xt, yt = synthetic_images(20, seed=1)
splits = data.split(data.Cifar10(x, y, xt, yt, tuple("abcdefghij"), "synthetic", "0"), 0.25, 0)
train.train(TrainConfig(blocks=1, filters=4, convs_per_block=1, dense_units=8), splits, epochs=1, seed=0)
"""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(KERAS_BACKEND="jax", CIFAR_EXP_CACHE=str(isolated / "cache"), PYTHONPATH=str(ROOT),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # cache even quick compiles, for the test
    result = subprocess.run([sys.executable, "-c", script], cwd=isolated, capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert any((isolated / "cache" / "jax").iterdir())


def test_progress_names_a_degenerate_trial_on_its_line(capsys: pytest.CaptureFixture[str]) -> None:
    from cifar_exp.cli import Progress

    progress = Progress("val_accuracy", True, 0, 4)
    progress({"kind": "end", "trial": 2, "state": "COMPLETE", "value": 0.1, "test_accuracy": 0.1,
              "degenerate": "predictions collapsed onto cat (97% of test images)"})
    progress({"kind": "end", "trial": 3, "state": "PRUNED", "reason": "pruned after epoch 1: val_accuracy=0.1000",
              "degenerate": "val_accuracy at chance (best 0.1000 <= 0.1085 in 1 epochs)"})
    first, second = capsys.readouterr().out.strip().splitlines()
    assert first.startswith("trial 2 COMPLETE val_accuracy=0.1000 test_accuracy=0.1000 [degenerate: predictions "
                            "collapsed onto cat (97% of test images)]")
    assert "trial 3 PRUNED: pruned after epoch 1" in second and "[degenerate: val_accuracy at chance" in second


def test_without_a_terminal_each_epoch_is_one_plain_line_and_the_status_has_time_left(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from cifar_exp import cli

    clock = iter([0.0, 10.0, 70.0, 70.0, 70.0])  # created, trial 0 starts, ends (60 s), status
    monkeypatch.setattr(cli.time, "monotonic", lambda: next(clock))
    progress = cli.Progress("val_accuracy", True, 0, 4, workers=2)
    progress({"kind": "start", "trial": 0, "worker": 0, "params": {"dropout": 0.25}})
    progress({"kind": "epoch", "trial": 0, "epoch": 1, "epochs": 3, "value": 0.25, "logs": {"epoch_seconds": 12.34}})
    progress({"kind": "end", "trial": 0, "state": "COMPLETE", "value": 0.25, "test_accuracy": 0.24})
    out = capsys.readouterr().out
    assert "\r" not in out and "\033" not in out  # no control characters into a file or a pipe
    lines = out.splitlines()
    assert lines[1] == "  trial 0 epoch 1/3 val_accuracy=0.2500 (12.3 s)"
    # 3 trials left x 60 s / 2 workers
    assert lines[2].endswith("| 1 complete, 0 pruned, 0 failed | 1m10s elapsed, about 1m30s left")


def test_a_resumed_sweep_reports_the_trials_it_already_has(capsys: pytest.CaptureFixture[str]) -> None:
    from cifar_exp.cli import Progress

    progress = Progress("val_accuracy", True, 3, 5, counts={"COMPLETE": 2, "PRUNED": 1}, best=(0.41, 1))
    progress({"kind": "end", "trial": 3, "state": "PRUNED", "reason": "pruned after epoch 1: val_accuracy=0.2"})
    line = capsys.readouterr().out.strip()
    assert "[4 of 5] best val_accuracy=0.4100 (trial 1) | 2 complete, 2 pruned, 0 failed" in line


def test_quiet_prints_nothing_while_the_sweep_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from cifar_exp.cli import Progress

    progress = Progress("val_accuracy", True, 0, 2, quiet=True)
    progress({"kind": "start", "trial": 0, "worker": 0, "params": {}})
    progress({"kind": "epoch", "trial": 0, "epoch": 1, "epochs": 1, "value": 0.3, "logs": {}})
    progress({"kind": "end", "trial": 0, "state": "COMPLETE", "value": 0.3, "test_accuracy": 0.3})
    assert capsys.readouterr().out == ""
