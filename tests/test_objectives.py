"""Search beyond one number: several objectives, constraints and the samplers' options in sweep
files; judging trials (the Pareto front, feasibility, the rule ``register --pick`` applies);
pruning a multi-objective trial on its first objective. No training here (test_deploy.py trains)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from cifar_exp.config import ConfigError, Settings, outcomes
from cifar_exp.config.goals import Bound, Objective
from cifar_exp.config.records import TrialAttrs
from cifar_exp.config.sweepfile import load_sweep, parse_sweep
from cifar_exp.sweep import pruning, space

SPACE = "space:\n  dropout: {type: float, low: 0, high: 0.5}\n"
TWO = ("objectives:\n  - {metric: val_accuracy, direction: maximize}\n"
       "  - {metric: latency_ms, direction: minimize}\n")


def parse(text: str) -> Any:
    return parse_sweep("x", text, Path("sweeps/x.yaml"))


def test_objectives_and_constraints_parse() -> None:
    sweep = parse(SPACE + TWO + "constraints:\n  param_count: {max: 1000000}\n  test_accuracy: {min: 0.5}\n")
    assert sweep.objectives == (Objective("val_accuracy", "maximize"), Objective("latency_ms", "minimize"))
    assert sweep.objective == Objective("val_accuracy", "maximize")  # the first: what pruning follows
    assert sweep.constraints == {"param_count": Bound(max=1e6), "test_accuracy": Bound(min=0.5)}
    assert sweep.measures_speed
    assert not parse(SPACE).measures_speed and parse(SPACE).objectives == (Objective(),)


def test_one_objective_keeps_the_study_identity_objectives_change_it() -> None:
    one = parse(SPACE + "objective: {metric: val_accuracy, direction: maximize}\n")
    listed = parse(SPACE + "objectives:\n  - {metric: val_accuracy, direction: maximize}\n")
    assert one.identity("")["searched_sha256"] == listed.identity("")["searched_sha256"]
    assert parse(SPACE + TWO).identity("")["searched_sha256"] != one.identity("")["searched_sha256"]
    constrained = parse(SPACE + "constraints:\n  param_count: {max: 10}\n")
    assert constrained.identity("")["searched_sha256"] != one.identity("")["searched_sha256"]


@pytest.mark.parametrize("text, fragment", [
    (TWO + "objective: {metric: val_accuracy}\n", "objective and objectives both set"),
    ("objectives: []\n", "give a list of {metric, direction}"),
    ("objectives:\n  - {metric: latency_ms, direction: minimize}\n", "first objective must be a per-epoch metric"),
    ("objectives:\n  - {metric: val_accuracy}\n  - {metric: val_accuracy}\n", "each metric at most once"),
    ("objectives:\n  - {metric: val_accuracy}\n  - {metric: latency_ms, direction: maximize}\n",
     "maximize latency_ms optimises the wrong way"),
    ("objectives:\n  - {metric: val_accuracy}\n  - {metric: latncy_ms, direction: minimize}\n", "is not one of"),
    ("constraints:\n  param_cout: {max: 5}\n", "unknown key 'param_cout' (did you mean 'param_count'?)"),
    ("constraints:\n  param_count: {}\n", "give max, min, or both"),
    ("constraints:\n  param_count: {min: 9, max: 5}\n", "min <= max"),
    ("constraints:\n  param_count: {most: 5}\n", "unknown key 'most'"),
    ("sampler: {name: random, n_startup_trials: 3}\n", "sampler.n_startup_trials: does not apply to the random"),
    ("sampler: {name: nsga2, multivariate: true}\n", "(it takes population_size)"),
    ("sampler: {name: tpe, group: true, multivariate: false}\n", "group needs multivariate"),
    (TWO + "sampler: {name: cmaes}\n", "cmaes takes one objective"),
    ("sampler: {name: gp}\n", "is not one of"),
])
def test_bad_goals_are_one_line_config_errors(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(SPACE + text)
    assert "\n" not in str(info.value) and str(info.value).startswith("sweeps/x.yaml")
    assert fragment in str(info.value)


def test_tpe_options_are_written_out_and_default_as_optuna_5_1() -> None:
    """Every option passed explicitly: a bare TPESampler(seed) on Optuna 5.0 sampled differently."""
    plain = space.make_sampler(parse(SPACE), 3)
    assert isinstance(plain, optuna.samplers.TPESampler)
    assert (plain._multivariate, plain._group, plain._constant_liar, plain._n_startup_trials) == (True, False, True, 10)
    several = space.make_sampler(parse(SPACE + TWO), 3)
    assert (several._multivariate, several._group) == (False, False)  # independent TPE, as 5.1 with several
    conditional = space.make_sampler(load_sweep("lr_schedule"), 3)  # a space with when: conditions
    assert (conditional._multivariate, conditional._group) == (True, True)
    chosen = space.make_sampler(parse(SPACE + "sampler: {name: tpe, multivariate: false, constant_liar: false, "
                                      "n_startup_trials: 4}\n"), 3)
    assert (chosen._multivariate, chosen._group, chosen._constant_liar, chosen._n_startup_trials) == \
        (False, False, False, 4)
    nsga = space.make_sampler(parse(SPACE + TWO + "sampler: {name: nsga2, population_size: 8}\n"), 3)
    assert isinstance(nsga, optuna.samplers.NSGAIISampler) and nsga._population_size == 8
    assert isinstance(space.make_sampler(parse(SPACE + TWO + "sampler: {name: nsga3}\n"), 3),
                      optuna.samplers.NSGAIIISampler)


@pytest.mark.parametrize("sampler", ["tpe", "nsga2", "nsga3", "random"])
def test_the_same_seed_samples_the_same_trials(sampler: str) -> None:
    sweep = parse(SPACE + "  blocks: {type: int, low: 1, high: 3}\n" + TWO
                  + f"sampler: {{name: {sampler}, seed: 5}}\n")

    def sampled() -> list[dict[str, Any]]:
        study = optuna.create_study(directions=["maximize", "minimize"], sampler=space.make_sampler(sweep, 5))
        for _ in range(14):  # past TPE's 10 startup trials
            trial = study.ask()
            params = space.suggest(trial, sweep)
            study.tell(trial, [params["dropout"] * params["blocks"], params["blocks"] + params["dropout"]])
        return [t.params for t in study.trials]

    assert sampled() == sampled()


class Trial:
    """What ``outcomes`` reads of an Optuna trial."""

    def __init__(self, number: int, values: list[float] | None, constraints: dict[str, float] | None = None,
                 state: str = "COMPLETE", **attrs: Any) -> None:
        self.number, self.values, self.constraints = number, values, constraints or {}
        self.state = TrialState[state]
        self.user_attrs = TrialAttrs.encode(**attrs)


OBJECTIVES = (Objective("val_accuracy", "maximize"), Objective("latency_ms", "minimize"))
TRIALS = [Trial(0, [0.80, 3.0]), Trial(1, [0.70, 1.0]), Trial(2, [0.75, 2.0]),
          Trial(3, [0.70, 2.5]),  # dominated by 2
          Trial(4, [0.90, 0.5], {"param_count": 10.0}),  # best at both, but infeasible
          Trial(5, None, state="PRUNED"), Trial(6, [0.60, 0.9], {"param_count": -1.0})]


def test_the_front_holds_the_feasible_undominated_trials_by_the_first_objective() -> None:
    assert [t.number for t in outcomes.front(TRIALS, OBJECTIVES)] == [0, 2, 1, 6]
    assert [t.number for t in outcomes.ranked(TRIALS, OBJECTIVES)] == [0, 2, 1, 6, 3]  # infeasible 4 never
    assert [t.number for t in outcomes.front(TRIALS, OBJECTIVES[:1])] == [0]  # one objective: the best


def test_a_rule_picks_the_best_front_member_that_meets_its_conditions() -> None:
    rule = outcomes.Rule.parse("val_accuracy", ["latency_ms<=2"])
    assert rule.choose(TRIALS, OBJECTIVES).number == 2  # 4 is faster and better, and infeasible
    assert str(rule) == "best val_accuracy on the Pareto front where latency_ms<=2"
    assert outcomes.Rule.parse("latency_ms").choose(TRIALS, OBJECTIVES).number == 6
    assert outcomes.Rule.parse("val_accuracy", ["latency_ms<0.1"]).choose(TRIALS, OBJECTIVES) is None
    with_test = [Trial(0, [0.8, 3.0], test_accuracy=0.79), Trial(1, [0.7, 1.0], test_accuracy=0.71)]
    assert outcomes.Rule.parse("test_accuracy", ["test_accuracy>0.75"]).choose(with_test, OBJECTIVES).number == 0


@pytest.mark.parametrize("pick, where, fragment", [
    ("speed", [], "--pick speed: not a metric"),
    ("val_accuracy", ["latency_ms=<2"], "write METRIC<=NUMBER"),
    ("val_accuracy", ["lateny_ms<=2"], "write METRIC<=NUMBER"),
    ("val_accuracy", ["latency_ms<=inf"], "write METRIC<=NUMBER"),
    *(("val_accuracy", [f"latency_ms<={bad}"], "write METRIC<=NUMBER")  # tracebacks before: float() refused them
      for bad in ("1e", ".", "+", "1.2.3", "٥", "1e999", "")),
    ("", [], "--pick : not a metric"),  # an empty --pick is no default
])
def test_a_malformed_rule_is_a_config_error(pick: str, where: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        outcomes.Rule.parse(pick, where)


def test_constraint_values_and_the_broken_line() -> None:
    constraints = {"param_count": Bound(max=1000.0), "test_accuracy": Bound(min=0.5)}
    assert outcomes.constraint_values(constraints, {"param_count": 1500.0}) == {"param_count": 500.0}
    assert outcomes.broken(constraints, {"param_count": 1500.0, "test_accuracy": 0.6}) == \
        "param_count 1500, not <= 1000"
    assert outcomes.broken(constraints, {"param_count": 900.0, "test_accuracy": 0.6}) == ""


def test_a_multi_objective_trial_is_pruned_on_its_first_objective(tmp_path: Path) -> None:
    """Optuna refuses report/should_prune on a multi-objective study; the companion study of
    first-objective curves takes them, with the sweep's pruner (median here)."""
    from cifar_exp.sweep import storage

    sweep = dataclasses.replace(parse(SPACE + TWO + "pruner: {name: median, min_epochs: 1}\nepochs: 4\n"),
                                name="multi")
    settings = Settings(sweep=sweep, storage=str(tmp_path / "optuna.journal"), tracking_uri="unused")
    opened = storage.open_storage(settings.storage)
    study = optuna.create_study(study_name="multi", storage=opened, directions=["maximize", "minimize"])
    for _ in range(6):  # five startup trials, and one more, all at 0.5 per epoch
        trial = study.ask()
        prune = pruning.Pruning(settings, opened, trial)
        for step in range(1, 5):
            prune.report(0.5, step)
            assert not prune.should_prune()
        prune.end(TrialState.COMPLETE, 0.5)
        study.tell(trial, [0.5, 1.0])
    low = study.ask()
    prune = pruning.Pruning(settings, opened, low)
    prune.report(0.2, 1)
    assert prune.should_prune()  # below the median of the trials before it
    companion = optuna.load_study(study_name="multi.pruning", storage=opened)
    assert companion.direction == optuna.study.StudyDirection.MAXIMIZE
    assert [t.user_attrs["trial_number"] for t in companion.trials] == list(range(7))
    assert companion.trials[-1].intermediate_values == {1: 0.2}


def test_a_degenerate_trial_is_never_registered_and_the_refusal_names_it() -> None:
    """README's rule chose the only front member under 2 ms: a model at chance (one class is
    always fast). It is never registered: another member that meets the rule is, or none."""
    from types import SimpleNamespace

    from cifar_exp import registry
    from cifar_exp.config import UserError
    from cifar_exp.registry import confirm

    sweep = SimpleNamespace(objectives=OBJECTIVES, name="deploy")
    at_chance = "val_accuracy 0.1028 is chance level for 10 classes"
    trials = [Trial(0, [0.80, 3.0], model_uri="models:/m-0"), Trial(1, [0.10, 0.4], model_uri="models:/m-1",
                                                                 degenerate=at_chance),
              Trial(2, [0.70, 1.5], model_uri="models:/m-2")]
    rule = outcomes.Rule.parse("val_accuracy", ["latency_ms<=2"])
    assert registry.best_trial(trials, sweep, rule).number == 2  # type: ignore[arg-type]
    assert [t.number for t in confirm.candidates(trials, sweep, rule, 3)] == [2]  # type: ignore[arg-type]
    strict = outcomes.Rule.parse("val_accuracy", ["latency_ms<=1"])
    message = (f"trial 1 meets the rule ({strict}) but is degenerate ({at_chance}), and no sound trial does: a "
               f"degenerate model is never registered; loosen --where, or run more trials")
    with pytest.raises(UserError) as refused:
        registry.best_trial(trials, sweep, strict)  # type: ignore[arg-type]
    assert str(refused.value) == message
    with pytest.raises(UserError) as refused:
        confirm.candidates(trials, sweep, strict, 3)  # type: ignore[arg-type]
    assert str(refused.value) == message
    alone = [trials[1]]  # the only complete trial, by the default ranking
    with pytest.raises(UserError, match="trial 1 is the best but is degenerate"):
        registry.best_trial(alone, sweep)  # type: ignore[arg-type]
    # forced through (a trial handed to describe): the version's description and tags say so
    forced = SimpleNamespace(number=1, values=[0.10, 0.4], params={"dropout": 0.1}, user_attrs=trials[1].user_attrs)
    text, tags = registry.describe(forced, sweep)  # type: ignore[arg-type]
    assert f"DEGENERATE: {at_chance}" in text and tags["degenerate"] == at_chance
