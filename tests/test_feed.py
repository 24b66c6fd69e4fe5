"""The device loop (``training.feed``) on 64 synthetic images: under JAX it trains what ``fit``
trains, to float tolerance; a run of it again is bit for bit the same; a seen structure compiles
nothing; a checkpointed run resumes bit for bit. Under TensorFlow, and on the CPU by default,
trials feed with ``fit``."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from cifar_exp import data
from cifar_exp.config import TrainConfig
from cifar_exp.training import feed, train
from cifar_exp.training.programs import Programs
from tests.conftest import backend, synthetic_splits
from tests.test_checkpoints import killed_then_resumed, numbers

pytestmark = pytest.mark.keras  # run again under every backend (README, "Test")

# Dropout, flip and translate (their seed generators), a per-step schedule (the optimizer's
# iteration count inside the loop).
CFG = TrainConfig(blocks=2, filters=4, convs_per_block=1, dense_units=8, batch_size=16, dropout=0.2, head_dropout=0.1,
                  flip=True, translate=0.1, lr_schedule="cosine", learning_rate=0.01)
JAX = backend() == "jax"


@pytest.fixture(scope="module")
def splits() -> data.Splits:
    return synthetic_splits()


def run(splits: data.Splits, feeding: str, cfg: TrainConfig = CFG, **options: object) -> train.TrainResult:
    result = train.train(cfg, splits, epochs=2, seed=7,
                         options=train.TrainOptions(feeding=feeding, **options))  # type: ignore[arg-type]
    keras.backend.clear_session()
    return result


def device_loop_here(splits: data.Splits) -> bool:
    """Whether this backend has the device loop; under TensorFlow, checks that asking for it is
    refused before anything trains (the TensorFlow run's part of each test below)."""
    if not JAX:
        with pytest.raises(ValueError, match="KERAS_BACKEND=jax only"):
            run(splits, "device")
    return JAX


def test_trials_feed_with_fit_on_the_cpu_and_under_tensorflow() -> None:
    assert feed.choose("auto", CFG, custom=False) == "fit"  # this machine has no accelerator
    assert feed.choose("fit", CFG, custom=False) == "fit"
    with pytest.raises(ValueError, match="device loop trains this project's CNN and airbench models"):
        feed.choose("device", CFG, custom=True)  # a hypermodel trains as it was compiled: fit
    with pytest.raises(ValueError, match="device loop"):
        feed.choose("device", TrainConfig(model="transfer", weights="none"), custom=False)
    if not JAX:
        with pytest.raises(ValueError, match="KERAS_BACKEND=jax only"):
            feed.choose("device", CFG, custom=False)


def test_the_device_loop_trains_what_fit_trains_to_float_tolerance(splits: data.Splits) -> None:
    if not device_loop_here(splits):
        return
    # The same steps on the same batches with the same random draws (the seed generators' state
    # goes through stateless_call in both); only the two compiled programs' fusion and reduction
    # order differ. Measured on this machine: 1e-6 in the loss after 2 epochs; 1e-5 allows ten times that.
    fitted, looped = run(splits, "fit"), run(splits, "device")
    assert (fitted.feed, looped.feed) == ("fit", "device")
    assert set(numbers(looped.history)) == set(numbers(fitted.history))
    for key, values in numbers(fitted.history).items():
        np.testing.assert_allclose(looped.history[key], values, rtol=1e-5, atol=1e-5, err_msg=key)
    np.testing.assert_allclose(looped.y_prob, fitted.y_prob, atol=1e-5)


def test_a_device_loop_run_again_is_bit_for_bit_the_same(splits: data.Splits) -> None:
    if not device_loop_here(splits):
        return
    first, again = run(splits, "device"), run(splits, "device")
    assert numbers(first.history) == numbers(again.history)
    assert np.array_equal(first.y_prob, again.y_prob)


def test_a_seen_structure_compiles_nothing_in_the_device_loop(splits: data.Splits, compiles_afresh: None) -> None:
    if not device_loop_here(splits):
        return
    kept = Programs()
    first = train.train(CFG, splits, epochs=2, seed=7, options=train.TrainOptions(feeding="device", programs=kept))
    other = TrainConfig(**{**CFG.__dict__, "learning_rate": 0.003, "dropout": 0.3})  # runtime values only
    second = train.train(other, splits, epochs=2, seed=8, options=train.TrainOptions(feeding="device", programs=kept))
    keras.backend.clear_session()
    assert first.compiled == "new" and first.compilations
    assert second.compiled == "reused" and second.compilations == 0
    # its own build and programs
    fresh = train.train(other, splits, epochs=2, seed=8, options=train.TrainOptions(feeding="device"))
    keras.backend.clear_session()
    assert numbers(second.history) == numbers(fresh.history)  # the reused program: a fresh build's numbers


def test_a_device_loop_run_resumes_from_its_checkpoint_bit_for_bit(splits: data.Splits, tmp_path: Path) -> None:
    if not device_loop_here(splits):
        return
    whole = run(splits, "device")
    resumed, _ = killed_then_resumed(CFG, splits, tmp_path / "k.npz", 2, 0, feeding="device")
    assert numbers(resumed.history) == numbers(whole.history) and np.array_equal(resumed.y_prob, whole.y_prob)
