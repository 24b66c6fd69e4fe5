"""Checkpoints on 64 synthetic images: a run killed after epoch k and resumed from its checkpoint
gives the uninterrupted run's numbers bit for bit (both phases of transfer learning included);
a checkpoint of another run, or one that cannot be read, is ignored."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import keras
import numpy as np
import pytest

from cifar_exp import data
from cifar_exp.config import TrainConfig
from cifar_exp.sweep import sidecar
from cifar_exp.training import checkpoints, train
from tests.conftest import synthetic_splits

pytestmark = pytest.mark.keras  # run again under every backend (README, "Test")

SMALL = dict(blocks=2, filters=4, convs_per_block=1, dense_units=8)
TIMES = {"epoch_seconds", "images_per_second"}  # the clock's, not the run's numbers


class Died(Exception):
    """Stands for the worker's death after an epoch: raised by a hook, before that epoch's checkpoint."""


@pytest.fixture(scope="module")
def splits() -> data.Splits:
    return synthetic_splits()


def numbers(history: dict[str, list[float]]) -> dict[str, list[float]]:
    return {k: v for k, v in history.items() if k not in TIMES}


def killed_then_resumed(cfg: TrainConfig, splits: data.Splits, path: Path, epochs: int, dies_at: int | tuple[int, ...],
                        programs: object = None, **options: object) -> tuple[train.TrainResult, dict[str, list[float]]]:
    """Train until the hook of epoch ``dies_at`` raises (that epoch's checkpoint is written before
    the callbacks hear it), then again with the same checkpoint: the last result and the metrics
    its ``on_resume`` received. With several epochs, the run dies at
    each in turn, every run after the first resuming from the checkpoint the one before left (a
    resumed run's own checkpoints are then what the next resumes from). ``options`` go to every
    ``train`` call."""
    slot = checkpoints.Slot(path)
    for death in (dies_at,) if isinstance(dies_at, int) else dies_at:

        def die(epoch: int, logs: object, death: int = death) -> None:
            if epoch == death:
                raise Died()

        with pytest.raises(Died):
            train.train(cfg, splits, epochs=epochs, seed=7, callbacks=[train.Observer(on_epoch_end=die)],
                        options=train.TrainOptions(checkpoint=slot, programs=programs,  # type: ignore[arg-type]
                                                   **options))  # type: ignore[arg-type]
        keras.backend.clear_session()
    replayed: dict[str, list[float]] = {}
    resumed = train.train(cfg, splits, epochs=epochs, seed=7, callbacks=[train.Observer(on_resume=replayed.update)],
                          options=train.TrainOptions(checkpoint=slot, programs=programs,  # type: ignore[arg-type]
                                                     **options))  # type: ignore[arg-type]
    keras.backend.clear_session()
    return resumed, replayed


CASES = {
    # dropout, both augmentations and cutout (seed generators), the plateau rule's state
    "cnn-plateau": dict(**SMALL, dropout=0.2, head_dropout=0.1, flip=True, translate=0.1, cutout=4,
                        lr_schedule="plateau", plateau_patience=1, plateau_factor=0.5, learning_rate=0.05,
                        batch_size=16),
    # a per-step schedule on SGD's momentum: the iteration count and the momentum slots
    "cnn-sgd-one-cycle": dict(**SMALL, optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=5e-4,
                              lr_schedule="one_cycle", warmup_fraction=0.3, learning_rate=0.05, batch_size=12),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_run_resumed_after_epoch_k_equals_the_uninterrupted_run_bit_for_bit(
        splits: data.Splits, tmp_path: Path, case: str) -> None:
    cfg = TrainConfig(**CASES[case])
    whole = train.train(cfg, splits, epochs=4, seed=7,
                        options=train.TrainOptions(checkpoint=checkpoints.Slot(tmp_path / "whole.npz")))
    keras.backend.clear_session()
    # stopped at the end of epoch 0 (resumed from epoch 0's checkpoint), then at the end of epoch 2
    # (from epoch 2's, which the resumed run wrote), then resumed to the end
    resumed, replayed = killed_then_resumed(cfg, splits, tmp_path / "killed.npz", 4, (0, 2))
    assert [len(v) for v in replayed.values()] == [3] * len(replayed)  # epochs 0..2 from the checkpoint
    assert numbers(resumed.history) == numbers(whole.history)
    assert np.array_equal(resumed.y_prob, whole.y_prob)
    assert resumed.test_loss == whole.test_loss


def test_a_resumed_run_on_a_reused_program_equals_the_uninterrupted_run(splits: data.Splits, tmp_path: Path) -> None:
    from cifar_exp.training.programs import Programs

    cfg = TrainConfig(**CASES["cnn-plateau"])
    whole = train.train(cfg, splits, epochs=3, seed=7)
    keras.backend.clear_session()
    kept = Programs()
    resumed, _ = killed_then_resumed(cfg, splits, tmp_path / "killed.npz", 3, 0, programs=kept)
    assert resumed.compiled == "reused" and numbers(resumed.history) == numbers(whole.history)
    assert np.array_equal(resumed.y_prob, whole.y_prob)


def test_transfer_learning_resumes_at_the_turn_and_in_phase_two_bit_for_bit(tmp_path: Path) -> None:
    # epoch 0 with the backbone frozen, 1 and 2 fine-tuning (a second optimizer); phase one alone
    # resumes as the CNN cases do. One batch an epoch (30 images, the fewest that leave a stratified
    # validation split of 10): VGG16's epochs are what this test pays for (48 images in batches of
    # 16 took 54 s under JAX on the 2-core CPU machine, most of it training).
    splits = synthetic_splits(40)
    cfg = TrainConfig(model="transfer", weights="none", backbone="vgg16", frozen_layers=15, dense_units=0,
                      head="global_avg", head_dropout=0.0, flip=False, translate=0.0, fine_tune_epochs=2,
                      fine_tune_layers=6, fine_tune_learning_rate=1e-4, learning_rate=1e-3, batch_size=32)
    whole = train.train(cfg, splits, epochs=3, seed=7)
    keras.backend.clear_session()
    # stopped at the turn (the end of phase one: resumed into phase two), then within phase two
    # (resumed with its optimizer restored)
    resumed, replayed = killed_then_resumed(cfg, splits, tmp_path / "killed.npz", 3, (0, 1))
    assert [len(v) for v in replayed.values()] == [2] * len(replayed)
    assert numbers(resumed.history) == numbers(whole.history)
    assert np.array_equal(resumed.y_prob, whole.y_prob)


def test_a_trial_stopped_at_an_epochs_end_keeps_that_epochs_checkpoint(splits: data.Splits, tmp_path: Path) -> None:
    """An engine that stops training at an epoch's end (an interruption, pruning, the time limit)
    raises from a callback: the epoch's checkpoint is already written, so its retry resumes after
    it (with the checkpoint written last, a SIGTERM at the first epoch's end left none)."""
    cfg = TrainConfig(**SMALL, batch_size=16)
    slot = checkpoints.Slot(tmp_path / "c.npz")

    def stop(epoch: int, logs: object) -> None:
        raise Died()

    with pytest.raises(Died):
        train.train(cfg, splits, epochs=3, seed=7, callbacks=[train.Observer(on_epoch_end=stop)],
                    options=train.TrainOptions(checkpoint=slot))
    keras.backend.clear_session()
    replayed: dict[str, list[float]] = {}
    train.train(cfg, splits, epochs=3, seed=7, callbacks=[train.Observer(on_resume=replayed.update)],
                options=train.TrainOptions(checkpoint=slot))
    keras.backend.clear_session()
    assert len(replayed["loss"]) == 1  # epoch 0, kept though its callbacks stopped the run


def test_a_run_that_died_after_its_last_epoch_resumes_with_its_trained_weights(
        splits: data.Splits, tmp_path: Path) -> None:
    cfg = TrainConfig(**SMALL, batch_size=16)
    slot = checkpoints.Slot(tmp_path / "c.npz")
    # the checkpoint of epoch 1
    whole = train.train(cfg, splits, epochs=2, seed=7, options=train.TrainOptions(checkpoint=slot))
    keras.backend.clear_session()
    replayed: dict[str, list[float]] = {}
    watch = train.Observer(on_resume=replayed.update,
                           on_epoch_end=lambda e, logs: pytest.fail("nothing is left to train"))
    again = train.train(cfg, splits, epochs=2, seed=7, callbacks=[watch], options=train.TrainOptions(checkpoint=slot))
    assert len(replayed["loss"]) == 2 and np.array_equal(again.y_prob, whole.y_prob)


def test_a_checkpoint_of_another_run_or_a_broken_one_is_ignored(splits: data.Splits, tmp_path: Path) -> None:
    cfg = TrainConfig(**SMALL, batch_size=16)
    path = tmp_path / "c.npz"
    slot = checkpoints.Slot(path)
    train.train(cfg, splits, epochs=2, seed=7, options=train.TrainOptions(checkpoint=slot))
    keras.backend.clear_session()
    assert checkpoints.load(checkpoints.Slot(path), "another run") is None
    seen: list[int] = []
    watch = train.Observer(on_resume=lambda h: pytest.fail("resumed"), on_epoch_end=lambda e, logs: seen.append(e))
    other = train.train(cfg, splits, epochs=2, seed=8, callbacks=[watch], options=train.TrainOptions(checkpoint=slot))
    assert seen == [0, 1] and len(other.history["loss"]) == 2  # another seed: trained from epoch 0
    path.write_bytes(path.read_bytes()[:100])  # torn
    keras.backend.clear_session()
    seen.clear()
    train.train(cfg, splits, epochs=2, seed=8, callbacks=[watch], options=train.TrainOptions(checkpoint=slot))
    assert seen == [0, 1]


def test_a_checkpoint_write_that_fails_warns_and_training_goes_on(splits: data.Splits, tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.warns(UserWarning, match="checkpoint of epoch 0 not written"):
        result = train.train(TrainConfig(**SMALL, batch_size=16), splits, epochs=2, seed=7,
                             options=train.TrainOptions(checkpoint=checkpoints.Slot(blocked / "c.npz")))
    assert len(result.history["loss"]) == 2


def test_leftover_checkpoints_are_dropped_but_those_kept(tmp_path: Path) -> None:
    storage = str(tmp_path / "optuna.journal")
    for number in (0, 1, 2):
        sidecar.checkpoint(storage, "demo", number).parent.mkdir(parents=True, exist_ok=True)
        sidecar.checkpoint(storage, "demo", number).write_bytes(b"x")
    torn = sidecar.checkpoint(storage, "demo", 1).with_name("1.npz.123.tmp")
    torn.write_bytes(b"x")
    dropped = sidecar.drop_checkpoints(storage, "demo", keep={1})
    assert sorted(p.name for p in dropped) == ["0.npz", "1.npz.123.tmp", "2.npz"]
    assert [p.name for p in sidecar.checkpoint(storage, "demo", 0).parent.iterdir()] == ["1.npz"]
    assert sidecar.checkpoint("postgresql://h/db", "demo", 3).parent.parent == Path("mlruns/checkpoints/demo")


def test_two_storages_in_one_folder_keep_their_checkpoints_apart(tmp_path: Path) -> None:
    a, b = str(tmp_path / "a.journal"), str(tmp_path / "b.journal")
    assert sidecar.checkpoint(a, "demo", 0) != sidecar.checkpoint(b, "demo", 0)
    assert sidecar.checkpoint(a, "demo", 0).parent.parent == tmp_path / "checkpoints" / "demo"
    sidecar.checkpoint(a, "demo", 0).parent.mkdir(parents=True)
    sidecar.checkpoint(a, "demo", 0).write_bytes(b"x")
    assert sidecar.drop_checkpoints(b, "demo", keep=set()) == []  # b's start leaves a's alone
    assert sidecar.checkpoint(a, "demo", 0).exists()
    # one storage however written: a relative path, an absolute one
    relative = os.path.relpath(a)
    assert sidecar.checkpoint(relative, "demo", 0).resolve() == sidecar.checkpoint(a, "demo", 0).resolve()
    # one rule for every storage kind: a SQLite database's sidecar folder is its own folder
    assert sidecar.folder(f"sqlite:///{tmp_path}/optuna.db") == tmp_path


def test_a_checkpoint_of_another_owner_is_ignored_with_a_log_line(splits: data.Splits, tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    cfg = TrainConfig(**SMALL, batch_size=16)
    path = tmp_path / "0.npz"
    study_a = {"storage": "/x/a.journal", "study": "demo", "study_id": "0", "trial_id": "0", "data_checksum": "A"}
    train.train(cfg, splits, epochs=2, seed=7,
                options=train.TrainOptions(checkpoint=checkpoints.Slot(path, study_a)))
    keras.backend.clear_session()
    for differs in ({"storage": "/x/b.journal"}, {"data_checksum": "B"}, {"trial_id": "5"}, {"study_id": "1"}):
        caplog.clear()
        slot = checkpoints.Slot(path, {**study_a, **differs})
        with caplog.at_level(logging.WARNING, logger="cifar_exp"):
            assert checkpoints.load(slot, "any") is None
        (key, value), = differs.items()
        assert f"it belongs to another trial ({key} {study_a[key]!r}, not {value!r})" in caplog.text
    # the same configuration, seed and data shapes, but study b's trial: trained from epoch 0
    seen: list[int] = []
    watch = train.Observer(on_resume=lambda h: pytest.fail("resumed another study's checkpoint"),
                           on_epoch_end=lambda e, logs: seen.append(e))
    train.train(cfg, splits, epochs=2, seed=7, callbacks=[watch],
                options=train.TrainOptions(checkpoint=checkpoints.Slot(path, {**study_a, "study_id": "1"})))
    assert seen == [0, 1]


def test_only_a_regular_file_is_read_or_deleted_as_a_checkpoint(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    fifo, folder = tmp_path / "0.npz", tmp_path / "1.npz"
    os.mkfifo(fifo)  # a read would block forever: no writer ever comes
    folder.mkdir()
    with caplog.at_level(logging.WARNING, logger="cifar_exp"):
        loaded: list[object] = []
        reader = threading.Thread(target=lambda: loaded.append(checkpoints.load(checkpoints.Slot(fifo), "any")),
                                  daemon=True)
        reader.start()
        reader.join(timeout=60)  # a deadline, not a verdict: a blocked read never returns at all
        assert loaded == [None]
        assert checkpoints.load(checkpoints.Slot(folder), "any") is None
        checkpoints.discard(fifo)
        checkpoints.discard(folder)
    assert "not a regular file" in caplog.text
    assert fifo.exists() and folder.is_dir()  # not ours: left alone
    storage = str(tmp_path / "optuna.journal")
    where = sidecar.checkpoint(storage, "demo", 2)
    where.mkdir(parents=True)  # a folder where trial 2's checkpoint goes: the sweep's end drops nothing of it
    assert sidecar.drop_checkpoints(storage, "demo", keep=set()) == [] and where.is_dir()
