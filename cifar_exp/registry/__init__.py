"""After a sweep: register the best trial's model, promote it by alias, evaluate and predict.

Promotion uses aliases, not the deprecated stages: every registration points ``challenger`` at
the new version; ``champion`` moves to it only if it beats the current champion on the test set,
with both models evaluated now on the same images (numbers logged earlier may come from other
data). Models are loaded through ``track.models.load_model``: refused when loading could run foreign
code or unpickle, and read with Keras ``safe_mode`` on.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from optuna.trial import FrozenTrial

from cifar_exp import track
from cifar_exp.config import Sweep, UserError, outcomes
from cifar_exp.config.records import TrialAttrs
from cifar_exp.data import Cifar10
from cifar_exp.data.formats import CIFAR10_CLASSES
from cifar_exp.metrics import test_metrics

CHALLENGER, CHAMPION = "challenger", "champion"
PREDICT_BATCH = 1024


@dataclass(frozen=True)
class Promotion:
    version: track.models.Version
    trial: FrozenTrial
    accuracy: float  # the challenger's test accuracy, measured now
    champion: track.models.Version | None  # the champion before this registration
    champion_accuracy: float | None
    promoted: bool
    reason: str  # why it was or was not promoted


def load(model_uri: str) -> tuple[Any, list[str]]:
    """The Keras model at ``model_uri`` and its class names; ``UserError`` if it cannot be had safely."""
    try:
        model, names = track.models.load_model(model_uri)
    except track.models.UnsafeModel as exc:
        raise UserError(f"refusing to load {model_uri}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 (MlflowException (no such model/alias), OSError)
        raise UserError(f"cannot load {model_uri}: {str(exc).splitlines()[0]}") from None
    classes = int(model.output_shape[-1])
    if names is None:  # logged before class names were recorded: CIFAR-10's own order
        names = list(CIFAR10_CLASSES) if classes == len(CIFAR10_CLASSES) else [str(i) for i in range(classes)]
    return model, names


def probabilities(model: Any, images: np.ndarray) -> np.ndarray:
    return np.asarray(model.predict(np.asarray(images, dtype="float32"), batch_size=PREDICT_BATCH, verbose=0))


def accuracy(model_uri: str, test: Cifar10) -> float:
    model, _ = load(model_uri)
    return float(np.mean(probabilities(model, test.x_test).argmax(axis=1) == test.y_test))


def registrable(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The trials whose model may be registered: a logged model, not collected, not degenerate."""
    return [t for t in trials if TrialAttrs.of(t).model_uri and not TrialAttrs.of(t).degenerate]


def refuse_degenerate(trials: Sequence[FrozenTrial], sweep: Sweep, rule: outcomes.Rule | None) -> None:
    """``UserError`` naming the degenerate trial that would have been chosen (by ``rule``, or
    the ranking's best) among ``trials`` with logged models, if there is one: the caller found
    no other."""
    done = [t for t in trials if TrialAttrs.of(t).model_uri]
    would = rule.choose(done, sweep.objectives) if rule is not None else next(
        iter(outcomes.ranked(done, sweep.objectives)), None)
    if would is not None and TrialAttrs.of(would).degenerate:
        how = f"meets the rule ({rule})" if rule is not None else "is the best"
        raise UserError(f"trial {would.number} {how} but is degenerate ({TrialAttrs.of(would).degenerate}), and "
                        f"no sound trial does: a degenerate model is never registered; "
                        f"{'loosen --where, or ' if rule is not None else ''}run more trials")


def best_trial(trials: Sequence[FrozenTrial], sweep: Sweep, rule: outcomes.Rule | None = None) -> FrozenTrial:
    """The best feasible complete trial that logged a model and is not degenerate: the one
    ``rule`` picks on the Pareto front of those, or by default the first of ``outcomes.ranked``
    (with one objective, its best); ``UserError`` if there is none (naming a degenerate trial
    that would have been chosen)."""
    done = registrable(trials)
    ranked = outcomes.ranked(done, sweep.objectives)
    if not ranked:
        refuse_degenerate(trials, sweep, rule)
    if not ranked and any(t.state.name == "COMPLETE" for t in done):
        raise UserError("every completed trial with a logged model breaks the sweep's constraints: loosen "
                        "them, or run more trials")
    if not ranked:
        raise UserError("the study has no completed trial with a logged model yet: run the sweep first")
    if rule is None:
        return ranked[0]  # type: ignore[return-value]
    chosen = rule.choose(done, sweep.objectives)
    if chosen is None:
        refuse_degenerate(trials, sweep, rule)
        raise UserError(f"no trial on the Pareto front meets the rule ({rule}): loosen --where")
    return chosen  # type: ignore[return-value]


def _shown(name: str, value: float) -> str:
    return f"{name}={value:.0f}" if name == "param_count" else f"{name}={value:.4f}"


def describe(trial: FrozenTrial, sweep: Sweep, rule: outcomes.Rule | None = None) -> tuple[str, dict[str, Any]]:
    """The version's description and tags: the trial's params, metrics (its objectives and what
    it measured), run id and seed, and the rule that chose it."""
    attrs = TrialAttrs.of(trial)
    metrics: dict[str, float] = {**{o.metric: v for o, v in zip(sweep.objectives, trial.values, strict=True)},
                                 **attrs.judged()}
    tags = {"sweep": sweep.name, "trial": trial.number, "run_id": attrs.mlflow_run_id, "seed": attrs.seed,
            **trial.params, **metrics, **({"rule": str(rule)} if rule else {}),
            **({"degenerate": attrs.degenerate} if attrs.degenerate else {})}
    text = (f"Trial {trial.number} of sweep {sweep.name} (run {tags['run_id']}, seed {tags['seed']}).\n"
            + (f"DEGENERATE: {attrs.degenerate}; its numbers mean nothing.\n" if attrs.degenerate else "")
            + (f"Chosen by the rule: {rule}.\n" if rule else "")
            + f"Metrics: {', '.join(_shown(k, v) for k, v in metrics.items())}.\n"
            f"Params: {', '.join(f'{k}={v}' for k, v in trial.params.items())}.")
    return text, tags


def gone(trial: FrozenTrial) -> UserError:
    """The one-line error for a chosen trial whose logged model is not there any more."""
    return UserError(f"trial {trial.number}'s model ({TrialAttrs.of(trial).model_uri}) is gone (deleted by gc, or "
                     f"by hand): nothing was registered; register another trial (--pick, --where), or rerun this one")


def check_models(trials: Sequence[FrozenTrial]) -> None:
    """``UserError`` (``gone``) for the first of ``trials`` whose logged model is not there."""
    for trial in trials:
        if not track.models.model_exists(str(TrialAttrs.of(trial).model_uri)):
            raise gone(trial)


def register_version(name: str, trial: FrozenTrial, description: str, tags: dict[str, Any]) -> track.models.Version:
    """``trial``'s model registered as a version of ``name`` (``track.models.register``); ``gone``
    if its model is not there any more (and then no registered model is left empty)."""
    attrs = TrialAttrs.of(trial)
    try:
        return track.models.register(name, str(attrs.model_uri), str(attrs.mlflow_run_id), description, tags)
    except track.models.ModelGone:
        raise gone(trial) from None


def promote(sweep: Sweep, name: str, trials: Sequence[FrozenTrial], test: Cifar10,
            rule: outcomes.Rule | None = None) -> Promotion:
    """Register the best trial of ``trials`` (``best_trial``) as a version of ``name`` (once per
    run), point ``challenger`` at it, and make it ``champion`` if it beats the champion on ``test`` now."""
    trial = best_trial(trials, sweep, rule)
    description, tags = describe(trial, sweep, rule)
    version = register_version(name, trial, description, tags)
    champion = track.models.alias_version(name, CHAMPION)
    track.models.set_alias(name, CHALLENGER, version.version)
    mine = accuracy(f"models:/{name}/{version.version}", test)
    images = f"{len(test.y_test)} test images ({test.source})"
    if champion is None:
        track.models.set_alias(name, CHAMPION, version.version)
        return Promotion(version, trial, mine, None, None, True, f"first champion of {name}")
    if champion.version == version.version:
        return Promotion(version, trial, mine, champion, mine, False, f"version {version.version} is already champion")
    theirs = accuracy(f"models:/{name}/{champion.version}", test)
    if mine > theirs:
        track.models.set_alias(name, CHAMPION, version.version)
        return Promotion(version, trial, mine, champion, theirs, True,
                         f"test_accuracy {mine:.4f} beats champion version {champion.version}'s {theirs:.4f} "
                         f"on {images}")
    return Promotion(version, trial, mine, champion, theirs, False,
                     f"test_accuracy {mine:.4f} does not beat champion version {champion.version}'s {theirs:.4f} "
                     f"on {images}; champion unchanged")


def evaluate(model_uri: str, test: Cifar10, experiment: str, tags: dict[str, Any]) -> tuple[str, dict[str, float]]:
    """A fresh evaluation run of ``model_uri`` on ``test`` in ``experiment``: the test metrics and
    artifacts of a trial (confusion matrix, classification report, prediction grid).
    Returns ``(run id, metrics)``."""
    model, names = load(model_uri)
    if len(names) != len(test.class_names):
        raise UserError(f"{model_uri} predicts {len(names)} classes but the data has {len(test.class_names)}")
    y_prob = probabilities(model, test.x_test)
    metrics = test_metrics(y_prob, test.y_test)
    run_id = track.start_run(experiment, f"evaluate {model_uri}", {}, {**tags, "evaluated_model": model_uri})
    track.log_metrics(run_id, metrics)
    metrics.update(track.log_evaluation(run_id, test.x_test, test.y_test, y_prob, names, None,
                                        title=f"{model_uri} on {test.source}"))
    track.end_run(run_id, "FINISHED")
    return run_id, metrics


MAX_IMAGE_PIXELS = 4096 * 4096  # a photo to classify; bigger is refused from its header (a 12000x12000 took 2 GB)


def read_images(paths: Sequence[str]) -> list[Any]:
    """The image files ``paths`` decoded as RGB Pillow images; ``UserError`` names a file that is
    missing, not a regular file (a pipe would hang), not an image, not 8 bits a channel, or over
    ``MAX_IMAGE_PIXELS`` (checked from its header, before decoding)."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in paths:
        if not Path(path).exists():
            raise UserError(f"image {path} does not exist")
        if not Path(path).is_file():
            raise UserError(f"image {path} is not a regular file (a folder, pipe or device): give image files")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the bound below says it
                image = Image.open(Path(path))
            with image:
                if image.width * image.height > MAX_IMAGE_PIXELS:
                    raise UserError(f"image {path} is {image.width}x{image.height} pixels, over the "
                                    f"{MAX_IMAGE_PIXELS} this command decodes: resize it first")
                if image.mode in ("I", "F") or image.mode.startswith("I;"):
                    raise UserError(f"image {path} has pixel mode {image.mode} (16-bit or float): convert it to "
                                    f"8-bit RGB")
                images.append(image.convert("RGB"))
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
            raise UserError(f"image {path} is not a readable image ({type(exc).__name__})") from None
    return images


def resized(images: Sequence[Any], size: tuple[int, int]) -> np.ndarray:
    """``images`` (RGB Pillow images) as uint8 ``(N, height, width, 3)``, each resized to ``size``
    (bilinear, antialiased, as CIFAR-10's own downscaling)."""
    from PIL import Image

    return np.stack([np.asarray(rgb if rgb.size == (size[1], size[0]) else
                                rgb.resize((size[1], size[0]), Image.Resampling.BILINEAR, reducing_gap=None),
                                dtype=np.uint8) for rgb in images])


def top_k(y_prob: np.ndarray, names: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
    """Per image, the ``k`` most probable classes with their probabilities, most probable first."""
    k = min(k, y_prob.shape[1])
    order = np.argsort(-y_prob, axis=1, kind="stable")[:, :k]
    return [[(names[c], float(row[c])) for c in top] for row, top in zip(y_prob, order, strict=True)]
