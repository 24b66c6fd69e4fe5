"""Sweep files: every shipped one loads; every kind of bad input is one clear ConfigError."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cifar_exp.config import ConfigError, TrainConfig, applies
from cifar_exp.config.sweepfile import available_sweeps, check_name, load_sweep, parse_sweep

GOOD = """
objective: {metric: val_accuracy, direction: maximize}
space:
  learning_rate: {type: float, low: 1e-4, high: 1e-1, log: true}
  dropout: {type: float, low: 0.0, high: 0.5, step: 0.1}
  blocks: {type: int, low: 1, high: 3}
  activation: {type: categorical, choices: [relu, gelu]}
fixed: {batch_size: 64}
epochs: 3
trials: 4
"""


def parse(text: str):
    return parse_sweep("x", text, Path("sweeps/x.yaml"))


def error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("name", sorted(available_sweeps()))
def test_every_shipped_sweep_loads(name: str) -> None:
    sweep = load_sweep(name)
    assert sweep.name == name and sweep.space and sweep.description
    assert sweep.objective.metric.startswith("val_")
    # every dimension's values and the fixed settings build a valid training configuration
    assert isinstance(sweep.train_config({}), TrainConfig)


def test_lr_dropout_is_shipped() -> None:
    sweep = load_sweep("lr_dropout")
    assert {"learning_rate", "dropout", "lr_schedule"} <= set(sweep.space)
    assert sweep.sampler.name == "tpe" and sweep.pruner.name == "hyperband"


def test_good_sweep_parses_with_types_and_yaml_1_1_floats() -> None:
    sweep = parse(GOOD)
    lr = sweep.space["learning_rate"]
    assert (lr.type, lr.low, lr.high, lr.log) == ("float", 1e-4, 1e-1, True)  # "1e-4" is text in YAML 1.1
    assert sweep.space["dropout"].step == 0.1
    assert sweep.space["activation"].choices == ("relu", "gelu")
    config = sweep.train_config({"learning_rate": 0.01})
    assert (config.batch_size, config.learning_rate, config.filters) == (64, 0.01, TrainConfig().filters)


def test_low_greater_than_high_names_file_key_and_values() -> None:
    text = "space:\n  dropout: {type: float, low: 0.5, high: 0.2}\n"
    assert error(text) == "sweeps/x.yaml: space.dropout: high (0.2) must be greater than low (0.5)"


def test_unknown_keys_suggest_the_right_one() -> None:
    assert "did you mean 'space'" in error("spcae: {}\n")
    assert "did you mean 'learning_rate'" in error("space:\n  learning_rat: {type: float, low: 0.1, high: 1}\n")
    assert "did you mean 'metric'" in error("objective: {metrc: val_loss}\n")


@pytest.mark.parametrize("text, fragment", [
    ("space:\n  weight_decay: {type: float, low: 0, high: 0.1, log: true}\n", "log scale needs low > 0"),
    ("space:\n  activation: {type: categorical, choices: []}\n", "non-empty list"),
    ("space:\n  activation: {type: categorical, choices: [relu, swish]}\n", "'swish' is not one of"),
    ("space:\n  blocks: {type: float, low: 1, high: 3}\n", "takes type int"),
    ("space:\n  activation: {type: float, low: 1, high: 3}\n", "takes type categorical"),
    ("space:\n  dropout: {type: float, low: 0, high: 1.5}\n", "out of range"),
    ("space:\n  dropout: {type: float, low: 0, high: 0.5, log: true, step: 0.1}\n", "log and step"),
    ("space:\n  dropout: {type: float, low: 0, high: 0.5}\nfixed: {dropout: 0.1}\n", "also in space"),
    ("space:\n  dropout: {type: float, low: 0, high: 0.5}\nfixed: {batch_size: big}\n", "expected an integer"),
    ("space:\n  dropout: {type: float, high: 0.5}\n", "'low' is required"),
    ("space: {}\n", "at least one dimension"),
    ("space:\n  dropout: {type: float, low: 0, high: 0.5}\nobjective: {metric: test_accuracy}\n", "per-epoch metric"),
    ("space:\n  dropout: {type: float, low: 0, high: 0.5}\nobjective: {metric: val_loss}\n", "wrong way"),
    ("space:\n  dropout: {type: float, low: 0, high: 0.5}\nepochs: 0\n", "out of range"),
    ("space:\n  dropout: {type: float, low: 0, high: 0.5}\ntrials: null\n", "give a budget"),
    ("space:\n  dropout: {type: float, low: 0, high: 0.5}\nsampler: {name: grid}\n", "not one of"),
    ("space: [1, 2\n", "invalid YAML: line"),
    ("- just a list\n", "mapping of settings"),
])
def test_malformed_sweeps_are_one_line_config_errors(text: str, fragment: str) -> None:
    message = error(text)
    assert message.startswith("sweeps/x.yaml")
    assert fragment in message


def test_unknown_sweep_lists_the_existing_ones() -> None:
    with pytest.raises(ConfigError, match="unknown sweep 'lr_dropuot': did you mean 'lr_dropout'"):
        load_sweep("lr_dropuot")


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a\0b", "", "a/b"])
def test_names_that_escape_are_refused(name: str) -> None:
    with pytest.raises(ConfigError, match="invalid sweep name"):
        check_name(name)


def test_sweep_file_by_path(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(GOOD)
    sweep = load_sweep(str(path))
    assert sweep.name == "mine" and sweep.path == path and len(sweep.content_hash) == 64


def test_deterministic_defaults_on_and_can_be_turned_off() -> None:
    assert parse(GOOD).deterministic is True
    assert parse(GOOD + "deterministic: false\n").deterministic is False
    assert "deterministic: expected true or false" in error(GOOD + "deterministic: maybe\n")


def test_sweep_keeps_its_text_and_hash() -> None:
    import hashlib

    sweep = parse(GOOD)
    assert sweep.text == GOOD and sweep.content_hash == hashlib.sha256(GOOD.encode()).hexdigest()


def test_train_values_round_trip_through_mlflow_strings() -> None:
    import dataclasses

    from cifar_exp.config.values import train_values_from_strings

    cfg = TrainConfig(learning_rate=0.000123456789, batch_norm=False, activation="gelu", blocks=4, flip=False)
    logged = {k: str(v) for k, v in dataclasses.asdict(cfg).items()} | {"seed": "7", "epochs": "3"}
    assert TrainConfig(**train_values_from_strings(logged, "run x")) == cfg
    with pytest.raises(ConfigError, match="run x: param blocks: expected an integer, got 'three'"):
        train_values_from_strings({"blocks": "three"}, "run x")
    with pytest.raises(ConfigError, match="param activation: 'swish' is not one of"):
        train_values_from_strings({"activation": "swish"}, "run x")


CONDITIONAL = """
space:
  lr_schedule: {type: categorical, choices: [constant, step, cosine_warmup]}
  step_factor: {type: float, low: 0.1, high: 0.5, when: {lr_schedule: step}}
  step_stages: {type: int, low: 2, high: 4, when: {step_factor_mode: on}}
"""


def test_conditions_are_parsed_and_sorted_parents_first() -> None:
    sweep = parse("""
space:
  warmup_epochs: {type: int, low: 1, high: 3, when: {lr_schedule: [cosine_warmup, one_cycle]}}
  lr_schedule: {type: categorical, choices: [constant, cosine_warmup, one_cycle]}
  frozen_layers: {type: int, low: 0, high: 100, when: {model: transfer}}
  model: {type: categorical, choices: [cnn, transfer]}
  fine_tune_layers: {type: int, low: 1, high: 20, when: {model: transfer}}
""")
    assert list(sweep.space) == ["lr_schedule", "warmup_epochs", "model", "frozen_layers", "fine_tune_layers"]
    assert sweep.space["warmup_epochs"].when == (("lr_schedule", ("cosine_warmup", "one_cycle")),)
    assert sweep.active("warmup_epochs", {"lr_schedule": "one_cycle"})
    assert not sweep.active("warmup_epochs", {"lr_schedule": "constant"})


def test_nested_conditions_follow_inactive_parents() -> None:
    sweep = parse("""
space:
  optimizer: {type: categorical, choices: [adam, sgd]}
  nesterov: {type: categorical, choices: [true, false], when: {optimizer: sgd}}
  momentum: {type: float, low: 0.5, high: 0.99, when: {nesterov: true}}
""")
    assert sweep.active("momentum", {"optimizer": "sgd", "nesterov": True})
    assert not sweep.active("momentum", {"optimizer": "sgd", "nesterov": False})
    assert not sweep.active("momentum", {"optimizer": "adam"})  # nesterov inactive, so momentum too
    assert sweep.logged_params({"optimizer": "adam"}).keys() >= {"optimizer", "learning_rate"}
    assert not {"nesterov", "momentum"} & sweep.logged_params({"optimizer": "adam"}).keys()


@pytest.mark.parametrize("text, fragment", [
    (CONDITIONAL, "condition on 'step_factor_mode', which is neither in space nor in fixed"),
    ("space:\n  lr_schedule: {type: categorical, choices: [constant, step]}\n"
     "  step_factor: {type: float, low: 0.1, high: 0.5, when: {lr_schedule: cosine}}\n",
     "'step_factor' depends on lr_schedule=cosine, which is not among lr_schedule's choices (constant, step)"),
    ("space:\n  lr_schedule: {type: categorical, choices: [constant, step]}\n"
     "  step_factor: {type: float, low: 0.1, high: 0.5, when: {lr_schedule: stpe}}\n", "'stpe' is not one of"),
    ("space:\n  step_factor: {type: float, low: 0.1, high: 0.5, when: {lr_schedule: step}}\n"
     "fixed: {lr_schedule: constant}\n", "'step_factor' would never be searched: fixed lr_schedule is constant"),
    ("space:\n  dropout: {type: float, low: 0.1, high: 0.5, when: {blocks: 2}}\n"
     "  blocks: {type: int, low: 1, high: 3}\n", "conditions need a categorical one"),
    ("space:\n  model: {type: categorical, choices: [cnn, transfer], when: {backbone: vgg16}}\n"
     "  backbone: {type: categorical, choices: [vgg16, resnet50], when: {model: transfer}}\n",
     "conditions form a cycle (model -> backbone -> model)"),
    ("space:\n  dropout: {type: float, low: 0.1, high: 0.5, when: {}}\n", "name at least one dimension"),
    ("space:\n  dropout: {type: float, low: 0.1, high: 0.5, when: {dropout: 0.2}}\n", "cannot depend on itself"),
    ("space:\n  frozen_layers: {type: int, low: 0, high: 10}\nfixed: {frozen_fraction: 0.5}\n",
     "frozen_layers and frozen_fraction both set"),
    ("space:\n  weights: {type: categorical, choices: [imagenet, /no/such.weights.h5]}\n",
     "'/no/such.weights.h5' is neither imagenet, none, nor an existing weights file"),
])
def test_bad_conditions_name_both_sides(text: str, fragment: str) -> None:
    assert fragment in error(text)


def test_possible_values_say_which_imagenet_backbones_a_sweep_needs() -> None:
    sweep = parse("space:\n  backbone: {type: categorical, choices: [vgg16, xception]}\n"
                  "fixed: {model: transfer}\n")
    assert sweep.imagenet_backbones() == ("vgg16", "xception")
    assert parse(GOOD).imagenet_backbones() == ()  # the CNN needs none
    none = parse("space:\n  backbone: {type: categorical, choices: [vgg16]}\nfixed: {model: transfer, weights: none}\n")
    assert none.imagenet_backbones() == ()


def test_a_hypermodel_sweep_needs_no_space_and_takes_only_what_applies() -> None:
    sweep = parse("hypermodel: my_models.cifar:build_model\nfixed: {batch_size: 64}\n")
    assert sweep.hypermodel == "my_models.cifar:build_model" and not sweep.space
    assert set(sweep.logged_params({})) == {"batch_size", "flip", "translate", "cutout"}
    assert "does not apply with a hypermodel" in error("hypermodel: m:build\nfixed: {blocks: 2}\n")
    assert "is not module:attribute" in error("hypermodel: ../evil.py\n")


@pytest.mark.parametrize("path", sorted((Path(__file__).parent / "sweeps").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_test_sweep_loads(path: Path) -> None:
    assert load_sweep(str(path)).description


SCHEDULE_PARAMS = {"step_stages", "step_factor", "decay_rate", "warmup_epochs", "warmup_fraction", "plateau_factor",
                   "plateau_patience"}


@pytest.mark.parametrize("name", sorted(available_sweeps()))
def test_every_shipped_sweep_logs_the_settings_that_apply_and_no_others(name: str) -> None:
    import optuna

    from cifar_exp.sweep import space

    sweep = load_sweep(name)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        sampled = space.suggest(trial, sweep)
        cfg = sweep.train_config(sampled)
        logged = sweep.logged_params(sampled)
        for key in dataclasses.asdict(cfg):
            expected = key in sampled or (key not in sweep.space and applies(key, cfg))
            assert (key in logged) == expected, (key, sampled)
        # the schedule's own settings, and nothing of the schedules it does not use
        owned = {"step": {"step_stages", "step_factor"}, "exponential": {"decay_rate"},
                 "cosine_warmup": {"warmup_epochs"}, "one_cycle": {"warmup_fraction"},
                 "plateau": {"plateau_factor", "plateau_patience"}}.get(cfg.lr_schedule, set())
        assert SCHEDULE_PARAMS & set(logged) == owned, (cfg.lr_schedule, set(logged))
        assert ("momentum" in logged) == (cfg.optimizer == "sgd")
        assert ("backbone" in logged) == (cfg.model == "transfer") and ("blocks" in logged) != (cfg.model == "transfer")
        study.tell(trial, 0.0)


def test_applies_follows_the_model_family_optimizer_and_schedule() -> None:
    cnn, sgd = TrainConfig(), TrainConfig(optimizer="sgd", lr_schedule="step")
    transfer = TrainConfig(model="transfer", dense_units=0, fine_tune_epochs=2)
    assert applies("bn_momentum", cnn) and not applies("bn_momentum", TrainConfig(batch_norm=False))
    assert not applies("backbone", cnn) and applies("backbone", transfer) and not applies("blocks", transfer)
    assert not applies("activation", transfer) and applies("fine_tune_learning_rate", transfer)
    assert applies("frozen_fraction", transfer) and not applies("frozen_layers", transfer)
    assert not applies("momentum", cnn) and applies("momentum", sgd) and applies("weight_decay", sgd)
    assert applies("step_factor", sgd) and not applies("decay_rate", sgd) and not applies("step_factor", cnn)
    assert not applies("base_batch_size", cnn) and applies("base_batch_size", TrainConfig(lr_scaling="linear"))


@pytest.mark.parametrize("name", sorted(available_sweeps()))
def test_no_shipped_sweep_runs_batchnorm_at_keras_long_run_momentum(name: str) -> None:
    # 0.99 kept validation at chance in 3-epoch runs on 5,000 images (README, "Short runs").
    sweep = load_sweep(name)
    if "bn_momentum" not in sweep.space:
        assert sweep.train_config({}).bn_momentum <= 0.9
    assert TrainConfig().bn_momentum == 0.9


def test_a_sweep_file_may_train_on_a_subset() -> None:
    assert parse("space:\n  dropout: {type: float, low: 0.1, high: 0.5}\ndata: {train_images: 5000}\n"
                 ).data.train_images == 5000
    assert "data.train_images: 0 is out of range" in error("space:\n  dropout: {type: float, low: 0.1, high: 0.5}\n"
                                                          "data: {train_images: 0}\n")
