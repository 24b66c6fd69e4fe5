"""A champion to trust: the best epoch kept, confirmed over seeds with a stated rule, per-class
recall on the version, and a store bounded by ``gc``; on stubs, then on a real MLflow store and
the CIFAR-10 (JPEG copy)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from cifar_exp.config import ConfigError, outcomes
from cifar_exp.config.goals import Objective
from cifar_exp.config.records import TrialAttrs
from cifar_exp.config.sweepfile import parse_sweep
from cifar_exp.registry import confirm
from cifar_exp.track import collect
from tests.conftest import ROOT, in_process, write_slice
from tests.test_shipped import sweep_in_process
from tests.test_sweep import clean_env

SWEEP = ROOT / "tests" / "sweeps" / "champion.yaml"
NAME = "cifar10-champion"
MAX = (Objective("val_accuracy", "maximize"),)

# ---------------------------------------------------------------------------------------------
# Fast


def test_a_lucky_single_seed_is_refused_and_a_real_gain_promoted() -> None:
    # The challenger's best seed (0.53) beats every seed of the champion, but its seeds overlap the
    # champion's: the mean's lead is inside the noise.
    promoted, p = confirm.decide([0.50, 0.53], [0.51, 0.515], "maximize")
    assert not promoted and p > confirm.ALPHA
    promoted, p = confirm.decide([0.60, 0.61, 0.605], [0.50, 0.51, 0.505], "maximize")
    assert promoted and p < 0.01
    assert confirm.decide([0.9, 0.91, 0.905], [1.0, 1.01, 1.005], "minimize")[0]  # a loss: lower wins
    assert not confirm.decide([0.60, 0.61, 0.605], [0.50, 0.51, 0.505], "minimize")[0]


def test_without_spread_a_better_mean_is_enough() -> None:
    assert confirm.decide([0.5, 0.5], [0.4, 0.4], "maximize") == (True, 0.0)
    assert confirm.decide([0.4, 0.4], [0.4, 0.4], "maximize") == (False, 1.0)


def test_confirmation_seeds_are_fixed_by_the_trial_seed_and_distinct() -> None:
    assert confirm.seeds_for(7, 3) == confirm.seeds_for(7, 3)
    assert len(set(confirm.seeds_for(7, 5) + confirm.seeds_for(8, 5))) == 10
    assert all(0 <= s < 2**31 for s in confirm.seeds_for(7, 5))


def stub(number: int, value: float | None, state: str = "COMPLETE", model: bool = True, **attrs: Any) -> Any:
    user_attrs = TrialAttrs.encode(mlflow_run_id=f"run{number}", **({"model_uri": f"models:/m-{number}"}
                                                                     if model else {}), **attrs)
    return SimpleNamespace(number=number, state=SimpleNamespace(name=state), values=None if value is None else [value],
                           constraints={}, user_attrs=user_attrs, params={})


def test_gc_keeps_the_best_and_the_registered_and_never_a_running_trial() -> None:
    trials = [stub(0, 0.30), stub(1, 0.50), stub(2, 0.40), stub(3, None, "PRUNED"), stub(4, None, "RUNNING"),
              stub(5, 0.45), stub(6, 0.20, model=False), stub(7, 0.35)]
    plan = collect.plan(trials, MAX, 2, collected={7}, registered_runs={"run0"}, registered_models={"m-2"})
    assert plan.kept == [1, 5]  # the 2 best
    assert plan.registered == [0, 2]  # by run and by logged model
    assert plan.delete == [(3, "models:/m-3")]  # the pruned trial's model; 4 runs, 6 has none, 7 is gone


def test_candidates_follow_the_ranking_or_the_rule() -> None:
    from cifar_exp.config import UserError

    sweep = parse_sweep("s", "space: {learning_rate: {type: float, low: 0.001, high: 0.1}}\n", Path("s.yaml"))
    trials = [stub(0, 0.3), stub(1, 0.5, test_accuracy=0.55), stub(2, 0.4), stub(3, 0.6, model=False)]
    assert [t.number for t in confirm.candidates(trials, sweep, None, 2)] == [1, 2]  # 3 has no model
    # a rule admits front members only: with one objective, the best trial
    assert [t.number for t in confirm.candidates(trials, sweep, outcomes.Rule.parse("val_accuracy"), 3)] == [1]
    with pytest.raises(UserError, match="loosen --where"):
        confirm.candidates(trials, sweep, outcomes.Rule.parse("val_accuracy", ["test_accuracy>=0.6"]), 3)


@pytest.mark.parametrize("text, fragment", [
    ("confirm_seeds: 1\n", "confirm_seeds: 1 seed has no spread"),
    ("keep_models: 0\n", "keep_models: 0 is out of range"),
    ("model_epoch: worst\n", "model_epoch"),
])
def test_bad_champion_settings_are_one_line_errors(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        parse_sweep("s", "space: {learning_rate: {type: float, low: 0.001, high: 0.1}}\n" + text, Path("s.yaml"))


def test_bad_seeds_and_a_gc_without_a_count_exit_2(isolated: Path) -> None:
    for argv, fragment in ((["register", str(SWEEP), "--seeds", "1"], "--seeds 1: one seed has no spread"),
                           (["register", str(SWEEP), "--seeds", "2", "--data", "x.zip"], "drop --data"),
                           (["gc", str(SWEEP)], "give --keep K"),
                           (["register", str(SWEEP), "--pick", ""], "--pick : not a metric"),  # not the default
                           (["register", str(SWEEP), "--where", "latency_ms<=1e"], "write METRIC<=NUMBER")):
        code, out, err = in_process(isolated, *argv)
        assert code == 2 and out == "", err
        (line,) = err.strip().splitlines()
        assert fragment in line, line


# ---------------------------------------------------------------------------------------------
# Slow: one study on the CIFAR-10 (JPEG copy), registered with --seeds 2, then collected


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("champion")
    data = write_slice(folder / "slice.zip", 100, 10)
    env = {"CIFAR_EXP_CACHE": str(folder / "cache")}
    with mock.patch.dict(os.environ, env):
        sweep_in_process(folder, SWEEP, trials=3, epochs=3, data=data)
    found = {"folder": folder, "data": data, "env": env, "uri": f"sqlite:///{folder}/mlruns/mlflow.db",
             "storage": str(folder / "mlruns" / "optuna.journal")}
    code, found["register"], err = in_process(folder, "register", str(SWEEP), "--seeds", "2", "--storage",
                                              found["storage"], "--tracking-uri", found["uri"], env=env)
    assert code == 0, err
    return found


def trials(found: dict) -> list[Any]:
    import optuna

    from cifar_exp.sweep.storage import open_storage

    return optuna.load_study(study_name="champion", storage=open_storage(found["storage"])).get_trials()


def client(found: dict) -> MlflowClient:
    mlflow.set_tracking_uri(found["uri"])
    return MlflowClient()


@pytest.mark.slow
def test_every_trial_keeps_its_best_epoch_and_logs_that_epochs_test_metrics(study: dict) -> None:
    from cifar_exp import registry, track
    from cifar_exp.data import load
    from cifar_exp.training.best import chosen_epoch

    c = client(study)
    test = load(str(study["data"]))
    for trial in trials(study):
        attrs = TrialAttrs.of(trial)
        run = c.get_run(str(attrs.mlflow_run_id))
        history = {"val_accuracy": track.metric_history(run.info.run_id, "val_accuracy")}
        kept = chosen_epoch(history, "val_accuracy", "maximize")
        assert len(history["val_accuracy"]) == 3  # every epoch trained
        assert run.data.tags["model_epoch"] == str(kept + 1) == str(attrs.model_epoch)
        assert run.data.tags["feed"] == "fit"  # on the CPU (training.feed.choose)
        assert trial.values[0] == history["val_accuracy"][kept]  # the objective is the kept epoch's
        # the logged model is that epoch's: its predictions give the logged test accuracy
        assert registry.accuracy(str(attrs.model_uri), test) == run.data.metrics["test_accuracy"]


@pytest.mark.slow
def test_register_with_seeds_logs_confirmation_runs_with_mean_and_spread(study: dict) -> None:
    c = client(study)
    out = study["register"]
    assert "first champion of cifar10-champion" in out and "over 2 confirmation seeds" in out, out
    version = c.get_model_version_by_alias(NAME, "champion")
    values = json.loads(version.tags[confirm.VALUES_TAG])
    assert len(values) == 2 and float(version.tags["val_accuracy_mean"]) == pytest.approx(np.mean(values))
    assert float(version.tags["val_accuracy_std"]) == pytest.approx(np.std(values, ddof=1))
    assert "Per seed: seed " in version.description and confirm.RULE in version.description
    assert "Per-class test recall" in version.description and "cat " in version.description
    experiment = c.get_experiment_by_name("champion").experiment_id
    confirmations = c.search_runs([experiment], "tags.confirmation != ''")
    assert len(confirmations) == 4  # 2 candidates x 2 seeds
    parent = {t.user_attrs.get("mlflow_run_id") for t in trials(study)}
    for run in confirmations:
        assert run.info.status == "FINISHED" and run.data.tags["confirmation"] in parent
        assert run.data.tags["mlflow.parentRunId"] == c.get_run(version.run_id).data.tags["mlflow.parentRunId"]
        assert 0.0 <= run.data.metrics["test_accuracy"] <= 1.0
    mine = [r for r in confirmations if r.data.tags["confirmation"] == version.run_id]
    assert sorted(r.data.metrics["val_accuracy"] for r in mine) != [] and len(mine) == 2
    recall = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=version.run_id, artifact_path="confirmation/per_class_recall.json",
        dst_path=str(study["folder"] / "dl"))).read_text())
    assert len(recall) == 10 and all(len(r["seeds"]) == 2 for r in recall.values())
    for name, row in recall.items():  # the mean of each class's recall over the two confirmation runs
        assert row["mean"] == pytest.approx(np.mean([r.data.metrics[f"test_recall_{name}"] for r in mine]))


@pytest.mark.slow
def test_gc_keeps_one_model_and_the_registered_one_and_predict_still_works(study: dict) -> None:
    c = client(study)
    champion_run = c.get_model_version_by_alias(NAME, "champion").run_id
    done = trials(study)
    best = max((t for t in done if t.values), key=lambda t: t.values[0])
    models_dir = {t.number: c.get_logged_model(TrialAttrs.of(t).model_uri.removeprefix("models:/")).artifact_location
                  for t in done}
    sizes = {n: sum(f.stat().st_size for f in Path(loc.removeprefix("file://")).rglob("*") if f.is_file())
             for n, loc in models_dir.items()}
    # gc against a register: while a register holds the study's models (the lock it holds from
    # choosing a trial to registering it, taken here as register takes it), gc deletes nothing
    # and waits; it goes on when the register is done. A forced interleaving: no sleep decides it.
    from cifar_exp.sweep import storage

    with storage.models_lock(study["storage"], storage.open_storage(study["storage"]), "champion", shared=True):
        gc = subprocess.Popen([sys.executable, "-m", "cifar_exp", "gc", str(SWEEP), "--keep", "1", "--storage",
                               study["storage"], "--tracking-uri", study["uri"]], cwd=study["folder"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**clean_env(), **study["env"]})
        assert gc.stdout is not None
        assert gc.stdout.readline() == "waiting for a register of champion to finish\n"
        assert gc.poll() is None and all(Path(loc.removeprefix("file://")).is_dir() for loc in models_dir.values())
    out, err = gc.communicate(timeout=300)
    assert gc.returncode == 0, err
    kept = {best.number} | {t.number for t in done if TrialAttrs.of(t).mlflow_run_id == champion_run}
    deleted = sorted(set(sizes) - kept)
    assert f"{sum(sizes[n] for n in deleted):,} bytes freed" in out, out
    for t in done:
        model_id = TrialAttrs.of(t).model_uri.removeprefix("models:/")
        if t.number in kept:
            c.get_logged_model(model_id)
            assert Path(models_dir[t.number].removeprefix("file://")).is_dir()
        else:
            with pytest.raises(mlflow.exceptions.MlflowException):
                c.get_logged_model(model_id)
            assert not Path(models_dir[t.number].removeprefix("file://")).parent.exists()  # no empty folder left
    # the champion still predicts; compare and the report say which trials lost their model
    Image.new("RGB", (32, 32), (200, 30, 30)).save(study["folder"] / "red.png")
    code, out, err = in_process(study["folder"], "predict", str(study["folder"] / "red.png"), "--model",
                                f"models:/{NAME}@champion", "--tracking-uri", study["uri"], env=study["env"])
    assert code == 0 and "probability" in out, err
    code, out, err = in_process(study["folder"], "compare", str(SWEEP), "--top", "3", "--storage", study["storage"],
                                "--tracking-uri", study["uri"], "--out", str(study["folder"] / "top.png"),
                                env=study["env"])
    assert code == 0, err
    assert deleted and "no model any more (deleted by gc" in out and str(deleted[0]) in out.splitlines()[-2], out
    code, out, err = in_process(study["folder"], "report", str(SWEEP), "--storage", study["storage"],
                                "--tracking-uri", study["uri"], env=study["env"])
    assert code == 0, err
    again = in_process(study["folder"], "gc", str(SWEEP), "--keep", "1", "--storage", study["storage"],
                       "--tracking-uri", study["uri"], env=study["env"])
    assert again[0] == 0 and "nothing to delete" in again[1], again


@pytest.mark.slow
def test_a_killed_register_seeds_leaves_no_run_running_and_register_waits_for_gc(study: dict) -> None:
    """A register --seeds killed mid-confirmation left its runs RUNNING for good: the next
    register ends them as KILLED (its process is gone, on this host). That register waits while
    gc holds the study's models (the lock taken here as gc takes it), then goes on."""
    from cifar_exp.sweep import storage

    c = client(study)
    experiment = c.get_experiment_by_name("champion").experiment_id
    env = {**clean_env(), **study["env"]}
    stores = ["--storage", study["storage"], "--tracking-uri", study["uri"]]
    killed = subprocess.Popen([sys.executable, "-m", "cifar_exp", "register", str(SWEEP), "--seeds", "2", *stores],
                              cwd=study["folder"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 300
    mine = f"tags.confirmation_pid = '{killed.pid}' and attributes.status = 'RUNNING'"
    while not (running := c.search_runs([experiment], mine)):  # a confirmation run of its own is training
        assert killed.poll() is None and time.monotonic() < deadline, "no confirmation run started"
        time.sleep(0.2)
    killed.kill()
    killed.wait()
    (left,) = running
    assert c.get_run(left.info.run_id).info.status == "RUNNING"
    with storage.models_lock(study["storage"], storage.open_storage(study["storage"]), "champion", shared=False):
        register = subprocess.Popen([sys.executable, "-m", "cifar_exp", "register", str(SWEEP), *stores],
                                    cwd=study["folder"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env=env)
        assert register.stdout is not None
        closed_line = "closed 1 confirmation run(s) a killed register left RUNNING (now KILLED)\n"
        assert register.stdout.readline() == closed_line
        assert register.stdout.readline() == "waiting for gc champion to finish\n"
        assert register.poll() is None
    out, err = register.communicate(timeout=300)
    assert register.returncode == 0 and "registered" in out, err
    closed = c.get_run(left.info.run_id)
    assert closed.info.status == "KILLED" and "register --seeds" in closed.data.tags["fail_reason"]
    assert not c.search_runs([experiment], "tags.confirmation != '' and attributes.status = 'RUNNING'")


@pytest.mark.slow
def test_a_chosen_trial_whose_model_is_gone_is_one_line_and_leaves_no_empty_registered_model(study: dict) -> None:
    c = client(study)
    best = max((t for t in trials(study) if t.values), key=lambda t: t.values[0])
    c.delete_logged_model(TrialAttrs.of(best).model_uri.removeprefix("models:/"))  # by hand, past gc
    other = study["folder"] / "other"
    other.mkdir()
    (other / "champion.yaml").write_text(SWEEP.read_text().replace(f"registered_model: {NAME}",
                                                                   "registered_model: cifar10-gone"))
    for seeds in ("0", "2"):
        code, out, err = in_process(study["folder"], "register", str(other / "champion.yaml"), "--seeds", seeds,
                                    "--storage", study["storage"], "--tracking-uri", study["uri"], env=study["env"])
        assert code == 2 and err.strip() == (
            f"error: trial {best.number}'s model ({TrialAttrs.of(best).model_uri}) is gone (deleted by gc, or by "
            f"hand): nothing was registered; register another trial (--pick, --where), or rerun this one"), err
        assert c.search_registered_models("name = 'cifar10-gone'") == []
    assert not c.search_runs([c.get_experiment_by_name("champion").experiment_id],
                             "tags.confirmation != '' and attributes.status = 'RUNNING'")
