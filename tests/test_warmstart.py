"""Warm starts: a study begins with another study's best settings (``warm_start``,
``--warm-start``) and the file's own (``enqueue``), once, counted in the budget. No training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from cifar_exp.config import ConfigError, Settings, UserError
from cifar_exp.config.records import TrialAttrs
from cifar_exp.config.sweepfile import parse_sweep
from cifar_exp.sweep import storage, warmstart
from tests.conftest import in_process

SPACE = """space:
  learning_rate: {type: float, low: 1.0e-4, high: 1.0e-1, log: true}
  dropout: {type: float, low: 0.0, high: 0.5}
trials: 6
"""


def parse(text: str, name: str = "target") -> Any:
    return parse_sweep(name, text, Path(f"sweeps/{name}.yaml"))


@pytest.mark.parametrize("text, fragment", [
    ("enqueue:\n  - {dropot: 0.1}\n", "enqueue[0] (space dimensions): unknown key 'dropot' (did you mean 'dropout'?)"),
    ("enqueue:\n  - {dropout: 0.9}\n", "enqueue[0].dropout: 0.9 is outside 0.0..0.5"),
    ("enqueue:\n  - {dropout: high}\n", "enqueue[0].dropout: expected a finite number"),
    ("enqueue: {dropout: 0.1}\n", "enqueue: expected a list"),
    ("warm_start: {sweep: target}\n", "warm_start.sweep: name another sweep's study"),
    ("warm_start: {sweep: other, top: 0}\n", "warm_start.top"),
])
def test_bad_warm_starts_are_one_line_config_errors(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(SPACE + text)
    assert "\n" not in str(info.value) and fragment in str(info.value)


def test_a_warm_start_enqueues_the_other_study_s_best_settings_once(tmp_path: Path) -> None:
    journal = str(tmp_path / "optuna.journal")
    opened = storage.open_storage(journal)
    source = optuna.create_study(study_name="source", storage=opened, direction="maximize")
    for lr, dropout, value in [(1e-3, 0.2, 0.70), (3e-3, 0.1, 0.80), (1e-2, 0.9, 0.75), (2e-3, 0.3, 0.60)]:
        source.add_trial(optuna.trial.create_trial(
            params={"learning_rate": lr, "dropout": dropout, "batch_size": 64}, value=value,
            distributions={"learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True),
                           "dropout": optuna.distributions.FloatDistribution(0.0, 0.9),
                           "batch_size": optuna.distributions.IntDistribution(32, 256)}))
    sweep = parse(SPACE + "warm_start: {sweep: source, top: 2}\nenqueue:\n  - {dropout: 0.05}\n")
    settings = Settings(sweep=sweep, storage=journal, tracking_uri="unused")
    study = storage.create_study(settings)
    lines = warmstart.seed(study, sweep)
    # the best two of the source: 0.80, then 0.75 (whose dropout 0.9 this space cannot take)
    assert lines == ["warm start from source trial 1: learning_rate=0.003 dropout=0.1; "
                     "dropped batch_size=64 (not in this space)",
                     "warm start from source trial 2: learning_rate=0.01; dropped dropout=0.9 (outside 0.0..0.5); "
                     "batch_size=64 (not in this space)",
                     "warm start from enqueue[0]: dropout=0.05"]
    assert warmstart.seed(study, sweep) == []  # once per study
    claimed = [storage.claim(settings, opened) for _ in range(4)]
    params = [c.params for c in claimed if not isinstance(c, str)]
    assert params[0] == {"learning_rate": 0.003, "dropout": 0.1}
    assert params[1]["learning_rate"] == 0.01 and 0.0 <= params[1]["dropout"] <= 0.5  # sampled afresh
    assert params[2]["dropout"] == 0.05
    sources = [TrialAttrs.of(c.trial).warm_start for c in claimed if not isinstance(c, str)]
    assert sources == ["source trial 1", "source trial 2", "enqueue[0]", None]
    # they are trials of the budget like any other
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    assert len(running) == 4 and storage.budget_state(sweep, running) == "open"


def test_a_warm_start_from_a_missing_study_names_the_studies(tmp_path: Path) -> None:
    journal = str(tmp_path / "optuna.journal")
    sweep = parse(SPACE + "warm_start: {sweep: nowhere}\n")
    study = storage.create_study(Settings(sweep=sweep, storage=journal, tracking_uri="unused"))
    with pytest.raises(UserError, match=r"warm_start: no study 'nowhere' in this storage \(studies: none\)"):
        warmstart.seed(study, sweep)
    assert "warm_started" not in study.user_attrs  # nothing recorded: the next start tries again


@pytest.mark.parametrize("flag", ["lr_dropout", "other:0", ":3", "other:x", "", "x:²", "x:٥"])
def test_a_bad_warm_start_flag_is_one_line_exit_2(isolated: Path, flag: str) -> None:
    code, _, err = in_process(isolated, "sweep", "lr_dropout", "--warm-start", flag)
    assert code == 2 and f"--warm-start {flag}: give OTHER or OTHER:K" in err


@pytest.mark.parametrize("how", ["file", "flag"])
def test_a_warm_start_from_a_missing_study_is_refused_before_anything_is_written(isolated: Path, how: str) -> None:
    """Decided before a study, the data cache, the MLflow store or a parent run is written (it
    came after all four, 35 s to 3 minutes in)."""
    (isolated / "sweeps").mkdir()
    (isolated / "sweeps" / "warm.yaml").write_text(SPACE + "fixed: {batch_size: 64}\nepochs: 1\n"
                                                   + ("warm_start: {sweep: nowhere}\n" if how == "file" else ""))
    flag = ["--warm-start", "nowhere"] if how == "flag" else []
    code, _, err = in_process(isolated, "sweep", "warm", "--data", str(isolated / "none.zip"), *flag)
    assert code == 2 and err.strip() == ("error: warm_start: no study 'nowhere' in mlruns/optuna.journal "
                                        "(studies: none): run that sweep first, or name another"), err
    assert sorted(p.name for p in isolated.iterdir()) == ["sweeps"]  # no mlruns/, no cache
    # with a storage that holds other studies, they are named, and still nothing is added
    storage.open_storage(str(isolated / "mlruns" / "optuna.journal"))
    optuna.create_study(study_name="source", storage=storage.open_storage(str(isolated / "mlruns" / "optuna.journal")))
    before = sorted(p.name for p in (isolated / "mlruns").iterdir())
    code, _, err = in_process(isolated, "sweep", "warm", "--data", str(isolated / "none.zip"), *flag)
    assert code == 2 and "(studies: source)" in err, err
    assert sorted(p.name for p in (isolated / "mlruns").iterdir()) == before
    assert optuna.get_all_study_names(storage.open_storage(str(isolated / "mlruns" / "optuna.journal"))) == ["source"]
