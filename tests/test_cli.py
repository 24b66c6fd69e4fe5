"""Bad input on the command line: one line on stderr, exit code 2, nothing written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT


@pytest.fixture
def environment() -> Iterator[None]:
    """The process environment as it was, after a test that runs a command in this process (a
    command sets its backend's variables)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


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
    # The sweep file's bounds hold for the flags that override it.
    (lambda d: ["lr_dropout", "--trials", str(10**12)], "--trials: 1000000000000 is out of range [1, 1000000]"),
    (lambda d: ["lr_dropout", "--epochs", str(10**9)], "--epochs: 1000000000 is out of range [1, 100000]"),
    (lambda d: ["lr_dropout", "--workers", "1000"], "--workers 1000: this machine gives the sweep"),
    (lambda d: ["lr_dropout", "--storage", ""], "--storage is empty"),
    (lambda d: ["lr_dropout", "--storage", "."], "--storage . is a folder"),
    (lambda d: ["lr_dropout", "--tracking-uri", ""], "--tracking-uri is empty"),
    (lambda d: ["lr_dropout", "--tracking-uri", "ftp://host/store"], "MLflow cannot track to ftp:// here"),
    (lambda d: ["lr_dropout", "--tracking-uri", "mlruns"], "MLflow cannot track to a plain path here"),
    (lambda d: ["lr_dropout", "--tracking-uri", "sqlite://store.db"], "a SQLite store is sqlite:///PATH"),
    (lambda d: ["lr_dropout", "--tracking-uri", "http://"], "names no host"),
    (lambda d: ["lr_dropout", "--tracking-uri", "http://127.0.0.1:port"], "is malformed"),
    (lambda d: ["lr_dropout", "--tracking-uri", "http://[::1"], "is malformed"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(isolated: Path, make_args, fragment: str,
                                                         capsys: pytest.CaptureFixture[str],
                                                         environment: None) -> None:
    # In this process (the CLI's own error boundary; a real process's exit code: the next test).
    from cifar_exp import cli

    args = make_args(isolated)
    before = set(isolated.rglob("*"))
    try:
        code = cli.command("sweep", args)
    except SystemExit as exc:  # argparse's own errors exit from the parser
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], err
    assert "Traceback" not in err and "hunter2" not in err
    assert not (isolated / "mlruns").exists()
    assert {p for p in isolated.rglob("*") if "cache" not in p.parts} <= before


def test_workers_beyond_memory_are_refused_with_the_number_that_fits(
        isolated: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, environment: None) -> None:
    import psutil

    from cifar_exp import cli
    from cifar_exp.cli import sweep

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    real = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: real._replace(available=3 * sweep.WORKER_MEMORY_BYTES + 1))
    assert cli.command("sweep", ["lr_dropout", "--workers", "4"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--workers 4: each worker takes about 1.7 GB" in line and "give --workers 3 or fewer" in line
    sweep.check_workers(3)  # what fits passes
    sweep.check_workers(1)
    assert not (isolated / "mlruns").exists()


def test_a_real_process_exits_2_with_one_line(isolated: Path) -> None:
    result = sweep("lr_dropuot", cwd=isolated)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: unknown sweep 'lr_dropuot': did you mean 'lr_dropout'? available: " + ", ".join(
            sorted(p.stem for p in (ROOT / "sweeps").glob("*.yaml"))) + " (or pass a path to a .yaml file)"]
    assert not (isolated / "mlruns").exists()


def test_cifar_exp_debug_adds_the_chained_traceback(isolated: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch, environment: None) -> None:
    from cifar_exp import cli

    monkeypatch.setenv("CIFAR_EXP_DEBUG", "1")
    assert cli.main(["report", "lr_dropout"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "UserError: no MLflow store at mlruns/mlflow.db" in err
    assert err.strip().splitlines()[-1] == "error: no MLflow store at mlruns/mlflow.db: run a sweep first, or pass " \
                                           "--tracking-uri"


def test_one_console_script_has_every_command(capsys: pytest.CaptureFixture[str], environment: None) -> None:
    from cifar_exp import cli

    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for command, found in cli.COMMANDS.items():  # its summary on its own line, whole
        assert re.search(rf"^    {command} +{re.escape(found.summary)}$", out, re.M), out
        assert (ROOT / "cifar_exp" / "cli" / f"{command}.py").is_file()  # a module of cli each
    assert cli.main(["sweep", "--list"]) == 0
    listed = capsys.readouterr().out
    assert "lr_dropout" in listed and max(len(line) for line in listed.splitlines()) <= 100, listed


def test_jax_keeps_compiled_programs_in_the_project_cache(isolated: Path) -> None:
    # A worker's environment, then one epoch under JAX in a fresh process: the compiled train step
    # lands in $CIFAR_EXP_CACHE/jax, where the next process (any worker, any run) finds it.
    script = """
from cifar_exp.cli.environment import set_environment
set_environment(False)
from cifar_exp import data
from cifar_exp.training import train
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


def _feed(progress: Any, tally: Any, *events_: Any) -> None:
    """Events through the tally and into the display, as the supervisor passes them."""
    from cifar_exp.sweep import events

    for event in events_:
        if isinstance(event, events.Ended):
            tally.add(event)
        progress(event, tally)


def test_progress_names_a_degenerate_trial_on_its_line(capsys: pytest.CaptureFixture[str]) -> None:
    from cifar_exp.cli.progress import Progress
    from cifar_exp.sweep.events import Ended, Tally

    _feed(Progress("val_accuracy", 4), Tally(maximize=True),
          Ended(2, "COMPLETE", value=0.1, test_accuracy=0.1,
                degenerate="predictions collapsed onto cat (97% of test images)"),
          Ended(3, "PRUNED", reason="pruned after epoch 1: val_accuracy=0.1000",
                degenerate="val_accuracy at chance (best 0.1000 <= 0.1085 in 1 epochs)"))
    first, second = capsys.readouterr().out.strip().splitlines()
    assert first.startswith("trial 2 COMPLETE val_accuracy=0.1000 test_accuracy=0.1000 [degenerate: predictions "
                            "collapsed onto cat (97% of test images)]")
    assert "trial 3 PRUNED: pruned after epoch 1" in second and "[degenerate: val_accuracy at chance" in second


def test_without_a_terminal_each_epoch_is_one_plain_line_and_the_status_has_time_left(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from cifar_exp.cli import progress as progress_module
    from cifar_exp.sweep.events import Ended, Epoch, Started, Tally

    clock = iter([0.0, 10.0, 70.0, 70.0, 70.0])  # created, trial 0 starts, ends (60 s), status
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: next(clock))
    _feed(progress_module.Progress("val_accuracy", 4, workers=2), Tally(maximize=True),
          Started(0, 0, "run", {"dropout": 0.25}),
          Epoch(0, 1, 3, 0.25, {"epoch_seconds": 12.34}),
          Ended(0, "COMPLETE", value=0.25, test_accuracy=0.24))
    out = capsys.readouterr().out
    assert "\r" not in out and "\033" not in out  # no control characters into a file or a pipe
    lines = out.splitlines()
    assert lines[1] == "  trial 0 epoch 1/3 val_accuracy=0.2500 (12.3 s)"
    # 3 trials left x 60 s / 2 workers
    assert lines[2].endswith("| 1 complete, 0 pruned, 0 failed | 1m10s elapsed, about 1m30s left")


def test_on_a_terminal_a_live_block_has_a_line_per_running_trial_and_the_status(
        capsys: pytest.CaptureFixture[str]) -> None:
    from cifar_exp.cli.progress import Progress
    from cifar_exp.sweep.events import Ended, Epoch, Started, Tally

    progress = Progress("val_accuracy", 4, workers=2)
    progress.live = True  # as on a terminal
    _feed(progress, Tally(maximize=True), Started(0, 0, "a", {}), Started(1, 1, "b", {}),
          Epoch(0, 1, 3, 0.25, {"epoch_seconds": 5.0}), Epoch(1, 2, 3, 0.3, {"epoch_seconds": 4.0}))
    frames = capsys.readouterr().out.split("\033[J")  # each redraw clears the block it replaces
    assert frames[-1].splitlines() == ["  trial 0 epoch 1/3 val_accuracy=0.2500 (5.0 s)",
                                       "  trial 1 epoch 2/3 val_accuracy=0.3000 (4.0 s)",
                                       frames[-1].splitlines()[-1]]
    assert frames[-1].splitlines()[-1].startswith("  no best yet | 0 complete, 0 pruned, 0 failed | ")
    _feed(progress, progress.tally, Ended(0, "COMPLETE", value=0.3, test_accuracy=0.29))
    last = capsys.readouterr().out.split("\033[J")[-1].splitlines()
    assert last[0].startswith("trial 0 COMPLETE val_accuracy=0.3000")  # stays, above the block
    assert last[1] == "  trial 1 epoch 2/3 val_accuracy=0.3000 (4.0 s)" and len(last) == 3


def test_the_estimate_starts_at_the_first_epoch_and_counts_the_running_trials_epochs(
        capsys: pytest.CaptureFixture[str]) -> None:
    from cifar_exp.cli.progress import Progress
    from cifar_exp.sweep.events import Epoch, Started, Steps, Tally

    progress, tally = Progress("val_accuracy", 4), Tally(maximize=True)
    _feed(progress, tally, Started(0, 0, "a", {}))
    assert progress.left(tally) is None  # nothing measured yet: no guess
    _feed(progress, tally, Epoch(0, 1, 10, 0.47, {"epoch_seconds": 30.0}))
    # trial 0: 9 epochs x 30 s; 3 trials not started: 10 epochs x 30 s each
    assert progress.left(tally) == 9 * 30 + 3 * 300
    _feed(progress, tally, Steps(0, 2, 10, 44, 176))  # a quarter into epoch 2
    assert progress.left(tally) == 8.75 * 30 + 3 * 300
    assert "about 19m22s left" in progress.status(tally)


def test_a_live_block_shows_the_steps_inside_an_epoch_and_moves_on_the_clock(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from cifar_exp.cli import progress as progress_module
    from cifar_exp.sweep.events import Epoch, Started, Steps, Tally, Tick

    now = [100.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: now[0])
    plain = progress_module.Progress("val_accuracy", 2)
    _feed(plain, Tally(maximize=True), Started(0, 0, "a", {}), Steps(0, 1, 3, 10, 40), Tick())
    assert capsys.readouterr().out.splitlines() == ["trial 0 started (worker 0): "]  # a pipe: no steps, no ticks
    live = progress_module.Progress("val_accuracy", 2)
    live.live = True
    _feed(live, Tally(maximize=True), Started(0, 0, "a", {}), Epoch(0, 1, 3, 0.4656, {"epoch_seconds": 45.9}),
          Steps(0, 2, 3, 120, 176))
    frame = capsys.readouterr().out.split("\033[J")[-1].splitlines()
    assert frame[0] == "  trial 0 epoch 2/3: step 120/176 | epoch 1 val_accuracy=0.4656 (45.9 s)"
    now[0] += 61.0  # a minute without an event: the clock redraws the block
    _feed(live, live.tally, Tick())
    frame = capsys.readouterr().out.split("\033[J")[-1].splitlines()
    assert frame[-1].endswith("| 1m01s elapsed, about 3m18s left"), frame


def test_a_resumed_sweep_reports_the_trials_it_already_has(capsys: pytest.CaptureFixture[str]) -> None:
    from cifar_exp.cli.progress import Progress
    from cifar_exp.sweep.events import Ended, Tally

    tally = Tally(maximize=True, finished=3, states={"COMPLETE": 2, "PRUNED": 1, "FAIL": 0}, best=(0.41, 1))
    _feed(Progress("val_accuracy", 5), tally, Ended(3, "PRUNED", reason="pruned after epoch 1: val_accuracy=0.2"))
    line = capsys.readouterr().out.strip()
    assert "[4 of 5] best val_accuracy=0.4100 (trial 1) | 2 complete, 2 pruned, 0 failed" in line


def test_an_infeasible_trial_is_never_the_best_and_no_feasible_trial_is_said(
        capsys: pytest.CaptureFixture[str]) -> None:
    from types import SimpleNamespace

    from cifar_exp.cli.progress import Progress, print_summary
    from cifar_exp.config.sweepfile import load_sweep
    from cifar_exp.sweep.events import Ended, Tally

    broke = "latency_ms 3.1, not <= 2"
    _feed(Progress("val_accuracy", 4), Tally(maximize=True),
          Ended(0, "COMPLETE", value=0.5, test_accuracy=0.49, infeasible=broke))
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"trial 0 COMPLETE val_accuracy=0.5000 test_accuracy=0.4900 [infeasible: {broke}]")
    assert "no feasible trial yet (1 broke the constraints) | 1 complete" in line and "best val_accuracy" not in line
    summary = SimpleNamespace(study_name="deploy", counts={"COMPLETE": 1, "PRUNED": 0, "FAIL": 0, "RUNNING": 0},
                              untrained=0, best=[], front=[])
    print_summary(summary, load_sweep("deploy"), "cifar-exp ui deploy")
    assert "no feasible trial: every complete trial broke a constraint" in capsys.readouterr().out


def test_an_interrupted_or_retried_trial_does_not_count_and_failures_in_a_row_reset_on_success() -> None:
    from cifar_exp.sweep.events import INTERRUPTED, Ended, Tally

    tally = Tally(maximize=False)
    for event in (Ended(0, "FAIL", reason="ValueError: x"), Ended(1, "FAIL", reason="died", retried=True),
                  Ended(2, "FAIL", reason=INTERRUPTED)):
        tally.add(event)
    assert (tally.finished, tally.states["FAIL"], tally.failures_in_a_row) == (1, 3, 2)
    assert tally.add(Ended(3, "COMPLETE", value=0.9)) and tally.add(Ended(4, "COMPLETE", value=0.5))
    assert not tally.add(Ended(5, "COMPLETE", value=0.7))  # minimize: 0.7 is no new best
    assert (tally.best, tally.failures_in_a_row, tally.finished) == ((0.5, 4), 0, 4)


def test_quiet_prints_nothing_while_the_sweep_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from cifar_exp.cli.progress import Progress
    from cifar_exp.sweep.events import Ended, Epoch, Started, Tally

    _feed(Progress("val_accuracy", 2, quiet=True), Tally(maximize=True), Started(0, 0, "run", {}),
          Epoch(0, 1, 1, 0.3, {}), Ended(0, "COMPLETE", value=0.3, test_accuracy=0.3))
    assert capsys.readouterr().out == ""


def test_provenance_says_whether_the_environment_is_the_locked_one(tmp_path: Path) -> None:
    import importlib.metadata

    from cifar_exp.cli.environment import lock_state, provenance, runtime_packages

    optuna_version = importlib.metadata.version("optuna")
    lock = tmp_path / "constraints.txt"
    # a test tool pinned, not installed: the runs do not use it (pip install -e . -c leaves it out)
    lock.write_text(f"# pins\noptuna=={optuna_version}\nno-such-test-tool==1.0\n")
    state = lock_state(lock)
    assert state["constraints_match"] == "true" and len(state["constraints_sha256"]) == 64
    lock.write_text(f"optuna=={optuna_version}\nnumpy==0.0.1\nno-such-package-here==1.0\n")
    uses = frozenset({"optuna", "numpy", "no-such-package-here"})
    assert lock_state(lock, uses)["constraints_match"] == (
        f"false: numpy {importlib.metadata.version('numpy')}!=0.0.1, no-such-package-here absent!=1.0")
    assert lock_state(tmp_path / "missing.txt") == {"constraints_match": "none"}
    # the packages a run uses: the requirements' closure, not the [dev] extra's test tools
    used = runtime_packages()
    assert {"optuna", "mlflow", "keras", "sqlalchemy", "numpy"} <= used and not {"pytest", "ruff", "mypy"} & used
    # the checkout's own lock is what a sweep's runs record, and this environment installs it
    assert provenance()["constraints_sha256"] == lock_state(ROOT / "constraints.txt")["constraints_sha256"]


def test_tensorflow_warnings_after_the_import_go_to_the_library_log(tmp_path: Path) -> None:
    """register --seeds printed TensorFlow's retracing warnings on the terminal: its logger gets a
    handler on sys.stderr when first asked for, after the import. In a real process (descriptor 2
    is the point); the warning is raised as TensorFlow raises it, through its own logger."""
    script = ("import os, sys; os.environ['KERAS_BACKEND'] = 'tensorflow'\n"
              "from cifar_exp.cli.environment import quiet_keras\n"
              f"path = quiet_keras({str(tmp_path / 'optuna.journal')!r}, 'demo')\n"
              "import tensorflow as tf\n"
              "tf.get_logger().warning('5 out of the last 5 calls triggered tf.function retracing')\n"
              "print('ours', file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stderr == "ours\n", done.stderr
    assert "triggered tf.function retracing" in (tmp_path / "logs" / "demo.log").read_text()


@pytest.mark.parametrize("argv", [
    ["register", "lr_dropout", "--pick", ""], ["register", "lr_dropout", "--where", "latency_ms<=1e"],
    ["register", "lr_dropout", "--seeds", "1"], ["gc", "lr_dropout"], ["gc", "lr_dropout", "--keep", "٥"],
    ["register", "lr_dropout", "--storage", "nope.journal"], ["gc", "lr_dropout", "--keep", "2", "--storage", "x.db"],
    ["register", "lr_dropout", "--data", "nope.zip"], ["sweep", "lr_dropout", "--warm-start", "x:²"],
    ["sweep", "lr_dropout", "--trials", "0"], ["register", "no_such_sweep"],
])
def test_a_typo_is_refused_before_mlflow_keras_or_the_data_are_imported(isolated: Path, argv: list[str]) -> None:
    """Refusals that need no store came after importing MLflow or Keras (5 to 19 s on a 2-core
    machine). Decided by what the process imported, in a real process, with a store there (empty
    files where the MLflow database and the journal go): never by a clock."""
    (isolated / "mlruns").mkdir()
    (isolated / "mlruns" / "mlflow.db").touch()
    (isolated / "mlruns" / "optuna.journal").touch()
    script = ("import sys\nfrom cifar_exp.cli import main\n"
              "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as exc:  # argparse's refusals\n"
              "    code = exc.code\n"
              "heavy = sorted(m for m in ('mlflow', 'keras', 'tensorflow', 'jax', 'optuna') if m in sys.modules)\n"
              "print(code, ' '.join(heavy))\n")
    done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=120,
                          cwd=isolated)
    assert done.stdout.strip() == "2", (done.stdout, done.stderr)  # exit 2, and nothing heavy imported
    (line,) = done.stderr.strip().splitlines()
    assert "error: " in line, line


def test_every_command_is_a_real_function_in_one_table_and_python_m_cifar_exp_runs_each() -> None:
    from cifar_exp import cli

    for name, command in cli.COMMANDS.items():
        # the run function of the command's own module of cli
        assert callable(command.run) and command.run.__module__ == f"cifar_exp.cli.{name}", name
        assert command.summary and len(command.summary) < 50 and "(" not in command.summary, name  # --help's line
    done = subprocess.run([sys.executable, "-m", "cifar_exp", "gc", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("usage: cifar-exp gc"), done.stderr
