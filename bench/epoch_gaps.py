"""Where a trial's wall time goes between Keras' epochs: the seconds of each epoch as Keras runs
it (``on_epoch_begin`` to ``on_epoch_end``) against the seconds between two epochs.

    python bench/epoch_gaps.py --data data/cifar10-jpeg.zip                 # the cpu sweep's CNN
    python bench/epoch_gaps.py --data data/cifar10-jpeg.zip --epochs 4 --sweep cpu

Trains the sweep's fixed settings (the middle of each searched range) on all its training
images (``--train-images N``: a class-balanced subset) through ``training.train.train``, as a
trial does (its checkpoint and best copy written after every epoch into a temporary folder;
``--no-checkpoint``: neither), and prints a line per epoch:

    epoch 2: in epoch 48.7 s, before it 35.2 s (epoch end -> train end 0.0 s, train end -> fit return
    34.8 s, fit return -> fit call 0.0 s, fit call -> train begin 0.4 s, train begin -> epoch begin 0.0 s)

"before it" is what the trial spends from the previous epoch's end to this epoch's begin, cut at
Keras' hooks and the ``fit`` calls. Ends with the totals and ``train.train``'s ``fit_seconds``.
Measured: docs/benchmarks.md, "Between epochs on the CPU"."""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--sweep", default="cpu")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-images", type=int, default=None, help="a class-balanced subset (default: all)")
    parser.add_argument("--no-checkpoint", action="store_true", help="train without the checkpoint and best copy")
    args = parser.parse_args()

    import keras

    from cifar_exp import data
    from cifar_exp.config.sweepfile import load_sweep
    from cifar_exp.training import checkpoints, train

    sweep = load_sweep(args.sweep)
    if args.train_images:
        sweep = dataclasses.replace(sweep, data=dataclasses.replace(sweep.data, train_images=args.train_images))
    middle = {name: (d.low * d.high) ** 0.5 if d.log else (d.low + d.high) / 2
              for name, d in sweep.space.items() if d.low is not None}
    cfg = sweep.train_config(middle)
    splits = data.splits(sweep, data.load(args.data))
    marks: list[tuple[str, int, float]] = []

    class Marks(keras.callbacks.Callback):
        def on_train_begin(self, logs: Any = None) -> None:
            marks.append(("train_begin", -1, time.perf_counter()))

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            marks.append(("epoch_begin", epoch, time.perf_counter()))

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            marks.append(("epoch_end", epoch, time.perf_counter()))

        def on_train_end(self, logs: Any = None) -> None:
            marks.append(("train_end", -1, time.perf_counter()))

    fit = keras.Model.fit

    def timed_fit(self: Any, *a: Any, **k: Any) -> Any:
        marks.append(("fit_call", -1, time.perf_counter()))
        try:
            return fit(self, *a, **k)
        finally:
            marks.append(("fit_return", -1, time.perf_counter()))

    keras.Model.fit = timed_fit  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory() as tmp:
        slot = checkpoints.Slot(Path(tmp) / "trial.ckpt", {"bench": "epoch_gaps"})
        options = train.TrainOptions(checkpoint=None if args.no_checkpoint else slot,
                                     best_by=None if args.no_checkpoint else sweep.best_by)
        result = train.train(cfg, splits, seed=0, epochs=args.epochs, callbacks=[Marks()], options=options)
    print(f"{args.sweep}: {len(splits.y_train)} training images, {keras.backend.backend()}, {cpu_model()}")
    inside = between = 0.0
    last_end = None
    for i, (kind, epoch, t) in enumerate(marks):
        if kind != "epoch_begin":
            continue
        end = next(m[2] for m in marks[i:] if m[0] == "epoch_end" and m[1] == epoch)
        call = max((m[2] for m in marks[:i] if m[0] == "fit_call"), default=t)
        begin = max((m[2] for m in marks[:i] if m[0] == "train_begin"), default=t)
        before = t - last_end if last_end is not None else 0.0
        inside, between = inside + end - t, between + before
        parts = ""
        if last_end is not None:
            train_end = next((m[2] for m in marks if m[0] == "train_end" and m[2] >= last_end), t)
            returned = next((m[2] for m in marks if m[0] == "fit_return" and m[2] >= last_end), t)
            parts = (f"epoch end -> train end {train_end - last_end:.1f} s, train end -> fit return "
                     f"{returned - train_end:.1f} s, fit return -> fit call {call - returned:.1f} s, ")
        print(f"epoch {epoch}: in epoch {end - t:.1f} s, before it {before:.1f} s ({parts}fit call -> train begin "
              f"{begin - call:.1f} s, train begin -> epoch begin {t - begin:.1f} s)")
        last_end = end
    print(f"total: in epochs {inside:.1f} s, between them {between:.1f} s; "
          f"fit_seconds {result.phases['fit_seconds']:.1f}")


if __name__ == "__main__":
    main()
