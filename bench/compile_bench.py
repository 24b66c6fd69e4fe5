"""What a sweep pays in compilation per trial, before and after compiled programs are reused.

    KERAS_BACKEND=jax python bench/compile_bench.py --data data/cifar10-jpeg.zip --before 8f2d23b

For each sweep of ``--sweeps`` (default: lr_dropout and lr_schedule), ``--trials`` points of its
space are drawn once (Optuna's random sampler, seed 0: every searched dimension varies), then
trained one after the other in one process per code version, as a sweep's worker trains them
(1 epoch each on ``--train-images`` training images; the Keras session cleared between trials):

- ``before``: the package at the git revision ``--before`` (a temporary worktree), every trial
  built and compiled afresh;
- ``after``: this working tree, a worker's ``programs.Programs`` passed to ``train``.

Each gets a fresh, empty JAX compilation cache directory. Per trial: XLA compilations and cache
hits (JAX's monitoring events, counted here, so that both versions are measured alike), the
seconds spent tracing and compiling, the seconds from the trial's start (its configuration drawn)
to its first launched training step, and how its program came (``new``, ``reused``, ``cache``).
Then ``after`` again for ``--memory-trials`` trials of the first sweep: the process' resident
memory after each trial. Under TensorFlow (``KERAS_BACKEND=tensorflow``) there are no compile
events: the first-step seconds and the programs' origin are what it reports.

Writes its table into ``bench/RESULTS.md`` (``## Compilation (BACKEND, ...)``, replacing that
backend's previous one) and the raw rows to ``bench/compile_results_BACKEND.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent


def draw(sweep_name: str, trials: int) -> list[dict]:
    """``trials`` TrainConfig settings of the sweep, every searched dimension drawn at random."""
    import optuna

    from cifar_exp.config.sweepfile import load_sweep
    from cifar_exp.sweep import space

    sweep = load_sweep(sweep_name)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    settings = []
    for _ in range(trials):
        params = space.suggest(study.ask(), sweep)
        cfg = sweep.train_config(params)
        settings.append({f: getattr(cfg, f) for f in cfg.__dataclass_fields__})
    return settings


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(args: argparse.Namespace) -> None:
    """One code version's loop (run in its own process, the version's package on the path)."""
    import keras
    import numpy as np

    import cifar_exp
    from cifar_exp import data
    from cifar_exp.config import TrainConfig
    from cifar_exp.training import train

    assert Path(cifar_exp.__file__).is_relative_to(args.root), (cifar_exp.__file__, args.root)  # the version asked

    counts = {"compilations": 0, "hits": 0, "seconds": 0.0}
    if keras.backend.backend() == "jax":
        import jax.monitoring

        def on_duration(event: str, duration_secs: float, **kwargs: object) -> None:
            if event == "/jax/core/compile/backend_compile_duration":
                counts["compilations"] += 1
            if event.startswith("/jax/core/compile/"):
                counts["seconds"] += duration_secs

        def on_event(event: str, **kwargs: object) -> None:
            if event == "/jax/compilation_cache/cache_hits":
                counts["hits"] += 1

        jax.monitoring.register_event_duration_secs_listener(on_duration)
        jax.monitoring.register_event_listener(on_event)
    settings = json.loads(Path(args.settings).read_text())
    splits = data.split(data.load(args.data), 0.1, 0, args.train_images)
    kept = None
    if args.reuse:
        from cifar_exp.training.programs import Programs

        kept = Programs()
    rows = []
    for number, values in enumerate(settings):
        before = dict(counts)
        started = time.perf_counter()
        first: list[float] = []
        result = train.train(TrainConfig(**values), splits, epochs=1, seed=number,
                             callbacks=[train.Observer(on_first_step=first.append)],
                             options=train.TrainOptions(started=started, programs=kept))
        keras.backend.clear_session()
        compiled = counts["compilations"] - before["compilations"] - (counts["hits"] - before["hits"])
        rows.append({"first_step_seconds": first[0], "compilations": compiled,
                     "cache_hits": counts["hits"] - before["hits"],
                     "compile_seconds": counts["seconds"] - before["seconds"],
                     # before programs were reused, a trial compiled anew unless JAX's cache served it all
                     "compiled": getattr(result, "compiled", "cache" if before["hits"] < counts["hits"]
                                         and not compiled else "new"),
                     "val_accuracy": result.history["val_accuracy"][-1], "rss_mib": rss_mib(),
                     "finite": bool(np.isfinite(result.history["loss"][-1]))})
    Path(args.out).write_text(json.dumps(rows))


def run_version(label: str, root: Path, settings: list[dict], args: argparse.Namespace, reuse: bool) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "settings.json").write_text(json.dumps(settings))
        env = {**os.environ, "PYTHONPATH": str(root), "JAX_COMPILATION_CACHE_DIR": str(Path(tmp) / "jax")}
        command = [sys.executable, str(BENCH / "compile_bench.py"), "--child", "--data", args.data,
                   "--train-images", str(args.train_images), "--settings", str(Path(tmp) / "settings.json"),
                   "--out", str(Path(tmp) / "rows.json"), "--root", str(root)] + (["--reuse"] if reuse else [])
        started = time.perf_counter()
        subprocess.run(command, env=env, cwd=tmp, check=True, stdout=subprocess.DEVNULL)
        print(f"{label}: {len(settings)} trials in {time.perf_counter() - started:.1f} s", flush=True)
        return json.loads((Path(tmp) / "rows.json").read_text())


def summary(rows: list[dict]) -> dict:
    later = rows[1:]
    return {"trials": len(rows), "compilations_first": rows[0]["compilations"],
            "compilations_later_mean": statistics.mean(r["compilations"] for r in later),
            "first_step_first": rows[0]["first_step_seconds"],
            "first_step_later_median": statistics.median(r["first_step_seconds"] for r in later),
            "first_step_later_max": max(r["first_step_seconds"] for r in later),
            "compile_seconds_total": sum(r["compile_seconds"] for r in rows),
            "new": sum(r["compiled"] == "new" for r in rows), "reused": sum(r["compiled"] == "reused" for r in rows),
            "cache": sum(r["compiled"] == "cache" for r in rows)}


def table(results: dict) -> str:
    meta = results["meta"]
    lines = [f"## Compilation ({meta['backend']}, {meta['machine']})", "",
             f"`{meta['command']}`; {meta['train_images']} training images of the CIFAR-10 (JPEG copy), 1 epoch "
             f"per trial, {meta['date']}.", "",
             "| sweep | version | XLA compilations, trial 1 | per later trial (mean) | first step, trial 1 (s) "
             "| later trials, median / max (s) | compile s, total | new / reused / cache |",
             "|---|---|---|---|---|---|---|---|"]
    events = meta["backend"] == "jax"  # TensorFlow reports no compile events
    for sweep, versions in results["sweeps"].items():
        for version, rows in versions.items():
            s = summary(rows)
            counted = f"{s['compilations_first']} | {s['compilations_later_mean']:.2f}" if events else "n/a | n/a"
            seconds = f"{s['compile_seconds_total']:.1f}" if events else "n/a"
            lines.append(f"| {sweep} | {version} | {counted} | {s['first_step_first']:.2f} | "
                         f"{s['first_step_later_median']:.2f} / {s['first_step_later_max']:.2f} | {seconds} | "
                         f"{s['new']} / {s['reused']} / {s['cache']} |")
    memory = results.get("memory")
    if memory:
        rss = [r["rss_mib"] for r in memory]
        lines += ["", f"Memory over {len(rss)} trials of one worker (after): resident {rss[0]:.0f} MiB after "
                  f"trial 1, {rss[9]:.0f} after trial 10, {rss[-1]:.0f} after trial {len(rss)} "
                  f"(max {max(rss):.0f}); trials 10 to {len(rss)} grew {rss[-1] - rss[9]:+.0f} MiB."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a CIFAR-10 source, as for --data of the sweep")
    parser.add_argument("--train-images", type=int, default=1000)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--memory-trials", type=int, default=50)
    parser.add_argument("--sweeps", default="lr_dropout,lr_schedule")
    parser.add_argument("--before", help="a git revision to measure as 'before' (default: only 'after')")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--reuse", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if Path(args.data).exists():
        args.data = str(Path(args.data).resolve())
    if args.child:
        return child(args)
    sys.path.insert(0, str(ROOT))
    backend = os.environ.setdefault("KERAS_BACKEND", "jax")
    results: dict = {"meta": {"backend": backend, "machine": f"{platform.processor() or platform.machine()}, "
                              f"{os.cpu_count()} CPUs", "train_images": args.train_images,
                              "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python", *sys.argv])},
                     "sweeps": {}}
    with tempfile.TemporaryDirectory() as worktree:
        if args.before:
            subprocess.run(["git", "worktree", "add", "--detach", worktree, args.before], cwd=ROOT, check=True,
                           capture_output=True)
        try:
            for name in args.sweeps.split(","):
                settings = draw(name, args.trials)
                versions = results["sweeps"][name] = {}
                if args.before:
                    versions["before"] = run_version(f"{name} before", Path(worktree), settings, args, reuse=False)
                versions["after"] = run_version(f"{name} after", ROOT, settings, args, reuse=True)
            if args.memory_trials:
                settings = draw(args.sweeps.split(",")[0], args.memory_trials)
                results["memory"] = run_version("memory", ROOT, settings, args, reuse=True)
        finally:
            if args.before:
                subprocess.run(["git", "worktree", "remove", "--force", worktree], cwd=ROOT, check=False)
    (BENCH / f"compile_results_{backend}.json").write_text(json.dumps(results, indent=1))
    text = table(results)
    print(text)
    # RESULTS.md keeps every other section, this backend's compilation table replaced.
    results_md = BENCH / "RESULTS.md"
    sections = re.split(r"(?m)^(?=## )", results_md.read_text() if results_md.exists() else "")
    kept = [part.rstrip() + "\n" for part in sections if part.strip()
            and not part.startswith(f"## Compilation ({backend},")]
    results_md.write_text("\n".join([*kept, text]))


if __name__ == "__main__":
    main()
