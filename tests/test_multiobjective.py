"""A multi-objective, constrained sweep end to end on a slice of the real CIFAR-10 (JPEG copy):
the sweep command runs it (accuracy against measured latency, a parameter budget), the trial
that breaks the budget is never trained, pruning hears the first objective's curve, the front
is drawn and printed, and ``register --pick/--where`` registers a feasible front member."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow.tracking import MlflowClient

from cifar_exp.config import outcomes
from cifar_exp.config.records import TrialAttrs
from cifar_exp.config.sweepfile import load_sweep
from tests.conftest import ROOT, in_process
from tests.test_sweep import run_sweep, runs, study

pytestmark = pytest.mark.slow


def test_a_two_objective_constrained_sweep_runs_prunes_draws_and_registers(isolated: Path,
                                                                           cifar_slice: Path) -> None:
    path = isolated / "multi.yaml"
    shutil.copy(ROOT / "tests" / "sweeps" / "multi.yaml", path)
    out = run_sweep(isolated, str(path), "--data", str(cifar_slice)).stdout
    found = study(isolated, "multi")
    assert [d.name for d in found.directions] == ["MAXIMIZE", "MINIMIZE"]
    trials = found.get_trials()
    assert len(trials) == 5
    infeasible = [t for t in trials if TrialAttrs.of(t).infeasible]
    trained = [t for t in trials if not TrialAttrs.of(t).infeasible]
    assert len(infeasible) == 1 and len(trained) == 4  # the sampler's seed draws filters 64 once
    assert "1 trial(s) broke a constraint before training and were not trained" in out

    # The trial over the parameter budget: never trained, its constraint set for the sampler.
    (over,) = infeasible
    assert over.params["filters"] == 64 and over.state.name == "PRUNED"
    assert over.constraints["param_count"] == 165_834 - 100_000
    assert TrialAttrs.of(over).epochs_run == 0 and TrialAttrs.of(over).param_count == 165_834
    _, children = runs(isolated, "multi")
    by_number = {int(r.data.tags["trial_number"]): r for r in children}
    untrained = by_number[over.number]
    assert untrained.data.tags["infeasible"] == "param_count 165834, not <= 100000"
    assert "val_accuracy" not in untrained.data.metrics and untrained.data.tags["state"] == "PRUNED"

    # Trained trials: told both objectives, latency measured and logged, feasible.
    client = MlflowClient(f"sqlite:///{isolated}/mlruns/mlflow.db")
    companion = {t.user_attrs["trial_number"]: t for t in optuna.load_study(
        study_name="multi.pruning", storage=found._storage).get_trials()}
    for trial in trained:
        run = by_number[trial.number]
        curve = [m.value for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
        if trial.state.name == "COMPLETE":  # told the epoch it kept (model_epoch, from 1)
            assert trial.values[0] == curve[int(run.data.tags["model_epoch"]) - 1] == max(curve)
            assert trial.values[1] == pytest.approx(run.data.metrics["latency_ms"]) and trial.values[1] > 0
            assert run.data.metrics["throughput"] > 0 and outcomes.feasible(trial)
        # pruning heard the first objective, epoch by epoch, in the companion study
        assert [companion[trial.number].intermediate_values[s] for s in sorted(
            companion[trial.number].intermediate_values)] == curve

    # The front: in the terminal's table (marked), the trials table and a plot in the parent run.
    front = outcomes.front(trials, load_sweep(str(path)).objectives)
    assert front and all(t.state.name == "COMPLETE" for t in front)
    header = next(line for line in out.splitlines() if line.split()[:3] == ["rank", "trial", "front"])
    assert header.split()[3:5] == ["val_accuracy", "latency_ms"]
    parents, _ = runs(isolated, "multi")
    folder = Path(mlflow.artifacts.download_artifacts(run_id=parents[0].info.run_id, dst_path=str(isolated / "p")))
    assert (folder / "pareto_front.png").stat().st_size > 10_000
    rows = list(csv.DictReader((folder / "trials.csv").open()))
    assert {int(r["number"]) for r in rows if r["front"] == "True"} == {t.number for t in front}
    assert {r["feasible"] for r in rows if int(r["number"]) == over.number} == {"False"}

    # register by a rule: the most accurate front member at most as slow as the front's slowest
    slowest = round(max(t.values[1] for t in front) + 0.001, 3)  # rounded up: the slowest meets it
    uri, storage = f"sqlite:///{isolated}/mlruns/mlflow.db", str(isolated / "mlruns" / "optuna.journal")
    code, printed, err = in_process(isolated, "register", str(path), "--data", str(cifar_slice), "--storage", storage,
                                    "--tracking-uri", uri, "--pick", "val_accuracy",
                                    "--where", f"latency_ms<={slowest}")
    assert code == 0, err
    rule = f"best val_accuracy on the Pareto front where latency_ms<={slowest}"
    assert f"chosen by the rule: {rule}" in printed
    chosen = max(front, key=lambda t: (t.values[0], -t.number))
    version = client.get_model_version("cifar10-multi", "1")
    assert version.tags["trial"] == str(chosen.number) and f"Chosen by the rule: {rule}." in version.description
    code, _, err = in_process(isolated, "register", str(path), "--storage", storage, "--tracking-uri", uri,
                              "--where", "latency_ms<=0.000001")
    assert code == 2 and "no trial on the Pareto front meets the rule" in err
