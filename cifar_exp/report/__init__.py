"""The study at a glance, for its MLflow parent run: Optuna's plots (PNG, and one interactive
HTML page), the table of all trials (CSV and HTML) and the cost ledger.

``write(study, folder, epochs)`` builds every file from the study alone (storage, not memory), so
``python -m cifar_exp report NAME`` can rebuild them at any time without training. Decisions:
the interactive page embeds plotly.js once (about 4.8 MB) so that it opens offline; one page
per plot would repeat it six times. A plot Optuna cannot draw yet (a contour needs two
parameters) or that would rest on too few trials (importances and the contour, below
``MIN_COMPLETE_FOR_IMPORTANCE`` complete trials) is listed on the page with the reason.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt
import optuna
from optuna.trial import FrozenTrial, TrialState

from cifar_exp.config import outcomes
from cifar_exp.config.goals import Objective
from cifar_exp.config.records import StudyAttrs, TrialAttrs

PLOTS = ("optimization_history", "param_importances", "parallel_coordinate", "slice", "contour",
         "intermediate_values")
# Importances and the contour of the two most important parameters are noise on a handful of
# trials: drawn from this many complete trials on, and titled with the count. Optuna 5 computes
# importances with PED-ANOVA (not fANOVA): how much each parameter matters to reach the best
# ``target_quantile`` of the complete trials. Its default quantile, 0.1, holds no trial below 10
# complete trials, so the report asks for the share that holds the best TOP_TRIALS trials, at
# least 0.1: 0.4 of 5 trials, 0.1 of 20 or more.
THIN_PLOTS = {"param_importances": "importances from fewer are noise",
              "contour": "which two parameters matter most is noise on fewer, and so is their contour"}
COLLECTED = "deleted by gc"  # a trial's model_uri in the table once ``cifar-exp gc`` deleted its model
MIN_COMPLETE_FOR_IMPORTANCE = 5
TOP_TRIALS = 2


def plural(count: int, noun: str) -> str:
    """``1 trial``, ``2 trials``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def importance_quantile(complete: int) -> float:
    """The PED-ANOVA quantile of a study with ``complete`` complete trials (see TOP_TRIALS)."""
    return min(0.5, max(0.1, TOP_TRIALS / max(complete, 1)))  # PED-ANOVA takes below 1.0


def trial_rows(trials: Sequence[FrozenTrial], objectives: Sequence[Objective] = (Objective(),),
               collected: Collection[int] = ()) -> list[dict[str, Any]]:
    """One row per trial: number, state, value (the first objective's), seconds, params, and what
    the worker recorded (test metrics, epochs run, run id, model, failure reason); the model of a
    trial in ``collected`` reads ``deleted by gc``. With several objectives, each objective's
    value and ``front`` (on the Pareto front); where any trial has constraints, ``feasible``."""
    several = len(objectives) > 1
    on_front = {t.number for t in outcomes.front(trials, objectives)}
    constrained = any(t.constraints for t in trials)
    rows = []
    for t in trials:
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else None
        judged: dict[str, Any] = {}
        if several:
            judged = {o.metric: (t.values[i] if t.values else None) for i, o in enumerate(objectives)}
            judged["front"] = t.number in on_front
        if constrained:
            judged["feasible"] = outcomes.feasible(t) if t.constraints else None
        rows.append({"number": t.number, "state": t.state.name, "value": outcomes.value(t), **judged,
                     "seconds": seconds, **t.params, **TrialAttrs.of(t).shown(),
                     **({"model_uri": COLLECTED} if t.number in collected else {})})
    return rows


@dataclass(frozen=True)
class Ledger:
    """Where the sweep's time went: wall-clock seconds of trials by how they ended, the seconds
    pruning saved (each pruned trial's seconds per epoch times the epochs it skipped), the seconds
    spent compiling (the trials' ``compile_seconds``) and how many trials compiled their program
    (``new``), ran one their worker had compiled (``reused``) or read it from JAX's cache."""

    seconds_complete: float
    seconds_pruned: float
    seconds_failed: float
    pruning_saved_seconds: float
    trials_complete: int
    trials_pruned: int
    trials_failed: int
    compile_seconds: float = 0.0
    compiled_new: int = 0
    compiled_reused: int = 0
    compiled_cache: int = 0

    @property
    def seconds_total(self) -> float:
        return self.seconds_complete + self.seconds_pruned + self.seconds_failed


def ledger(trials: Sequence[FrozenTrial], epochs: int) -> Ledger:
    """The cost ledger of ``trials`` in a sweep of ``epochs`` epochs per trial."""
    spent = {TrialState.COMPLETE: 0.0, TrialState.PRUNED: 0.0, TrialState.FAIL: 0.0}
    count = dict.fromkeys(spent, 0)
    saved = 0.0
    for t in trials:
        if t.state not in spent or not (t.datetime_start and t.datetime_complete):
            continue
        seconds = (t.datetime_complete - t.datetime_start).total_seconds()
        spent[t.state] += seconds
        count[t.state] += 1
        ran = TrialAttrs.of(t).epochs_run or 0
        if t.state == TrialState.PRUNED and ran:
            saved += seconds / ran * max(epochs - ran, 0)
    origins = [TrialAttrs.of(t).compiled for t in trials]
    return Ledger(spent[TrialState.COMPLETE], spent[TrialState.PRUNED], spent[TrialState.FAIL], saved,
                  count[TrialState.COMPLETE], count[TrialState.PRUNED], count[TrialState.FAIL],
                  sum(TrialAttrs.of(t).phases.get("compile_seconds", 0.0) for t in trials),
                  origins.count("new"), origins.count("reused"), origins.count("cache"))


def _contour_params(study: optuna.Study, target: dict[str, Any]) -> list[str] | None:
    """The two most important parameters, for the contour plot."""
    importances = optuna.importance.get_param_importances(study, **target)
    return list(importances)[:2] if len(importances) >= 2 else None


def _figures(study: optuna.Study, objectives: Sequence[Objective]) -> dict[str, tuple[Callable[[], Any],
                                                                                      Callable[[], Any]]]:
    """Plot name -> (matplotlib figure factory, plotly figure factory). With several objectives
    the one-target plots show the first objective, and the Pareto front shows them all."""
    mpl, ply = optuna.visualization.matplotlib, optuna.visualization
    metric = objectives[0].metric
    several = len(objectives) > 1
    # Optuna's plots refuse a multi-objective study without a target
    # (and every plot names the objective by its metric, not "Objective Value")
    target: dict[str, Any] = {"target": lambda t: t.values[0], "target_name": metric} if several else \
        {"target_name": metric}
    complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    importance: dict[str, Any] = {"evaluator": optuna.importance.PedAnovaImportanceEvaluator(
        target_quantile=importance_quantile(complete))}
    if several:  # PED-ANOVA takes a target as lower-is-better
        sign = -1.0 if objectives[0].direction == "maximize" else 1.0
        importance.update(target=lambda t: sign * t.values[0], target_name=metric)

    def contour(module: Any) -> Any:
        params = _contour_params(study, {k: v for k, v in importance.items() if k != "target_name"})
        if params is None:
            raise ValueError("the contour plot needs two searched parameters with complete trials")
        return module.plot_contour(study, params=params, **target)

    def curves(draw: Callable[[], Any]) -> Any:
        if several:
            raise ValueError("a multi-objective study keeps no curves itself: each trial's MLflow run has its "
                             f"{metric} per epoch, and the study {study.study_name}.pruning the curves pruning follows")
        return draw()

    figures = {
        "optimization_history": (lambda: mpl.plot_optimization_history(study, **target),
                                 lambda: ply.plot_optimization_history(study, **target)),
        "param_importances": (lambda: mpl.plot_param_importances(study, **importance),
                              lambda: ply.plot_param_importances(study, **importance)),
        "parallel_coordinate": (lambda: mpl.plot_parallel_coordinate(study, **target),
                                lambda: ply.plot_parallel_coordinate(study, **target)),
        "slice": (lambda: mpl.plot_slice(study, **target), lambda: ply.plot_slice(study, **target)),
        "contour": (lambda: contour(mpl), lambda: contour(ply)),
        "intermediate_values": (lambda: curves(lambda: _learning_curves(study, metric)),
                                lambda: curves(lambda: _marked(study))),
    }
    if several:
        names: list[str] = [o.metric for o in objectives]
        figures["pareto_front"] = (lambda: mpl.plot_pareto_front(study, target_names=names),
                                   lambda: ply.plot_pareto_front(study, target_names=names))
    return figures


def _learning_curves(study: optuna.Study, metric: str) -> Any:
    """Every trial's reported value per epoch, coloured by trial number (a colour scale, so that
    no two trials share a colour however many there are) and labelled at its last epoch; pruned
    trials dashed, with an x where they stopped (Optuna's own plot does not tell them apart)."""
    from matplotlib.ticker import MaxNLocator

    trials = [t for t in study.get_trials(deepcopy=False) if t.intermediate_values]
    figure, ax = plt.subplots(figsize=(8, 4.5))
    scale = matplotlib.colors.Normalize(0, max([t.number for t in trials], default=0) or 1)
    for t in trials:
        steps = sorted(t.intermediate_values)
        values = [t.intermediate_values[s] for s in steps]
        pruned = t.state == TrialState.PRUNED
        colour = plt.cm.viridis(scale(t.number))
        ax.plot(steps, values, "--" if pruned else "-", color=colour, alpha=0.7 if pruned else 0.95, linewidth=1.2)
        if pruned:
            ax.plot(steps[-1:], values[-1:], "x", color=colour, markersize=8)
        ax.annotate(str(t.number), (steps[-1], values[-1]), xytext=(4, 0), textcoords="offset points",
                    fontsize=8, color=colour, va="center")
    figure.colorbar(plt.cm.ScalarMappable(norm=scale, cmap="viridis"), ax=ax, label="trial")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="epoch", ylabel=metric, title=f"{metric} per epoch of every trial (dashed, x: pruned)")
    ax.grid(alpha=0.3)
    return ax


def _readable(name: str, figure: Any, params: int) -> None:
    """Room for Optuna's matplotlib plots' labels: the parallel coordinates get 1.6 inches per
    axis (at 6.4 for five axes, the tick labels of neighbouring axes ran into each other), the
    slice plots' ticks are turned and made smaller."""
    if name == "parallel_coordinate":
        figure.set_size_inches(max(6.4, 1.6 * (params + 1)), 4.8)
    if name == "slice":
        figure.set_size_inches(max(6.4, 3.2 * params), 3.6)
        for ax in figure.axes:
            ax.tick_params(axis="x", which="both", labelrotation=30, labelsize=8)


def _visible(name: str, figure: Any) -> None:
    """Optuna colours the parallel coordinates from white (the worst trials) to dark blue: the
    worse half of the trials drew near-white lines on a white page. Viridis runs from dark
    purple (worst) to yellow (best) and keeps every line visible; plotly figure or matplotlib."""
    if name != "parallel_coordinate":
        return
    if hasattr(figure, "savefig"):  # matplotlib: the lines and their colour bar
        for collection in figure.axes[0].collections:
            collection.set_cmap("viridis")
        return
    import plotly.colors

    # Optuna draws a line per trial, its colour sampled at the trial's value on the first axis
    # (the objective, normalized to 0..1), and one invisible trace that carries the colour bar.
    bars = [t for t in figure.data if t.type == "scatter" and t.marker is not None and t.marker.showscale]
    reverse = bool(bars and bars[0].marker.reversescale)
    for trace in figure.data:
        if trace.type == "scatter" and trace.mode == "lines" and trace.y and trace.y[0] is not None:
            at = min(max(float(trace.y[0]), 0.0), 1.0)
            trace.line.color = plotly.colors.sample_colorscale("Viridis", [1.0 - at if reverse else at])[0]
    for bar in bars:
        bar.marker.colorscale = "Viridis"


def _marked(study: optuna.Study) -> Any:
    """Optuna's interactive intermediate-values plot with pruned trials dotted and named so."""
    figure = optuna.visualization.plot_intermediate_values(study)
    pruned = {f"Trial{t.number}" for t in study.get_trials(deepcopy=False) if t.state == TrialState.PRUNED}
    for trace in figure.data:
        if trace.name in pruned:
            trace.line.dash = "dot"
            trace.name = f"{trace.name} (pruned)"
    return figure


def _note(name: str, complete: int) -> str:
    """What a thin plot rests on, written on it."""
    how = f" (PED-ANOVA, best {importance_quantile(complete):.0%})" if name == "param_importances" else ""
    return f"from {complete} complete trials{how}"


def _figure_of(drawn: Any) -> Any:
    """matplotlib returns Axes (or an array of them for slice/contour): their Figure."""
    first = drawn.flat[0] if hasattr(drawn, "flat") else drawn
    return first.get_figure() if hasattr(first, "get_figure") else first.figure


def write(study: optuna.Study, folder: Path, epochs: int,
          objectives: Sequence[Objective] = (Objective(),)) -> dict[str, str]:
    """Write the report of ``study`` (judged on ``objectives``) into ``folder``: ``<plot>.png``
    per drawable plot (``pareto_front`` with several objectives), ``report.html``, ``trials.csv``,
    ``trials.html``, ``cost.json``. Returns plot name -> why it was not drawn, for the plots
    Optuna could not draw."""
    folder.mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    rows = trial_rows(trials, objectives, StudyAttrs.of(study).models_collected)
    _write_csv(folder / "trials.csv", rows)
    (folder / "trials.html").write_text(_page(f"Trials of {study.study_name}", _table(rows)))
    cost = ledger(trials, epochs)
    (folder / "cost.json").write_text(json.dumps({**asdict(cost), "seconds_total": cost.seconds_total}, indent=2))
    sections, skipped = _plots(study, folder, objectives)
    if skipped:
        sections.append("<h2>not drawn yet</h2><ul>" + "".join(
            f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in skipped.items()) + "</ul>")
    summary = (f"<p>{plural(len(trials), 'trial')}: {cost.trials_complete} complete, {cost.trials_pruned} pruned, "
               f"{cost.trials_failed} failed; {cost.seconds_total:.1f} s of trials, "
               f"{cost.pruning_saved_seconds:.1f} s saved by pruning; {cost.compile_seconds:.1f} s compiling "
               f"({cost.compiled_new} trials compiled their program, {cost.compiled_reused} reused one, "
               f"{cost.compiled_cache} read it from the compilation cache).</p>")
    degenerate = [t for t in trials if TrialAttrs.of(t).degenerate]
    if degenerate:  # numbers that mean nothing: named before any plot draws them as results
        summary += (f"<p><b>{len(degenerate)} degenerate trial(s)</b> (see the degenerate column of the "
                    f"trials table):</p><ul>" + "".join(
                        f"<li>trial {t.number}: {html.escape(str(TrialAttrs.of(t).degenerate))}</li>"
                        for t in degenerate) + "</ul>")
    (folder / "report.html").write_text(_page(f"Study {study.study_name}", summary + "".join(sections)))
    return skipped


def _plots(study: optuna.Study, folder: Path, objectives: Sequence[Objective]) -> tuple[list[str], dict[str, str]]:
    """Draw every plot of ``study`` into ``folder`` (PNG) and the page (a section each): the sections,
    and plot name -> why it was not drawn."""
    trials = study.get_trials(deepcopy=False)
    skipped: dict[str, str] = {}
    sections: list[str] = []
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        for name, (draw_png, draw_html) in _figures(study, objectives).items():
            try:
                if not complete:
                    raise ValueError("no complete trial yet")
                thin = name in THIN_PLOTS
                if thin and len(complete) < MIN_COMPLETE_FOR_IMPORTANCE:
                    raise ValueError(f"left out below {MIN_COMPLETE_FOR_IMPORTANCE} complete trials "
                                     f"(has {len(complete)}): {THIN_PLOTS[name]}")
                note = _note(name, len(complete))
                figure = _figure_of(draw_png())
                _readable(name, figure, len({p for t in complete for p in t.params}))
                _visible(name, figure)
                if thin:
                    figure.text(0.99, 0.01, note, ha="right", va="bottom", fontsize=9, color="dimgrey")
                figure.savefig(folder / f"{name}.png", dpi=110, bbox_inches="tight")
                plt.close(figure)
                interactive = draw_html()
                _visible(name, interactive)
                if thin:
                    interactive.update_layout(title_text=f"{interactive.layout.title.text or name} ({note})")
                # One plot per section: the interactive one where scripts run, the PNG where they do
                # not (MLflow's artifact viewer showed the interactive plots blank), switched by the
                # page's first script (``_page``). plotly.js goes into the page once, with the first.
                png = base64.b64encode((folder / f"{name}.png").read_bytes()).decode()
                sections.append(f"<h2>{name.replace('_', ' ')}</h2><img class='static' alt='{name}' "
                                f"src='data:image/png;base64,{png}'><div class='live'>"
                                + interactive.to_html(full_html=False, include_plotlyjs=not sections) + "</div>")
            except Exception as exc:  # noqa: BLE001 (a plot that fails must not take the tables with it)
                plt.close("all")
                skipped[name] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return sections, skipped


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return html.escape("" if value is None else str(value))


def _table(rows: Sequence[Mapping[str, Any]]) -> str:
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(row.get(c))}</td>" for c in columns) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _page(title: str, body: str) -> str:
    style = ("body{font-family:sans-serif;margin:1em}table{border-collapse:collapse;font-size:12px}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
             "html.js .static{display:none}html:not(.js) .live{display:none}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<script>document.documentElement.classList.add('js')</script>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")
