"""The arguments several commands share, and argparse types that refuse bad input in one line."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

from cifar_exp.config import DEFAULT_STORAGE, DEFAULT_SWEEP, DEFAULT_TRACKING_URI

DEFAULT_MODEL = f"models:/cifar10-{DEFAULT_SWEEP}@champion"  # the main job's champion


def number(kind: type, flag: str, ok: Callable[[Any], bool], requirement: str) -> Callable[[str], Any]:
    """An argparse type: ``kind(text)`` that satisfies ``ok``, else a one-line error."""
    def parse(text: str) -> Any:
        try:
            if not text.isascii():  # int() and float() read other scripts' digits: '٥' is 5 to them
                raise ValueError(text)
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes a number, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{flag} must be {requirement}, got {text}")
        return value
    return parse


def positive(kind: type, flag: str) -> Callable[[str], Any]:
    return number(kind, flag, lambda v: v > 0, "greater than 0")


def gpus(text: str) -> tuple[str, ...]:
    gpus = tuple(g.strip() for g in text.split(","))
    if not all(g.isascii() and g.isdigit() for g in gpus):
        raise argparse.ArgumentTypeError(f"--gpus {text!r}: give GPU indices separated by commas, e.g. --gpus 0,1")
    return gpus


def tracking(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI),
                   help=f"MLflow tracking and registry URI (default $MLFLOW_TRACKING_URI or {DEFAULT_TRACKING_URI})")


def storage(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage", default=DEFAULT_STORAGE,
                   help=f"Optuna storage: journal file path or database URL (default {DEFAULT_STORAGE})")


def study_name(p: argparse.ArgumentParser) -> None:
    p.add_argument("--study", metavar="STUDY",
                   help="the study's own name, when it is not the sweep's (as given to cifar-exp sweep --study)")


def study(p: argparse.ArgumentParser) -> None:
    """What the commands that read a finished study take: its sweep, and where study and runs are."""
    p.add_argument("name", help="sweep name or path to its .yaml file")
    study_name(p)
    storage(p)
    tracking(p)
