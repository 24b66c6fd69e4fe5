"""The GPU check of the feed, in one call (sized for under 10 minutes on one H100/H200):

1. epoch seconds of the seed CNN by feed (``fit``, the device loop) and batch size (32, 128),
   on ``--images`` training images (``feed_bench``'s way: same weights, the first epoch apart);
2. how busy the GPU is (``sweep_bench.GpuSampler``: nvidia-smi, which reads NVML, every second)
   over a ``--trials``-trial lr_dropout sweep with 1, 2 and 4 workers sharing it
   (``python -m cifar_exp.sweep``, in a fresh folder each).

On the device machine (JAX with CUDA, no TensorFlow, no network), with the wheels of
``../shared/device/wheels.sh`` and the data pack carried along:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD KERAS_BACKEND=jax
    python3 .gl/unpack.py /tmp/cifar10-jpeg.zip   # a copy of ../shared/data/cifar10 in .gl/
    python3 bench/gpu_check.py --data /tmp/cifar10-jpeg.zip --out "$OUT"

Prints a line per measurement and writes ``gpu_check.json`` into ``--out``. Without a GPU it
runs the same way (busy reads "n/a"): ``--images 256 --trials 2 --epochs 1 --workers 1`` is
the CPU's quick look at the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

import feed_bench  # noqa: E402
from sweep_bench import GpuSampler  # noqa: E402


def epochs_by_feed(data: str, images: int, epochs: int) -> list[dict[str, object]]:
    from cifar_exp import data as datasets

    dataset = datasets.load(data)
    x, y = dataset.x_train[:images], dataset.y_train[:images]
    rows = []
    for batch in (32, 128):
        for feed, run in (("fit", feed_bench.fit_epochs), ("device", feed_bench.device_epochs)):
            seconds = run(feed_bench.seed_cnn, x, y, batch, epochs)
            steady = statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]
            rows.append({"batch": batch, "feed": feed, "first_epoch_s": seconds[0], "epoch_s": steady,
                         "us_per_image": steady / (len(x) // batch * batch) * 1e6})
            print(f"seed CNN batch {batch:3d} {feed:6s}: first epoch {seconds[0]:.2f} s, then {steady:.3f} s an "
                  f"epoch ({rows[-1]['us_per_image']:.1f} us an image)", flush=True)
    return rows


def sweep_busy(data: str, trials: int, epochs: int, train_images: int, workers: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as folder, GpuSampler() as busy:
        began = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "cifar_exp.sweep", "lr_dropout", "--data", data, "--trials",
                               str(trials), "--epochs", str(epochs), "--train-images", str(train_images),
                               "--workers", str(workers), "--quiet"], cwd=folder, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCH.parent), *sys.path])})
        wall = time.perf_counter() - began
    row = {"workers": workers, "trials": trials, "seconds": wall, "gpu_busy_percent": busy.mean,
           "exit": done.returncode}
    shown = "n/a" if busy.mean is None else f"{busy.mean:.1f}%"
    print(f"sweep of {trials} trials, {workers} worker(s): {wall:.1f} s, GPU busy {shown}"
          + ("" if done.returncode == 0 else f" (exit {done.returncode}: {done.stderr.strip()[-300:]})"), flush=True)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="a CIFAR-10 source (e.g. /tmp/cifar10-jpeg.zip)")
    p.add_argument("--images", type=int, default=10_000, help="training images of part 1 (default 10000)")
    p.add_argument("--trials", type=int, default=20, help="trials of each sweep in part 2 (default 20)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run, parts 1 and 2 (default 3)")
    p.add_argument("--train-images", type=int, default=5000, help="the sweeps' training images (default 5000)")
    p.add_argument("--workers", default="1,2,4", help="worker counts of part 2 (default 1,2,4)")
    p.add_argument("--out", default=".", help="where gpu_check.json goes (default .)")
    args = p.parse_args()
    import jax

    print(f"devices {[str(d) for d in jax.devices()]}, jax {jax.__version__}", flush=True)
    results = {"devices": [str(d) for d in jax.devices()],
               "epochs_by_feed": epochs_by_feed(args.data, args.images, max(2, args.epochs)),
               "sweeps": [sweep_busy(args.data, args.trials, args.epochs, args.train_images, int(w))
                          for w in args.workers.split(",")]}
    Path(args.out, "gpu_check.json").write_text(json.dumps(results, indent=2))
    return 0 if all(row["exit"] == 0 for row in results["sweeps"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
