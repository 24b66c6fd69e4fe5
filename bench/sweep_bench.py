"""Where a sweep's time goes, on whatever machine runs it: bare training, one tracked trial, fixed
sweeps by worker count, and the plain Optuna + MLflow loop of the libraries' docs.

    python bench/sweep_bench.py --data data/cifar10-jpeg.zip              # sized for a GPU
    python bench/sweep_bench.py --data data/cifar10-jpeg.zip --train-images 2000 --trials 4 \\
        --epochs 2 --workers 1,2 --airbench-epochs ''                    # a size a 2-core CPU finishes

Measured, on the lr_dropout sweep's CNN and space, on ``--train-images`` training images (the
sweep's own class-balanced subset, ``--train-images`` of the sweep command; the validation and test
splits whole, as the sweep makes them):

1. ``fit``: ``cifar_exp.training.train.train`` (``keras.Model.fit`` and our per-epoch hook, no tracking) of
   the reference configuration: median seconds per epoch after the first, images per second,
   and seconds from the call to the first training step (build and compilation); by feed: with
   the feed a trial gets (``training.feed.choose``), and where that is the device loop (JAX on an
   accelerator) with ``fit`` as well.
2. one trial through ``python -m cifar_exp.sweep``: the MLflow run's wall time against the
   seconds its epochs took; the rest is the sweep machinery's overhead (start-up, tracking,
   evaluation, model logging); and the trial's ``first_step_seconds`` (from the worker's claim
   of the trial to its first training step, compilation included); then the same trial again,
   with JAX's compilation cache warm (TensorFlow keeps no such cache: the two should match).
3. a fixed sweep (``--trials`` trials, seed 0) with each ``--workers`` count: trials per hour,
   mean GPU utilization (nvidia-smi, sampled every second; "n/a" without a GPU), mean
   ``first_step_seconds`` per trial.
4. ``bench/baseline_loop.py`` on the same space, trials and epochs: trials per hour.
5. the airbench sweep's ``AIRBENCH`` configuration (``sweeps/airbench.yaml``), trained on every
   training image of the slice for each epoch budget of ``--airbench-epochs`` (the one-cycle
   schedule spans the budget): test accuracy after each epoch, training seconds (the sum of
   ``epoch_seconds``, which include evaluating the test set after each epoch, so an upper bound),
   and the first budget that reaches 93% and 94%.

Writes ``bench/RESULTS.md`` (a table, with machine, backend, versions and data) and
``bench/results.json`` (the raw numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
REFERENCE = {"learning_rate": 1e-3, "dropout": 0.25, "head_dropout": 0.5, "lr_schedule": "cosine"}
# Part 5's point in the airbench space. Keras' SGD decay is decoupled (weights -= wd * lr each
# step): 5e-3 at lr 0.8 shrinks weights per epoch as PyTorch's coupled 5e-4 does at batch 128.
AIRBENCH = {"learning_rate": 0.8, "momentum": 0.9, "weight_decay": 5e-3, "label_smoothing": 0.2,
            "warmup_fraction": 0.2}


class GpuSampler:
    """Mean GPU utilization (%) from ``nvidia-smi`` once a second while running; None without one."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.available = shutil.which("nvidia-smi") is not None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout.split()
            if out:
                self.samples.append(statistics.mean(float(v) for v in out))

    def __enter__(self) -> GpuSampler:
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    @property
    def mean(self) -> float | None:
        return statistics.mean(self.samples) if self.samples else None


def bare_fit(data_path: str, train_images: int | None, epochs: int) -> dict:
    """Part 1, in this process."""
    from cifar_exp import data
    from cifar_exp.config.sweepfile import load_sweep
    from cifar_exp.training import backend, train

    sweep = load_sweep("lr_dropout")
    splits = data.split(data.load(data_path), sweep.data.validation_fraction, 0, train_images)
    first: list[float] = []
    result = train.train(sweep.train_config(REFERENCE), splits, epochs=epochs, seed=0,
                         callbacks=[train.Observer(on_first_step=first.append)])
    seconds = result.history["epoch_seconds"]
    steady = statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]
    by_feed = {result.feed: steady}
    if result.feed == "device":  # a trial's feed on an accelerator: fit for comparison (on the CPU, fit only)
        other = train.train(sweep.train_config(REFERENCE), splits, epochs=epochs, seed=0,
                            options=train.TrainOptions(feeding="fit"))
        other_seconds = other.history["epoch_seconds"]
        by_feed["fit"] = statistics.median(other_seconds[1:]) if len(other_seconds) > 1 else other_seconds[0]
    return {"epoch_s": steady, "first_step_s": first[0], "feed": result.feed, "epoch_s_by_feed": by_feed,
            "images_per_s": len(splits.x_train) / steady, "train_images": len(splits.x_train),
            "val_images": len(splits.x_val), "test_images": len(splits.x_test), "identity": backend.identity()}


def airbench(data_path: str, train_images: int | None, budgets: list[int]) -> list[dict]:
    """Part 5, in this process: per epoch budget, test accuracy after each epoch and seconds."""
    import keras

    from cifar_exp import data
    from cifar_exp.config.sweepfile import load_sweep
    from cifar_exp.training import train

    loaded = data.load(data_path)
    # Every training image (of the subset) trains; the test set is the per-epoch validation
    # (nothing is chosen on it).
    keep = np.arange(len(loaded.y_train)) if train_images is None else \
        data.balanced_subset(loaded.y_train, np.arange(len(loaded.y_train)), train_images, 0)
    splits = data.Splits(loaded.x_train[keep], loaded.y_train[keep], loaded.x_test, loaded.y_test, loaded.x_test,
                         loaded.y_test, loaded.class_names)
    cfg = load_sweep("airbench").train_config(AIRBENCH)
    found = []
    for epochs in budgets:
        first: list[float] = []
        result = train.train(cfg, splits, epochs=epochs, seed=0,
                         callbacks=[train.Observer(on_first_step=first.append)])
        found.append({"epochs": epochs, "test_accuracy": result.test_accuracy,
                      "test_accuracy_per_epoch": result.history["val_accuracy"],
                      "train_s": sum(result.history["epoch_seconds"]), "first_step_s": first[0],
                      "epoch_s": result.history["epoch_seconds"], "train_images": len(splits.x_train)})
        keras.backend.clear_session()
    return found


def sweep_runs(folder: Path) -> list[dict]:
    """Per trial run of the sweep in ``folder``: wall seconds, seconds in epochs, first-step seconds."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{folder}/mlruns/mlflow.db")
    client = MlflowClient()
    found = []
    for run in client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000):
        if "mlflow.parentRunId" not in run.data.tags or run.info.end_time is None:
            continue
        epochs = [m.value for m in client.get_metric_history(run.info.run_id, "epoch_seconds")]
        found.append({"wall_s": (run.info.end_time - run.info.start_time) / 1000, "epochs_s": sum(epochs),
                      "first_step_s": run.data.metrics["time/first_step_seconds"], "state": run.data.tags.get("state")})
    return found


def run_sweep(data_path: str, train_images: int | None, sweep_file: Path, trials: int, epochs: int,
              workers: int) -> dict:
    """Parts 2 and 3: ``python -m cifar_exp.sweep`` in a fresh folder; wall time and its runs."""
    folder = Path(tempfile.mkdtemp(prefix="cifar_exp-bench-"))
    shutil.copy(sweep_file, folder / sweep_file.name)
    command = [sys.executable, "-m", "cifar_exp.sweep", str(folder / sweep_file.name), "--data", data_path,
               "--trials", str(trials), "--epochs", str(epochs), "--workers", str(workers),
               "--tracking-uri", "sqlite:///mlruns/mlflow.db",
               *(["--train-images", str(train_images)] if train_images else [])]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # set_tracking_uri exports it
    with GpuSampler() as gpu:
        started = time.perf_counter()
        done = subprocess.run(command, cwd=folder, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    runs = sweep_runs(folder)
    shutil.rmtree(folder, ignore_errors=True)
    return {"workers": workers, "trials": trials, "wall_s": wall, "trials_per_hour": 3600 * trials / wall,
            "gpu_util_mean": gpu.mean, "runs": runs,
            "first_step_s_mean": statistics.mean(r["first_step_s"] for r in runs)}


def rewrite() -> None:
    """``python bench/sweep_bench.py --rewrite``: RESULTS.md again from results.json."""
    write_results(report(json.loads((BENCH / "results.json").read_text())))


def write_results(text: str) -> None:
    """RESULTS.md's sweep benchmark part (what comes before its first ``## `` section): the
    sections other benches add after it (compile_bench's) stay."""
    path = BENCH / "RESULTS.md"
    old = path.read_text() if path.exists() else ""
    path.write_text(text.rstrip("\n") + "\n" + (old[old.index("\n## "):] if "\n## " in old else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="a CIFAR-10 source, as for --data of the sweep (required unless --rewrite)")
    parser.add_argument("--train-images", type=int, help="a class-balanced subset (default: every image)")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--workers", default="1,2,4,8")
    parser.add_argument("--airbench-epochs", default="8,12,16,24",
                        help="part 5's epoch budgets, comma-separated; '' leaves part 5 out")
    parser.add_argument("--rewrite", action="store_true", help="only rewrite RESULTS.md from results.json")
    args = parser.parse_args()
    if args.rewrite:
        return rewrite()
    if args.data is None:
        parser.error("--data is required (a CIFAR-10 source)")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    sys.path.insert(0, str(ROOT))
    from cifar_exp.cli.environment import set_environment

    set_environment(True)
    data_path, subset = str(Path(args.data).resolve()), args.train_images
    with tempfile.TemporaryDirectory() as tmp:
        results: dict = {"command": shlex.join(sys.argv), "data": args.data, "epochs": args.epochs}
        os.environ["JAX_COMPILATION_CACHE_DIR"] = str(Path(tmp) / "jax")  # empty: the first trial is cold
        reference = yaml.safe_load((ROOT / "sweeps" / "lr_dropout.yaml").read_text())
        reference["space"] = {"dropout": {"type": "categorical", "choices": [REFERENCE["dropout"]]}}
        reference["fixed"].update({k: v for k, v in REFERENCE.items() if k != "dropout"})
        fixed = Path(tmp) / "reference.yaml"  # the reference configuration as a one-point sweep
        fixed.write_text(yaml.safe_dump(reference))
        one = run_sweep(data_path, subset, fixed, 1, args.epochs, 1)["runs"][0]
        results["one_trial"] = {**one, "overhead_fraction": 1 - one["epochs_s"] / one["wall_s"]}
        warm = run_sweep(data_path, subset, fixed, 1, args.epochs, 1)["runs"][0]  # the same program again
        results["one_trial_warm"] = {**warm, "overhead_fraction": 1 - warm["epochs_s"] / warm["wall_s"]}
        results["fit"] = bare_fit(data_path, subset, args.epochs)
        results["airbench"] = airbench(data_path, subset, [int(e) for e in args.airbench_epochs.split(",") if e])
        results["sweeps"] = [run_sweep(data_path, subset, ROOT / "sweeps" / "lr_dropout.yaml", args.trials,
                                       args.epochs, w) for w in (int(w) for w in args.workers.split(","))]
        baseline = subprocess.run([sys.executable, str(BENCH / "baseline_loop.py"), "--data", data_path,
                                   "--trials", str(args.trials), "--epochs", str(args.epochs), "--store", tmp,
                                   *(["--train-images", str(subset)] if subset else [])],
                                  check=True, capture_output=True, text=True, cwd=ROOT).stdout
        results["baseline"] = json.loads(baseline.strip().splitlines()[-1])
        results["baseline"]["trials_per_hour"] = 3600 * args.trials / results["baseline"]["wall_s"]
    (BENCH / "results.json").write_text(json.dumps(results, indent=1, default=float))
    write_results(report(results))
    print(report(results))


def report(r: dict) -> str:
    fit, one, ident = r["fit"], r["one_trial"], r["fit"]["identity"]
    gpu = lambda v: "n/a (no nvidia-smi)" if v is None else f"{v:.1f}%"
    best = max(r["sweeps"], key=lambda s: s["trials_per_hour"])
    lines = [
        "# Sweep benchmark", "",
        f"Command: `{r['command']}`", "",
        f"Machine: {ident['device']}, {os.cpu_count()} CPU cores; backend {ident['keras_backend']} "
        f"{ident['backend_version']}, keras {ident['keras_version']}, python {ident['python_version']}.", "",
        f"Data: {r['data']} (CIFAR-10 (JPEG copy)): {fit['train_images']} training images (a class-balanced "
        f"subset), {fit['val_images']} validation images (the sweep's split) and all {fit['test_images']} test "
        f"images, which every trial of the sweep evaluates; {r['epochs']} epochs per trial; the lr_dropout "
        f"sweep's CNN and space.", "",
        "| measure | value |", "|---|---|",
        f"| 1. fit: seconds per epoch (median after the first) | {fit['epoch_s']:.2f} |",
        f"| 1. seconds per epoch by feed (the trial's first) | "
        f"{', '.join(f'{k} {v:.2f}' for k, v in fit.get('epoch_s_by_feed', {'fit': fit['epoch_s']}).items())} |",
        f"| 1. fit: images per second | {fit['images_per_s']:.0f} |",
        f"| 1. fit: seconds to the first training step (build, compilation) | {fit['first_step_s']:.2f} |",
        f"| 2. one trial: MLflow run wall seconds | {one['wall_s']:.2f} |",
        f"| 2. one trial: seconds in its epochs | {one['epochs_s']:.2f} |",
        f"| 2. one trial: sweep machinery overhead (share of its wall time) | {100 * one['overhead_fraction']:.1f}% |",
        f"| 2. one trial: seconds from its start (claim) to its first training step, compilation cache "
        f"cold / warm | {one['first_step_s']:.2f} / {r['one_trial_warm']['first_step_s']:.2f} |",
    ]
    for s in r["sweeps"]:
        lines.append(f"| 3. {s['trials']}-trial sweep, {s['workers']} worker(s): trials per hour / GPU utilization / "
                     f"mean seconds to first step | {s['trials_per_hour']:.1f} / {gpu(s['gpu_util_mean'])} / "
                     f"{s['first_step_s_mean']:.2f} |")
    b = r["baseline"]
    lines += [f"| 4. plain Optuna + MLflow loop: trials per hour | {b['trials_per_hour']:.1f} |",
              f"| best sweep / plain loop, trials per hour | {best['trials_per_hour'] / b['trials_per_hour']:.2f}x |"]
    for a in r["airbench"]:
        lines.append(f"| 5. airbench, {a['epochs']} epochs on {a['train_images']} images: test accuracy / training "
                     f"seconds (test evaluated each epoch) / seconds to first step | {100 * a['test_accuracy']:.2f}% / "
                     f"{a['train_s']:.1f} / {a['first_step_s']:.1f} |")
    budgets = ", ".join(str(a["epochs"]) for a in r["airbench"])
    for target in (0.93, 0.94):
        reached = [a for a in r["airbench"] if a["test_accuracy"] >= target]
        value = (f"{reached[0]['train_s']:.1f} ({reached[0]['epochs']} epochs)" if reached else
                 f"not reached in budgets {budgets}" if budgets else "not run (--airbench-epochs '')")
        lines.append(f"| 5. airbench: training seconds to {100 * target:.0f}% test accuracy | {value} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
