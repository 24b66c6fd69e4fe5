"""Reproducibility: seeds, sampling order, determinism settings, and reruns compared value by value.

Fast tests build the pieces from synthetic records; the slow ones run the real sweep and rerun
commands on a slice of the CIFAR-10 (JPEG copy) and read the results back through MLflow.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cifar_exp import lifecycle, rerun, track
from cifar_exp.config import ConfigError, TrainConfig
from cifar_exp.config.records import trial_seed
from cifar_exp.config.sweepfile import load_sweep
from cifar_exp.sweep.storage import Claim, Settings, claim, create_study, open_storage
from cifar_exp.training import backend
from tests.test_sweep import clean_env, run_sweep, runs, study

# ---------------------------------------------------------------------------------------------
# Fast: sampling order, seeds, determinism switches, comparison


def sample(storage_path: Path, seed: int, trials: int = 12) -> list[dict]:
    """Run ``trials`` trials of lr_dropout's space through ``ask`` on a real journal file, each
    told a value computed from its params (so TPE, past its 10 random start-up trials, learns)."""
    sweep = load_sweep("lr_dropout")
    sweep = dataclasses.replace(sweep, sampler=dataclasses.replace(sweep.sampler, seed=seed))
    settings = Settings(sweep=sweep, storage=str(storage_path), tracking_uri="unused")
    create_study(settings)
    storage = open_storage(str(storage_path))
    sampled = []
    for _ in range(trials):
        claimed = claim(settings, storage)
        assert isinstance(claimed, Claim)
        study, trial, params = claimed.study, claimed.trial, claimed.params
        study.tell(trial, params["dropout"] - abs(params["learning_rate"] - 0.01))
        sampled.append(params)
    return sampled


def test_same_seed_samples_the_same_params_in_the_same_order(isolated: Path) -> None:
    first = sample(isolated / "a.journal", seed=3)
    assert sample(isolated / "b.journal", seed=3) == first
    assert sample(isolated / "c.journal", seed=4) != first


def test_a_quick_look_blocks_the_full_sweep_only_until_it_gets_its_own_study_name(isolated: Path) -> None:
    """The refusal names the setting in words and the way out; ``--study`` is that way out."""
    quick = load_sweep("lr_dropout")
    quick = dataclasses.replace(quick, data=dataclasses.replace(quick.data, train_images=5000))
    create_study(Settings(sweep=quick, storage=str(isolated / "s.journal"), tracking_uri="unused"))
    full = Settings(sweep=load_sweep("lr_dropout"), storage=str(isolated / "s.journal"), tracking_uri="unused")
    with pytest.raises(ConfigError) as refused:
        create_study(full)
    assert "was started with train_images 5000, not all images: its trials would not be comparable. To resume " \
           "it, pass --train-images 5000; to start a new study beside it, pass --study NEW_NAME" in str(refused.value)
    other = dataclasses.replace(full, sweep=load_sweep("lr_dropout", study="lr_dropout-full"))
    assert create_study(other).study_name == "lr_dropout-full"


@pytest.mark.parametrize("change, fragment", [
    (lambda s: dict(sampler=dataclasses.replace(s.sampler, seed=9)), "sweep_seed 0, not 9: its trials would not "
                                                                       "be comparable. To resume it, pass --seed 0"),
    (lambda s: dict(epochs=3), "epochs 20, not 3: its trials would not be comparable. To resume it, pass --epochs 20"),
    (lambda s: dict(data=dataclasses.replace(s.data, train_images=5000)),
     "train_images all images, not 5000: its trials would not be comparable. To resume it, drop --train-images"),
    (lambda s: dict(data=dataclasses.replace(s.data, validation_fraction=0.2)), "validation_fraction 0.1, not 0.2"),
    (lambda s: dict(fixed={**s.fixed, "batch_size": 64}), "searched_sha256"),
    ("checksum-b", "data_checksum checksum-a, not checksum-b: its trials would not be comparable. To resume it, "
                   "pass the --data it started with"),
])
def test_resuming_a_study_with_other_data_epochs_subset_split_seed_or_space_is_refused(
        isolated: Path, change, fragment: str) -> None:
    sweep = load_sweep("lr_dropout")
    settings = Settings(sweep=sweep, storage=str(isolated / "s.journal"), tracking_uri="unused",
                        data_checksum="checksum-a")
    create_study(settings)
    other = dataclasses.replace(settings, data_checksum=change) if isinstance(change, str) else \
        dataclasses.replace(settings, sweep=dataclasses.replace(sweep, **change(sweep)))
    with pytest.raises(ConfigError, match="was started with") as refused:
        create_study(other)
    assert fragment in str(refused.value) and "start a new study" in str(refused.value)
    assert create_study(settings).user_attrs["sweep_seed"] == 0


def test_resuming_with_another_budget_or_description_is_allowed(isolated: Path) -> None:
    sweep = load_sweep("lr_dropout")
    settings = Settings(sweep=sweep, storage=str(isolated / "s.journal"), tracking_uri="unused",
                        data_checksum="checksum-a")
    create_study(settings)
    create_study(dataclasses.replace(settings, sweep=dataclasses.replace(
        sweep, trials=80, timeout=600.0, description="more", pruner=dataclasses.replace(sweep.pruner, name="none"))))
    assert create_study(settings).user_attrs["epochs"] == 20


def test_determinism_env_adds_the_xla_flag_once() -> None:
    env = backend.determinism_env(True, {"XLA_FLAGS": "--xla_dump_to=/tmp/x"})
    assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_gpu_deterministic_ops=true"
    assert "XLA_FLAGS" not in backend.determinism_env(True, env)
    assert backend.determinism_env(False, {}) == {}


@pytest.mark.keras
def test_identity_names_backend_versions_and_device() -> None:
    import keras

    identity = backend.identity()
    assert set(identity) == set(backend.IDENTITY_TAGS)
    assert identity["keras_backend"] == keras.backend.backend() and identity["keras_version"] == keras.__version__
    if keras.backend.backend() == "jax":
        import jax

        accelerated = any(d.platform != "cpu" for d in jax.devices())
    else:
        import tensorflow as tf

        accelerated = bool(tf.config.list_physical_devices("GPU"))
    assert identity["device"].startswith("gpu: " if accelerated else "cpu: ")  # what this process trains on


def original(history: dict[str, list[float]], state: str = "COMPLETE", test: dict | None = None,
             fail_reason: str = "") -> rerun.Original:
    tags = {"state": state, "trial_number": "1", **({"fail_reason": fail_reason} if fail_reason else {})}
    run = track.RunRecord("r1", "1", "trial-1", "FINISHED", {}, tags, {})
    sweep = load_sweep("lr_dropout")
    return rerun.Original(run, sweep, TrainConfig(), lifecycle.recipe(sweep, 5, sweep.epochs, {}, ""), history,
                          test or {})


HISTORY = {"loss": [2.3, 2.1], "val_accuracy": [0.1, 0.25], "learning_rate": [0.01, 0.001]}


def test_identical_values_match_at_tolerance_zero() -> None:
    outcome = rerun.Outcome("r2", {k: list(v) for k, v in HISTORY.items()}, {"test_accuracy": 0.3})
    comparison = rerun.compare(original(HISTORY, test={"test_accuracy": 0.3}), outcome, 0.0)
    assert comparison.matched and comparison.max_abs_diff == 0 and len(comparison.values()) == 7
    assert comparison.metrics == ("loss", "val_accuracy", "learning_rate")  # Keras' order


def test_a_difference_in_the_last_bit_fails_at_zero_and_passes_a_tolerance() -> None:
    changed = {**HISTORY, "loss": [2.3, 2.1000000000000001 + 4e-16]}
    outcome = rerun.Outcome("r2", changed, {})
    assert not rerun.compare(original(HISTORY), outcome, 0.0).matched
    assert rerun.compare(original(HISTORY), outcome, 0.0).mismatches == 1
    assert rerun.compare(original(HISTORY), outcome, 1e-12).matched


def test_missing_epochs_and_new_failures_do_not_match() -> None:
    short = rerun.Outcome("r2", {k: v[:1] for k, v in HISTORY.items()}, {}, error="Diverged: loss is nan")
    comparison = rerun.compare(original(HISTORY), short, 1.0)
    assert comparison.mismatches == 3 and "the rerun failed (Diverged: loss is nan)" in comparison.failure
    same_failure = rerun.compare(original(HISTORY, "FAIL", fail_reason="Diverged: loss is nan at epoch 2"),
                                     dataclasses.replace(short, history=HISTORY), 0.0)
    assert same_failure.matched


def test_pruned_trial_compares_only_its_logged_epochs() -> None:
    pruned = original({k: v[:1] for k, v in HISTORY.items()}, state="PRUNED")
    comparison = rerun.compare(pruned, rerun.Outcome("r2", {k: v[:1] for k, v in HISTORY.items()}, {}), 0)
    assert comparison.matched and len(comparison.epochs) == 1


# ---------------------------------------------------------------------------------------------
# Bad input to the rerun command: one line, exit 2, nothing written


def rerun_command(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cifar_exp", "rerun", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=900, env=clean_env())


@pytest.mark.parametrize("args, fragment", [
    (["0123456789abcdef0123456789abcdef"], "no MLflow store at mlruns/mlflow.db: run a sweep first"),
    (["lr_dropout", "--trial", "0", "--tracking-uri", "sqlite:///store.db"],
     "no Optuna storage at mlruns/optuna.journal"),
    (["x", "--tolerance", "-1"], "--tolerance must be 0 or more"),
    (["x", "--trial", "one"], "argument --trial: invalid int value"),
])
def test_rerun_bad_input_is_one_line_exit_2(isolated: Path, args: list[str], fragment: str) -> None:
    (isolated / "store.db").touch()  # a store file, for the --tracking-uri case
    before = set(isolated.rglob("*"))
    result = rerun_command(*args, cwd=isolated)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert set(isolated.rglob("*")) <= before


def test_rerun_of_an_unknown_study_or_trial_names_what_exists(isolated: Path) -> None:
    (isolated / "mlruns").mkdir()
    (isolated / "mlruns" / "mlflow.db").touch()
    sample(isolated / "mlruns" / "optuna.journal", seed=0, trials=2)
    result = rerun_command("lr_droput", "--trial", "0", cwd=isolated)
    assert result.returncode == 2 and "no study 'lr_droput' in mlruns/optuna.journal (studies: lr_dropout)" \
        in result.stderr
    result = rerun_command("lr_dropout", "--trial", "5", cwd=isolated)
    assert result.returncode == 2 and "study 'lr_dropout' has no trial 5 (it has trials 0 to 1)" in result.stderr
    result = rerun_command("lr_dropout", "--trial", "1", cwd=isolated)  # sampled only: no MLflow run
    assert result.returncode == 2 and "trial 1 of study 'lr_dropout' has no MLflow run" in result.stderr


def test_rerun_of_an_unknown_run_names_it(isolated: Path) -> None:
    track.configure(f"sqlite:///{isolated}/mlruns/mlflow.db")
    result = rerun_command("0123456789abcdef0123456789abcdef", cwd=isolated)
    assert result.returncode == 2
    assert "no run '0123456789abcdef0123456789abcdef' in this MLflow store" in result.stderr


# ---------------------------------------------------------------------------------------------
# Slow: the real commands on the CIFAR-10 (JPEG copy) slice

EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate")
SWEEP = ("lr_dropout", "--trials", "2", "--epochs", "2", "--seed", "7")


@pytest.fixture(scope="module")
def seeded_sweep(tmp_path_factory: pytest.TempPathFactory, cifar_slice: Path) -> Path:
    """A finished 2-trial, 2-epoch lr_dropout sweep (seed 7) on the slice, in its own folder."""
    folder = tmp_path_factory.mktemp("seeded")
    run_sweep(folder, *SWEEP, "--data", str(cifar_slice), env={"CIFAR_EXP_CACHE": str(folder / "cache")})
    return folder


def history(run_id: str) -> dict[str, list[float]]:
    return {key: track.metric_history(run_id, key) for key in EPOCH_METRICS}


@pytest.mark.slow
def test_rerun_reproduces_every_epoch_bit_for_bit(seeded_sweep: Path, cifar_slice: Path) -> None:
    # Trial 1 ran second in its worker process, on the program trial 0 compiled; the rerun runs
    # alone in a fresh process, on a program compiled for it.
    result = rerun_command("lr_dropout", "--trial", "1", "--data", str(cifar_slice), cwd=seeded_sweep)
    assert result.returncode == 0, result.stdout + result.stderr
    _, children = runs(seeded_sweep)
    trial_1 = study(seeded_sweep).trials[1].user_attrs["mlflow_run_id"]
    # 2 epochs x 5 per-epoch metrics (6 with a per-step schedule's learning_rate_last), test
    # loss/accuracy/macro F1, 30 per-class metrics, param_count
    values = 44 + 2 * ("learning_rate_last" in MlflowClient().get_run(trial_1).data.metrics)
    assert f"identical: all {values} values match the original bit for bit" in result.stdout, result.stdout
    assert "differs from the original" not in result.stdout  # same machine, versions, mode

    (again,) = [r for r in MlflowClient().search_runs([children[0].info.experiment_id])
                if r.data.tags.get("rerun_of") == trial_1]
    assert again.info.status == "FINISHED" and again.data.tags["rerun_match"] == "true"
    assert (MlflowClient().get_run(trial_1).data.tags["compiled"], again.data.tags["compiled"]) == ("reused", "new")
    assert again.data.params == MlflowClient().get_run(trial_1).data.params
    original_history = history(trial_1)
    assert all(len(v) == 2 for v in original_history.values())
    assert history(again.info.run_id) == original_history
    original_metrics = MlflowClient().get_run(trial_1).data.metrics
    assert again.data.metrics["test_accuracy"] == original_metrics["test_accuracy"]
    assert again.data.metrics["test_loss"] == original_metrics["test_loss"]


@pytest.mark.slow
def test_rerun_with_changed_data_is_refused_naming_the_checksum(seeded_sweep: Path, cifar_slice: Path) -> None:
    changed = seeded_sweep / "changed.zip"
    with zipfile.ZipFile(cifar_slice) as source, zipfile.ZipFile(changed, "w") as target:
        names = source.namelist()
        for name in names[:-1]:  # one training image fewer
            target.writestr(name, source.read(name))
    trial_0 = study(seeded_sweep).trials[0].user_attrs["mlflow_run_id"]
    before = len(runs(seeded_sweep)[1])
    result = rerun_command(trial_0, "--data", str(changed), cwd=seeded_sweep)
    assert result.returncode == 2, result.stdout + result.stderr
    original_checksum = MlflowClient().get_run(trial_0).data.tags["data_checksum"]
    line = result.stderr.strip()
    assert "\n" not in line and "data checksum differs" in line and original_checksum in line
    assert len(runs(seeded_sweep)[1]) == before  # nothing logged


@pytest.mark.slow
def test_sequential_sweeps_with_the_same_seed_repeat_params_and_numbers(
        seeded_sweep: Path, cifar_slice: Path, tmp_path: Path) -> None:
    run_sweep(tmp_path, *SWEEP, "--data", str(cifar_slice))
    first, second = study(seeded_sweep).trials, study(tmp_path).trials
    assert [t.params for t in second] == [t.params for t in first]
    assert [t.value for t in second] == [t.value for t in first]  # deterministic training too
    # --seed 7 reached the trials (their seeds) and the sampler: the command drew what the sampler
    # seeded 7 draws (another seed draws other parameters: the fast test above)
    assert [t.user_attrs["seed"] for t in second] == [t.user_attrs["seed"] for t in first] == \
        [trial_seed(7, n) for n in range(2)]
    assert [t.params for t in first] == sample(tmp_path / "seed-7.journal", seed=7, trials=2)
