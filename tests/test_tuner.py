"""``--engine keras-tuner``: KerasTuner's tuners search a sweep's space, and every trial is
tracked in MLflow exactly like an Optuna trial (same metrics, artifacts, params, rerunnable)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import keras_tuner
import pytest
from mlflow.tracking import MlflowClient

from cifar_exp.config.sweepfile import load_sweep
from cifar_exp.sweep import tuner
from tests.conftest import ROOT
from tests.test_shipped import sweep_in_process
from tests.test_sweep import clean_env, run_sweep, runs


def model_metrics(run) -> set[str]:  # type: ignore[no-untyped-def]
    return {k for k in run.data.metrics if not k.startswith("system/")}


def test_declare_turns_conditions_into_conditional_scopes() -> None:
    sweep = load_sweep(str(ROOT / "tests" / "sweeps" / "kt_engine.yaml"))
    hp = keras_tuner.HyperParameters()
    tuner.declare(sweep, hp)
    assert [h.name for h in hp.space] == ["optimizer", "momentum", "learning_rate"]
    assert hp.get("optimizer") == "adam" and not hp.is_active("momentum")  # adam: no momentum
    assert tuner.sampled(sweep, hp).keys() == {"optimizer", "learning_rate"}
    hp.values["optimizer"] = "sgd"
    assert hp.is_active("momentum")
    lr = [h for h in hp.space if h.name == "learning_rate"][0]
    assert (lr.min_value, lr.max_value, lr.sampling) == (1e-3, 1e-2, "log")


def artifacts(run_id: str) -> set[str]:
    return {a.path for a in MlflowClient().list_artifacts(run_id)}


@pytest.mark.slow
def test_keras_tuner_engine_tracks_trials_like_the_optuna_engine(isolated: Path, cifar_slice: Path) -> None:
    shutil.copy(ROOT / "tests" / "sweeps" / "kt_engine.yaml", isolated / "kt_engine.yaml")
    # the Optuna engine's trial for reference, its worker in this process (the sweep command's
    # own processes are test_sweep's); the KerasTuner engine's as the command runs them
    sweep_in_process(isolated, isolated / "kt_engine.yaml", trials=1, epochs=1, data=cifar_slice)
    out = run_sweep(isolated, "kt_engine.yaml", "--engine", "keras-tuner", "--data", str(cifar_slice)).stdout
    assert "RandomSearch: 4 completed, 0 failed" in out
    parents, children = runs(isolated, "kt_engine")
    assert sorted(p.data.tags["engine"] for p in parents) == ["keras-tuner", "optuna"]
    optuna_runs = [r for r in children if r.data.tags["engine"] == "optuna"]
    kt_runs = [r for r in children if r.data.tags["engine"] == "keras-tuner"]
    assert len(optuna_runs) == 1 and len(kt_runs) == 4  # exactly the sweep's budget
    reference = optuna_runs[0]
    for run in kt_runs:
        assert run.info.status == "FINISHED" and run.data.tags["state"] == "COMPLETE"
        assert model_metrics(run) == model_metrics(reference)  # system/ ones depend on how long a run took
        assert artifacts(run.info.run_id) == artifacts(reference.info.run_id)
        assert run.data.tags["model_uri"].startswith("models:/")
        # the same params, but for SGD's own: momentum (searched), nesterov and weight_decay exactly
        # when the optimizer is sgd (the settings that apply, config.applies)
        sgd, own = run.data.params["optimizer"] == "sgd", {"momentum", "nesterov", "weight_decay"}
        assert own & set(run.data.params) == (own if sgd else set())
        assert set(run.data.params) - own == set(reference.data.params) - own
    assert {r.data.params["optimizer"] for r in kt_runs} == {"adam", "sgd"}

    # a KerasTuner trial reruns like any other, from its run id
    rerun = subprocess.run([sys.executable, "-m", "cifar_exp", "rerun", kt_runs[0].info.run_id, "--data",
                            str(cifar_slice)], cwd=isolated, capture_output=True, text=True, timeout=600,
                           env=clean_env())
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "bit for bit" in rerun.stdout


def test_keras_tuner_engine_refuses_workers_and_register(isolated: Path) -> None:
    for flag in (["--workers", "2"], ["--register"]):
        result = subprocess.run([sys.executable, "-m", "cifar_exp.sweep", "lr_dropout", "--engine", "keras-tuner",
                                 *flag], cwd=isolated, capture_output=True, text=True, timeout=300, env=clean_env())
        assert result.returncode == 2, result.stderr
        (line,) = [l for l in result.stderr.splitlines() if l.startswith("error:")]
        assert flag[0] in line


@pytest.mark.slow
def test_keras_tuner_engine_runs_a_sweep_s_hypermodel(isolated: Path, cifar_slice: Path) -> None:
    shutil.copy(ROOT / "tests" / "sweeps" / "kt_docs.yaml", isolated / "kt_docs.yaml")
    out = run_sweep(isolated, "kt_docs.yaml", "--engine", "keras-tuner", "--epochs", "1", "--data", str(cifar_slice),
                    env={"PYTHONPATH": str(ROOT)}).stdout
    assert "BayesianOptimization: 2 completed, 0 failed" in out  # tpe maps to KerasTuner's Bayesian tuner
    _, children = runs(isolated, "kt_docs")
    assert len(children) == 2
    for run in children:
        assert {"num_layers", "units_0", "activation", "dropout", "lr"} <= set(run.data.params)
        assert "hyperparameters.json" in artifacts(run.info.run_id)
