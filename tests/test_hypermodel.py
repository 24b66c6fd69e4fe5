"""KerasTuner hypermodels as Optuna trials: every hp.* call is one suggestion of the same name
and range, conditional scopes are honoured, and training runs the model as compiled."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from cifar_exp import data
from cifar_exp.config import TrainConfig
from cifar_exp.sweep import hyperparameters
from cifar_exp.training import hypermodel, train
from tests.conftest import ROOT, synthetic_images
from tests.test_sweep import clean_env, runs, study


def sampled_trial(spec: str, seed: int = 0) -> tuple[optuna.trial.FrozenTrial, dict]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    trial = study.ask()
    hp = hyperparameters.OptunaHyperParameters(trial)
    hypermodel.load(spec).build(hp)
    study.tell(trial, 0.0)
    return study.trials[0], dict(hp.values)


def test_the_documentation_build_model_becomes_optuna_suggestions() -> None:
    frozen, values = sampled_trial("tests.hypermodels.kt_docs:build_model")
    assert frozen.params == values  # the model was built from exactly what Optuna sampled
    dist = frozen.distributions
    assert dist["num_layers"] == IntDistribution(1, 3)
    assert dist["units_0"] == IntDistribution(32, 512, step=32)
    assert dist["activation"] == CategoricalDistribution(["relu", "tanh"])
    assert dist["dropout"] == CategoricalDistribution([False, True])
    assert dist["lr"] == FloatDistribution(1e-4, 1e-2, log=True)
    assert {f"units_{i}" for i in range(values["num_layers"])} == {k for k in values if k.startswith("units_")}


def test_conditional_scope_suggests_only_the_active_branch() -> None:
    seen = set()
    for seed in range(8):
        frozen, _ = sampled_trial("tests.hypermodels.kt_docs:MyHyperModel", seed)
        branch = frozen.params["model_type"]
        seen.add(branch)
        expected = {"model_type", "mlp_units"} if branch == "mlp" else {"model_type", "filters"}
        assert set(frozen.params) == expected
    assert seen == {"mlp", "cnn"}


@pytest.mark.parametrize("spec, message", [
    ("no_such_module:build", "cannot import no_such_module"),
    ("tests.hypermodels.kt_docs:missing", "has no attribute 'missing'"),
    ("tests.hypermodels.kt_docs:keras", "neither a build(hp) function nor a keras_tuner.HyperModel"),
])
def test_bad_hypermodels_are_one_line_errors(spec: str, message: str) -> None:
    with pytest.raises(hypermodel.HypermodelError, match=message.replace("(", r"\(").replace(")", r"\)")):
        hypermodel.load(spec)


@pytest.mark.keras  # training: again under every backend
def test_a_hypermodel_trains_as_compiled_with_its_own_fit() -> None:
    x, y = synthetic_images(64)
    xt, yt = synthetic_images(20, seed=1)
    splits = data.split(data.Cifar10(x, y, xt, yt, tuple("abcdefghij"), "synthetic", "0"), 0.25, 0)
    hp = hypermodel.fixed({"model_type": "cnn", "filters": 8, "batch_size": 16})
    custom = hypermodel.custom_model(hypermodel.load("tests.hypermodels.kt_docs:MyHyperModel"), hp)
    logs: list[dict] = []
    result = train.train(TrainConfig(), splits, epochs=2, seed=0,
                         callbacks=[train.Observer(on_epoch_end=lambda e, l: logs.append(dict(l)))],
                         options=train.TrainOptions(custom=custom))
    assert {"accuracy", "learning_rate", "loss", "val_accuracy", "val_loss"} <= set(logs[0])
    assert result.y_prob.shape == (20, 10) and len(result.history["loss"]) == 2
    convs = [layer for layer in result.model.layers[-1].layers if type(layer).__name__ == "Conv2D"]
    assert [conv.filters for conv in convs] == [8]  # built from the given values
    again = train.train(TrainConfig(), splits, epochs=2, seed=0, options=train.TrainOptions(custom=custom))
    for key in ("loss", "val_loss", "val_accuracy"):
        assert again.history[key] == result.history[key]  # same seed, same numbers


@pytest.mark.slow
@pytest.mark.keras
def test_a_documentation_hypermodel_runs_as_a_sweep_and_reruns_bit_for_bit(isolated: Path, cifar_slice: Path) -> None:
    shutil.copy(ROOT / "tests" / "sweeps" / "kt_docs.yaml", isolated / "kt_docs.yaml")
    env = clean_env(PYTHONPATH=str(ROOT))  # the hypermodel's module is importable, as a user's would be
    command = [sys.executable, "-m", "cifar_exp.sweep", "kt_docs.yaml", "--data", str(cifar_slice)]
    result = subprocess.run(command, cwd=isolated, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    trials = study(isolated, "kt_docs").get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    parents, children = runs(isolated, "kt_docs")  # (points MLflow at the sweep's store)
    assert len(parents) == 1 and len(children) == 2
    client = MlflowClient()
    for trial in trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert {"num_layers", "units_0", "activation", "dropout", "lr"} <= set(trial.params)
        for name, value in trial.params.items():  # every hp.* value is an MLflow param of the same name
            assert run.data.params[name] == str(value)
        assert "blocks" not in run.data.params  # TrainConfig's CNN does not apply
        assert {"val_accuracy", "learning_rate", "test_accuracy"} <= set(run.data.metrics)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"hyperparameters.json", "confusion_matrix.png"} <= artifacts
        assert run.data.tags["model_uri"].startswith("models:/")
        path = client.download_artifacts(run.info.run_id, "hyperparameters.json", str(isolated))
        assert json.loads(Path(path).read_text()) == trial.params  # typed, for reruns
        assert run.data.metrics["learning_rate"] == pytest.approx(trial.params["lr"], rel=1e-6)

    rerun = subprocess.run([sys.executable, "-m", "cifar_exp", "rerun", "kt_docs", "--trial", "1", "--data",
                            str(cifar_slice)], cwd=isolated, capture_output=True, text=True, timeout=900, env=env)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "bit for bit" in rerun.stdout
