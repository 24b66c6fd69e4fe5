"""The study's report, on synthetic Optuna studies: the ledger's arithmetic, every plot and
table, pruned trials marked, and plots that cannot be drawn yet said so."""

from __future__ import annotations

import base64
import csv
import datetime as dt
import json
from pathlib import Path

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from cifar_exp import report
from cifar_exp.config.goals import Objective

T0 = dt.datetime(2026, 1, 1)


def trial(number: int, state: TrialState, seconds: float, epochs_run: int | None = None) -> optuna.trial.FrozenTrial:
    frozen = create_trial(state=state, value=0.5 if state == TrialState.COMPLETE else None,
                          params={"dropout": 0.1}, distributions={"dropout": FloatDistribution(0, 1)},
                          user_attrs={} if epochs_run is None else {"epochs_run": epochs_run})
    frozen.number = number
    frozen.datetime_start, frozen.datetime_complete = T0, T0 + dt.timedelta(seconds=seconds)
    return frozen


def test_ledger_adds_seconds_by_state_and_what_pruning_saved() -> None:
    trials = [trial(0, TrialState.COMPLETE, 100, 10), trial(1, TrialState.PRUNED, 20, 2),
              trial(2, TrialState.PRUNED, 30, 5), trial(3, TrialState.FAIL, 7)]
    cost = report.ledger(trials, epochs=10)
    assert (cost.seconds_complete, cost.seconds_pruned, cost.seconds_failed) == (100, 50, 7)
    assert cost.pruning_saved_seconds == 20 / 2 * 8 + 30 / 5 * 5  # seconds per epoch x epochs skipped
    assert (cost.trials_complete, cost.trials_pruned, cost.trials_failed, cost.seconds_total) == (1, 2, 1, 157)


def test_ledger_sums_the_seconds_spent_compiling_and_counts_how_programs_came() -> None:
    trials = [trial(n, TrialState.COMPLETE, 10, 10) for n in range(4)]
    for t, (seconds, origin) in zip(trials, [(12.5, "new"), (0.0, "reused"), (0.0, "reused"), (1.5, "cache")],
                                    strict=True):
        t.user_attrs.update(compile_seconds=seconds, compiled=origin)
    cost = report.ledger([*trials, trial(4, TrialState.FAIL, 3)], epochs=10)  # a failed trial has neither
    assert cost.compile_seconds == 14.0
    assert (cost.compiled_new, cost.compiled_reused, cost.compiled_cache) == (1, 2, 1)


def synthetic_study(trials: int = 10) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))

    def objective(t: optuna.Trial) -> float:
        lr = t.suggest_float("learning_rate", 1e-4, 1e-1, log=True)
        dropout = t.suggest_float("dropout", 0, 0.5)
        t.suggest_categorical("lr_schedule", ["constant", "cosine"])
        for epoch in range(3):
            t.report(dropout + epoch * lr, epoch + 1)
        if t.number == 3:
            raise optuna.TrialPruned()
        if t.number == 2:
            t.set_user_attr("degenerate", "val_accuracy at chance (best 0.1000 <= 0.1085 in 3 epochs)")
        return dropout + lr

    study.optimize(objective, n_trials=trials)
    return study


def test_report_has_every_plot_both_tables_and_marks_pruned_trials(tmp_path: Path) -> None:
    study = synthetic_study()
    assert report.write(study, tmp_path, epochs=3, objectives=(Objective(),)) == {}
    for name in report.PLOTS:
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000, name
    page = (tmp_path / "report.html").read_text()
    assert page.count("<h2>") == len(report.PLOTS) and page.count("plotly.js v") == 1  # embedded once
    # each plot also as its PNG, which shows where scripts do not run (MLflow's artifact viewer),
    # and only there: one plot per section, never the PNG above its interactive twin
    for name in report.PLOTS:
        png = base64.b64encode((tmp_path / f"{name}.png").read_bytes()).decode()
        assert f"<img class='static' alt='{name}' src='data:image/png;base64,{png}'><div class='live'>" in page, name
    assert "<script>document.documentElement.classList.add('js')</script>" in page
    assert "html.js .static{display:none}html:not(.js) .live{display:none}" in page
    assert "Trial3 (pruned)" in page and "10 trials: 9 complete, 1 pruned, 0 failed" in page
    assert "from 9 complete trials" in page  # importances and contour say what they rest on
    assert "1 degenerate trial(s)" in page and "trial 2: val_accuracy at chance" in page
    rows = list(csv.DictReader((tmp_path / "trials.csv").open()))
    assert [(r["number"], r["state"]) for r in rows] == [(str(t.number), t.state.name) for t in study.trials]
    assert (tmp_path / "trials.html").read_text().count("<tr>") == 11  # header and one row per trial
    assert json.loads((tmp_path / "cost.json").read_text())["trials_pruned"] == 1


def test_the_parallel_coordinates_draw_the_worst_trials_dark_not_white(tmp_path: Path) -> None:
    """Optuna's white-to-blue scale drew the worse half of the trials near-white on white."""
    import matplotlib.colors

    study = synthetic_study()
    report.write(study, tmp_path, epochs=3, objectives=(Objective(),))
    figures = report._figures(study, (Objective(),))
    interactive = figures["parallel_coordinate"][1]()
    report._visible("parallel_coordinate", interactive)
    import plotly.colors

    lines = [trace for trace in interactive.data if trace.mode == "lines"]
    assert len(lines) == 9  # the complete trials
    for line in lines:  # every line visible: none lighter than viridis' yellow end
        red, green, blue = plotly.colors.unlabel_rgb(plotly.colors.convert_colors_to_same_type(line.line.color)[0][0])
        assert red + green + blue < 2.7 * 255, line.line.color
    worst = min(lines, key=lambda line: line.y[0])
    assert worst.line.color == "rgb(68, 1, 84)"  # the worst trial: viridis' dark end, not near-white
    (bar,) = [trace for trace in interactive.data if trace.marker is not None and trace.marker.showscale]
    assert bar.marker.colorscale[0][1] == "#440154"
    drawn = report._figure_of(figures["parallel_coordinate"][0]())
    report._visible("parallel_coordinate", drawn)
    for collection in drawn.axes[0].collections:
        assert collection.get_cmap().name == "viridis"
        lightest = max(sum(matplotlib.colors.to_rgb(c)) for c in collection.get_colors())
        assert lightest < 2.7, lightest  # no line near white (3.0)


def test_a_report_of_one_trial_says_one_trial(tmp_path: Path) -> None:
    study = synthetic_study(trials=1)
    report.write(study, tmp_path, epochs=3)
    assert "<p>1 trial: 1 complete" in (tmp_path / "report.html").read_text()
    assert report.plural(1, "trial") == "1 trial" and report.plural(2, "trial") == "2 trials"


def test_plots_that_cannot_be_drawn_yet_are_named_with_the_reason(tmp_path: Path) -> None:
    study = optuna.create_study()
    study.add_trial(trial(0, TrialState.FAIL, 3))
    skipped = report.write(study, tmp_path, epochs=3)
    assert set(skipped) == set(report.PLOTS) and skipped["contour"] == "no complete trial yet"
    assert "not drawn yet" in (tmp_path / "report.html").read_text()
    assert not list(tmp_path.glob("*.png"))


def test_importances_and_contour_are_left_out_below_the_minimum_of_complete_trials(tmp_path: Path) -> None:
    study = synthetic_study(trials=4)  # 3 complete, 1 pruned
    skipped = report.write(study, tmp_path, epochs=3, objectives=(Objective(),))
    assert set(skipped) == {"param_importances", "contour"}
    assert skipped["param_importances"] == (f"left out below {report.MIN_COMPLETE_FOR_IMPORTANCE} complete trials "
                                            f"(has 3): importances from fewer are noise")
    assert skipped["contour"].endswith("(has 3): which two parameters matter most is noise on fewer, and so is "
                                       "their contour")  # its own reason, not the importances'
    assert not (tmp_path / "param_importances.png").exists() and (tmp_path / "slice.png").exists()
    assert "left out below 5 complete trials (has 3)" in (tmp_path / "report.html").read_text()
