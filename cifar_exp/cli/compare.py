"""``cifar-exp compare NAME``: a study's best trials as a table, and their validation curves in one PNG."""

from __future__ import annotations

import argparse
from pathlib import Path

from cifar_exp.cli import arguments
from cifar_exp.cli.environment import existing_store
from cifar_exp.cli.progress import fmt, numbered, print_degenerate, trial_list
from cifar_exp.config import DEFAULT_STORE, UserError, outcomes
from cifar_exp.config.records import StudyAttrs, TrialAttrs
from cifar_exp.config.sweepfile import load_sweep

DESCRIPTION = "The best trials of a sweep as a table, and one PNG overlaying their validation curves."
SUMMARY = "the best trials side by side"  # its line in cifar-exp --help


def add_arguments(p: argparse.ArgumentParser) -> None:
    arguments.study(p)
    p.add_argument("--top", type=arguments.positive(int, "--top"), default=5, help="how many trials (default 5)")
    p.add_argument("--out", help="the PNG to write (default mlruns/NAME-top-K.png, beside the store)")


def run(args: argparse.Namespace) -> int:
    chosen = load_sweep(args.name, args.study)
    out = _png_out(args.out, f"{chosen.name}-top-{args.top}.png")
    existing_store(args.tracking_uri)
    from cifar_exp import track
    from cifar_exp.metrics import plots
    from cifar_exp.sweep import storage

    track.configure(args.tracking_uri)
    study = storage.load_existing(args.storage, chosen.name)
    best = storage.best_trials(study, chosen.objectives, args.top)
    if not best:
        raise UserError(f"study '{chosen.name}' has no complete feasible trial yet")
    metric = chosen.objective.metric
    several = len(chosen.objectives) > 1
    on_front = {t.number for t in outcomes.front(study.get_trials(deepcopy=False), chosen.objectives)}
    names = sorted({key for t in best for key in t.params})
    goals = [o.metric for o in chosen.objectives]
    header = ["rank", "trial", *(["front"] if several else []), *goals,
              *(["test_accuracy"] if "test_accuracy" not in goals else []), "epochs", "seconds", *names]
    rows, curves = [], {}
    for rank, t in enumerate(best, 1):
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else float("nan")
        attrs = TrialAttrs.of(t)
        test = float("nan") if attrs.test_accuracy is None else attrs.test_accuracy
        rows.append([str(rank), numbered(t),
                     *(["*" if t.number in on_front else ""] if several else []),
                     *(f"{v:.4f}" if abs(v) < 1000 else f"{v:.0f}" for v in t.values),
                     *([f"{test:.4f}"] if "test_accuracy" not in goals else []),
                     str(attrs.epochs_run or ""), f"{seconds:.1f}",
                     *(fmt(t.params[n]) if n in t.params else "-" for n in names)])
        run_id = attrs.mlflow_run_id
        if run_id:
            curves[f"trial {t.number}"] = track.metric_history(run_id, metric)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    for line in (header, *rows):
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)))
    print_degenerate(best)
    gone = sorted(StudyAttrs.of(study).models_collected & {t.number for t in best})
    if gone:
        print(f"no model any more (deleted by gc; runs, metrics and curves kept): {trial_list(gone)}")
    try:
        plots.curves_png(curves, metric, str(out), f"{chosen.name}: {metric} of the {len(best)} best trials")
    except OSError as exc:
        raise UserError(f"cannot write {out} ({exc.strerror or exc}): pass --out a writable path") from None
    print(f"wrote {out}")
    return 0


def _png_out(out: str | None, default: str) -> Path:
    """Where ``compare`` writes its PNG: ``--out`` (a folder gets the default name in it), checked
    before anything is read or drawn."""
    if out is None:
        return DEFAULT_STORE / default  # nothing lands in a checkout
    path = Path(out)
    if path.is_dir():
        return path / default
    if not path.parent.is_dir():
        raise UserError(f"--out {out}: the folder {path.parent} does not exist: create it, or name a PNG in an "
                        f"existing folder")
    if path.suffix.lower() != ".png":
        raise UserError(f"--out {out}: the plot is a PNG: give a path ending in .png")
    return path
