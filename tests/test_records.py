"""The typed records trials keep (``config.records``): what a record writes, the same class reads
back. (The engine contract of ``lifecycle.run_trial``: ``tests/test_engines.py``.)"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from cifar_exp.config import TrainConfig
from cifar_exp.config.records import RecipeError, TrialAttrs, TrialRecipe, trial_seed
from cifar_exp.config.sweepfile import load_sweep


class Attrs:
    """What ``TrialAttrs.of`` reads: anything with Optuna's ``user_attrs``."""

    def __init__(self, user_attrs: dict[str, Any]) -> None:
        self.user_attrs = user_attrs


def test_trial_attrs_read_back_what_they_encode() -> None:
    written = TrialAttrs.encode(worker_pid=12, worker_host="h", retry_of=3, seed=7, test_accuracy=0.5,
                                phases={"fit_seconds": 1.5}, degenerate="all one class")
    attrs = TrialAttrs.of(Attrs(written))
    assert (attrs.worker_pid, attrs.worker_host, attrs.retry_of, attrs.seed) == (12, "h", 3, 7)
    assert attrs.test_accuracy == 0.5 and attrs.degenerate == "all one class"
    assert attrs.phases == {"fit_seconds": 1.5}
    assert TrialAttrs.of(Attrs({})) == TrialAttrs()  # a fresh trial: every field unset


def test_trial_attrs_refuse_a_key_no_field_names() -> None:
    with pytest.raises(TypeError, match="mlflow_runid"):
        TrialAttrs.encode(mlflow_runid="x")


def test_trial_seed_is_a_stable_31_bit_hash() -> None:
    assert trial_seed(0, 0) == trial_seed(0, 0) != trial_seed(0, 1) != trial_seed(1, 1)
    assert all(0 <= trial_seed(s, n) < 2**31 for s in range(3) for n in range(50))


def recipe() -> TrialRecipe:
    sweep = load_sweep("lr_dropout")
    return TrialRecipe(sweep=sweep.name, sweep_sha256=sweep.content_hash, sweep_seed=sweep.sampler.seed,
                       validation_fraction=0.1, train_images=400, data_source="data.zip", data_checksum="ab" * 32,
                       deterministic=True, seed=trial_seed(0, 4), epochs=3,
                       values={"learning_rate": 0.0031, "dropout": 0.25, "batch_size": 64, "optimizer": "adam"})


def test_a_recipe_reads_back_from_the_strings_mlflow_stores() -> None:
    written = recipe()
    # MLflow hands params and tags back as strings
    params = {key: str(value) for key, value in written.to_params().items()}
    tags = {key: str(value) for key, value in written.to_tags().items()}
    read = TrialRecipe.from_run("run1", params, tags, fields={f.name for f in dataclasses.fields(TrainConfig)})
    assert read == written


def test_a_recipe_missing_a_tag_names_the_run_and_the_tag() -> None:
    tags = {key: str(value) for key, value in recipe().to_tags().items() if key != "sweep_seed"}
    with pytest.raises(RecipeError, match="run run1 has no 'sweep_seed' tag"):
        TrialRecipe.from_run("run1", {k: str(v) for k, v in recipe().to_params().items()}, tags)


def test_a_recipe_with_an_unreadable_number_is_a_recipe_error() -> None:
    params = {key: str(value) for key, value in recipe().to_params().items()} | {"seed": "x1"}
    with pytest.raises(RecipeError, match="run run1: a seed, epochs or split value is not a number"):
        TrialRecipe.from_run("run1", params, recipe().to_tags())
