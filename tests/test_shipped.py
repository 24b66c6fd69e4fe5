"""Every shipped sweep, shrunk to one trial of one epoch on a slice of the real CIFAR-10 (JPEG
copy), runs for real; conditional dimensions that are inactive are in neither Optuna nor MLflow.

What gets tracked does not depend on process boundaries, so these run a sweep's worker in this
process (``sweep_in_process``); the sweep command's own processes are tested in test_sweep.py,
test_kills.py, test_frozen.py and test_store_faults.py."""

from __future__ import annotations

import dataclasses
import queue
import threading
from pathlib import Path

import pytest

from cifar_exp.config.sweepfile import available_sweeps, load_sweep
from tests.test_sweep import clean_env, runs, study

pytestmark = pytest.mark.slow
SHIPPED = ("airbench", "architecture", "batch_size", "deploy", "lr_dropout", "lr_schedule", "optimizer",
           "transfer_freeze")


def test_every_sweep_the_docs_name_is_shipped() -> None:
    assert set(SHIPPED) <= set(available_sweeps())


def sweep_in_process(cwd: Path, sweep_file: Path, trials: int, epochs: int, data: Path) -> None:
    """Run ``trials`` trials of the sweep in ``sweep_file`` with one ``worker.Worker`` in this
    process, into ``cwd/mlruns`` (the sweep command's default storage and store), as the sweep
    command's worker would: the study, its parent run, claims, tracked trials."""
    from cifar_exp import track
    from cifar_exp.sweep import storage, warmstart, worker
    from cifar_exp.sweep.supervisor import start_parent_run

    sweep = load_sweep(str(sweep_file))
    sweep = dataclasses.replace(sweep, trials=trials, epochs=epochs,
                                data=dataclasses.replace(sweep.data, source=str(data)))
    from cifar_exp.data import load

    settings = storage.Settings(sweep=sweep, storage=str(cwd / "mlruns" / "optuna.journal"),
                                tracking_uri=f"sqlite:///{cwd}/mlruns/mlflow.db",
                                data_checksum=load(str(data)).checksum)
    created = storage.create_study(settings)
    warmstart.seed(created, sweep)
    track.configure(settings.tracking_uri)
    experiment = track.experiment_id(sweep.name)
    parent = start_parent_run(settings, created, experiment)
    events: queue.Queue = queue.Queue()
    one = worker.Worker(settings, experiment, parent, events, 0)
    assert one.prepare(), events.get_nowait()
    one.run(threading.Event(), deadline=None)  # a failed trial exits: SystemExit fails the test
    track.end_run(parent, "FINISHED")


def shrunk(name: str, directory: Path) -> Path:
    """The shipped sweep file, with ImageNet weights swapped for random ones (tests never
    download) and bfloat16 for float32 (CI's CPU has no bfloat16 units: an airbench epoch took
    44 s instead of 4.3 s; test_train covers mixed precision on a small model); everything else
    as shipped."""
    text = available_sweeps()[name].read_text()
    path = directory / f"{name}.yaml"
    path.write_text(text.replace("weights: imagenet", "weights: none").replace("precision: mixed_bfloat16",
                                                                               "precision: float32"))
    return path


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_sweep_runs_one_trial_of_one_epoch(isolated: Path, cifar_slice: Path, name: str) -> None:
    path = shrunk(name, isolated)
    sweep_in_process(isolated, path, trials=1, epochs=1, data=cifar_slice)
    (trial,) = study(isolated, name).get_trials()
    assert trial.state.name == "COMPLETE", trial.user_attrs.get("fail_reason")
    parents, children = runs(isolated, name)
    assert len(parents) == 1 and len(children) == 1
    params = children[0].data.params
    sweep = load_sweep(str(path))
    for dim in sweep.space:  # an active dimension is sampled and logged; an inactive one neither
        active = sweep.active(dim, trial.params)
        assert (dim in trial.params) == active and (dim in params) == active, dim
    assert {"val_accuracy", "learning_rate", "test_accuracy"} <= set(children[0].data.metrics)


def test_conditional_dimensions_follow_the_sampled_schedule(isolated: Path, cifar_slice: Path) -> None:
    sweep_in_process(isolated, available_sweeps()["lr_schedule"], trials=6, epochs=1, data=cifar_slice)
    trials = study(isolated, "lr_schedule").get_trials()
    _, children = runs(isolated, "lr_schedule")
    by_run = {run.info.run_id: run for run in children}
    owned = {"step": {"step_stages", "step_factor"}, "exponential": {"decay_rate"},
             "cosine_warmup": {"warmup_epochs"}, "one_cycle": {"warmup_fraction"},
             "plateau": {"plateau_factor", "plateau_patience"}}
    conditional = set().union(*owned.values())
    assert len({t.params["lr_schedule"] for t in trials}) > 2  # the test sees several schedules
    for trial in trials:
        expected = owned.get(trial.params["lr_schedule"], set())
        assert conditional & set(trial.params) == expected
        assert conditional & set(by_run[trial.user_attrs["mlflow_run_id"]].data.params) == expected


def test_transfer_sweep_offline_is_one_clear_error(isolated: Path, cifar_slice: Path) -> None:
    import subprocess
    import sys

    # No weights in an empty Keras cache, and no way out: the proxy points at a closed port.
    env = clean_env(KERAS_HOME=str(isolated / "keras"), https_proxy="http://127.0.0.1:9",
                    HTTPS_PROXY="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9")
    result = subprocess.run([sys.executable, "-m", "cifar_exp.sweep", "transfer_freeze", "--trials", "1",
                             "--epochs", "1", "--data", str(cifar_slice)], cwd=isolated, capture_output=True,
                            text=True, timeout=600, env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert "cannot download the ImageNet weights of" in line and "weights: none" in line
    assert study(isolated, "transfer_freeze").get_trials() == []  # no trial was started
