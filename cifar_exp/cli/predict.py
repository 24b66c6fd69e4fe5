"""``cifar-exp predict IMAGE...``: the top-k classes of image files by a logged or registered model."""

from __future__ import annotations

import argparse
import json

from cifar_exp.cli import arguments
from cifar_exp.cli.arguments import DEFAULT_MODEL
from cifar_exp.cli.environment import open_store, quiet_keras
from cifar_exp.config import DEFAULT_STORAGE

DESCRIPTION = ("Top-k classes with probabilities for image files (any size; resized to the model's input), "
               "from a logged or registered model.")
SUMMARY = "classify image files"  # its line in cifar-exp --help


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model URI (default {DEFAULT_MODEL})")
    p.add_argument("--top-k", type=arguments.positive(int, "--top-k"), default=3, help="classes per image (default 3)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    arguments.tracking(p)


def run(args: argparse.Namespace) -> int:
    open_store(args.tracking_uri, deterministic=False)
    from cifar_exp import registry

    decoded = registry.read_images(args.images)  # the inputs first: loading a model takes a minute
    quiet_keras(DEFAULT_STORAGE, "predict")
    model, names = registry.load(args.model)
    images = registry.resized(decoded, tuple(model.input_shape[1:3]))
    ranked = registry.top_k(registry.probabilities(model, images), names, args.top_k)
    if args.json:
        print(json.dumps([{"image": image, "predictions": [{"class": c, "probability": p} for c, p in top]}
                          for image, top in zip(args.images, ranked, strict=True)], indent=2))
        return 0
    width = max(len("image"), *(len(i) for i in args.images))
    print(f"{'image':<{width}}  {'rank':>4}  {'class':<12} probability")
    for image, top in zip(args.images, ranked, strict=True):
        for rank, (name, prob) in enumerate(top, 1):
            print(f"{image if rank == 1 else '':<{width}}  {rank:>4}  {name:<12} {prob:.4f}")
    return 0
