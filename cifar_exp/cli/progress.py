"""What the terminal shows: a sweep's progress as its events arrive, and the tables a command
prints at its end. Formatting only; the counts come from ``events.Tally``."""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

from cifar_exp.config import Sweep, mask_credentials
from cifar_exp.config.records import TrialAttrs
from cifar_exp.sweep import events


class Progress:
    """Prints what the workers report: a line per trial start and end; on a terminal, below them,
    a live block redrawn in place, on every event and on the sweep command's clock (``Tick``,
    once a second): a line per running trial (its epoch, the steps done in it, its last epoch's
    metric and seconds), then the status line; elsewhere (a file, a pipe) one plain line per
    epoch, no control characters. The status carries the best value, the counts, the elapsed time
    and, from the first epoch on, an estimate of what is left: the running trials' remaining
    epochs at the seconds an epoch has taken, then the trials not started yet at the seconds a
    trial has taken (finished trials' mean, else an epoch's seconds times the epoch budget), over
    the workers. ``quiet``: nothing until the end."""

    def __init__(self, metric: str, budget: int | None, workers: int = 1, quiet: bool = False) -> None:
        self.metric, self.budget, self.workers = metric, budget, workers
        self.live = sys.stdout.isatty()
        self.quiet = quiet
        self.started = time.monotonic()
        self.trial_started: dict[int, float] = {}
        self.durations: list[float] = []  # seconds of the trials finished in this run
        self.epoch_seconds: list[float] = []  # seconds of the epochs trained in this run
        self.position: dict[int, tuple[float, int]] = {}  # running trial -> (epochs done, its budget)
        self.last: dict[int, str] = {}  # running trial -> its last epoch, as its line shows it
        self.running: dict[int, str] = {}  # trial -> its line in the live block
        self.drawn = 0  # lines of the live block on the terminal now
        self.ticked = 0.0
        self.tally: events.Tally | None = None

    def _of(self, tally: events.Tally) -> str:
        return f"{tally.finished} of {self.budget}" if self.budget else f"{tally.finished}"

    def left(self, tally: events.Tally) -> float | None:
        """Seconds until the budget is met, as far as this run has seen (None before an epoch)."""
        if not self.budget or not (self.epoch_seconds or self.durations):
            return None
        per_epoch = statistics.mean(self.epoch_seconds) if self.epoch_seconds else None
        epochs = max([budget for _, budget in self.position.values()], default=0)
        per_trial = statistics.mean(self.durations) if self.durations else (per_epoch or 0.0) * epochs
        running = sum((budget - done) * (per_epoch or 0.0) for done, budget in self.position.values())
        waiting = max(self.budget - tally.finished - len(self.position), 0)
        return (running + waiting * per_trial) / self.workers

    def _clock(self, tally: events.Tally) -> str:
        text = f"{duration(time.monotonic() - self.started)} elapsed"
        left = self.left(tally)
        if left is not None:
            text += f", about {duration(left)} left"
        return text

    def status(self, tally: events.Tally) -> str:
        best = f"best {self.metric}={tally.best[0]:.4f} (trial {tally.best[1]})" if tally.best else \
            f"no feasible trial yet ({tally.infeasible} broke the constraints)" if tally.infeasible else "no best yet"
        states = tally.states
        return (f"{best} | {states.get('COMPLETE', 0)} complete, {states.get('PRUNED', 0)} pruned, "
                f"{states.get('FAIL', 0)} failed | {self._clock(tally)}")

    def __call__(self, event: events.Event, tally: events.Tally) -> None:
        self.tally = tally
        if isinstance(event, events.Tick):
            if self.live and time.monotonic() - self.ticked >= 1.0:
                self._redraw()
        elif isinstance(event, events.Started):
            self.trial_started[event.trial] = time.monotonic()
            self.running[event.trial] = f"trial {event.trial} starting (worker {event.worker})"
            params = " ".join(f"{k}={fmt(v)}" for k, v in event.params.items())
            self._line(f"trial {event.trial} started (worker {event.worker}): {params}")
        elif isinstance(event, events.Steps):
            self._steps(event)
        elif isinstance(event, events.Epoch):
            self._epoch(event)
        elif isinstance(event, events.Ended):
            self._ended(event, tally)
        elif isinstance(event, events.Warmed):
            self._line(event.line)
        elif isinstance(event, events.Stale):
            self._line(f"trial {event.trial} was left running by a worker that is gone: failed, retried once "
                       f"({event.reason})")

    def _steps(self, event: events.Steps) -> None:
        self.position[event.trial] = (event.epoch - 1 + event.step / event.steps, event.epochs)
        self.running[event.trial] = (f"trial {event.trial} epoch {event.epoch}/{event.epochs}: "
                                     f"step {event.step}/{event.steps}" + self.last.get(event.trial, ""))
        if self.live:
            self._redraw()

    def _epoch(self, event: events.Epoch) -> None:
        seconds = event.logs.get("epoch_seconds")
        if seconds is not None:
            self.epoch_seconds.append(seconds)
        self.position[event.trial] = (float(event.epoch), event.epochs)
        took = f" ({seconds:.1f} s)" if seconds is not None else ""
        self.last[event.trial] = f" | epoch {event.epoch} {self.metric}={event.value:.4f}{took}"
        text = f"trial {event.trial} epoch {event.epoch}/{event.epochs} {self.metric}={event.value:.4f}{took}"
        self.running[event.trial] = text
        if self.live:
            self._redraw()
        else:
            self._line(f"  {text}")

    def _ended(self, event: events.Ended, tally: events.Tally) -> None:
        for kept in (self.running, self.position, self.last):
            kept.pop(event.trial, None)
        if event.counts and event.trial in self.trial_started:
            self.durations.append(time.monotonic() - self.trial_started.pop(event.trial))
        detail = ""
        if event.state == "COMPLETE":
            detail = f" {self.metric}={event.value:.4f} test_accuracy={event.test_accuracy:.4f}"
        elif event.reason:
            detail = f": {event.reason}"
        if event.infeasible:
            detail += f" [infeasible: {event.infeasible}]"
        if event.degenerate:
            detail += f" [degenerate: {event.degenerate}]"
        self._line(f"trial {event.trial} {event.state}{detail} [{self._of(tally)}] {self.status(tally)}")

    def _line(self, text: str) -> None:
        """A line that stays: on a terminal above the live block, which is redrawn below it."""
        if self.quiet:
            return
        if self.live:
            self._erase()
        print(text, flush=True)
        if self.live:
            self._redraw()

    def _erase(self) -> None:
        if self.drawn:  # to the start of the block's first line, then clear to the end of the screen
            sys.stdout.write(f"\033[{self.drawn}F\033[J")
            self.drawn = 0

    def _redraw(self) -> None:
        if self.quiet or self.tally is None:
            return
        self._erase()
        block = [f"  {text}" for _, text in sorted(self.running.items())] + [f"  {self.status(self.tally)}"]
        sys.stdout.write("".join(f"{line}\n" for line in block))
        sys.stdout.flush()
        self.drawn = len(block)
        self.ticked = time.monotonic()


def duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def trial_list(numbers: list[int]) -> str:
    """``"trials 1, 4"``, ``"trial 2"`` or ``"none"``."""
    return f"trial{'s' if len(numbers) != 1 else ''} {', '.join(map(str, numbers))}" if numbers else "none"


def numbered(trial: Any) -> str:
    """A trial's number as the tables show it: ``3!`` for a degenerate trial (never registered)."""
    return f"{trial.number}!" if TrialAttrs.of(trial).degenerate else str(trial.number)


def print_degenerate(trials: Any) -> None:
    """A line per degenerate trial among ``trials``, saying why (below a table that marks it ``!``)."""
    for t in trials:
        if TrialAttrs.of(t).degenerate:
            print(f"trial {t.number} is degenerate ({TrialAttrs.of(t).degenerate}): never registered")


def print_summary(summary: Any, sweep: Sweep, ui_command: str) -> None:
    """The sweep's final table: counts, then the best trials (the Pareto front first, marked
    ``*``, with several objectives) with their objectives' values and params; a degenerate
    trial's number marked ``!`` and named below; a line when no trial is feasible."""
    counts = ", ".join(f"{n} {s.lower()}" for s, n in summary.counts.items() if n)
    print(f"\nstudy '{summary.study_name}': {counts or 'no trials'}")
    if summary.untrained:
        print(f"{summary.untrained} trial(s) broke a constraint before training and were not trained")
    several = len(sweep.objectives) > 1
    goals = [o.metric for o in sweep.objectives]
    shown = goals + (["test_accuracy"] if "test_accuracy" not in goals else [])
    if summary.best:
        on_front = {t.number for t in summary.front}
        print(f"{'rank':>4} {'trial':>5}{'  front' if several else ''} "
              + " ".join(f"{m:>12}" for m in shown) + "  params")
        for rank, t in enumerate(summary.best, 1):
            params = " ".join(f"{k}={fmt(v)}" for k, v in t.params.items())
            measured = {**TrialAttrs.of(t).judged(), **dict(zip(goals, t.values, strict=True))}
            cells = " ".join(f"{'-' if measured.get(m) is None else f'{measured[m]:.4f}':>12}" for m in shown)
            mark = f"  {'*' if t.number in on_front else '':>5}" if several else ""
            print(f"{rank:>4} {numbered(t):>5}{mark} {cells}  {params}")
        print_degenerate(summary.best)
        print(f"best run: {TrialAttrs.of(summary.best[0]).mlflow_run_id} "
              f"(experiment {summary.experiment_id}, parent run {summary.parent_run_id})")
    elif summary.counts.get("COMPLETE"):
        print("no feasible trial: every complete trial broke a constraint (see infeasible in the trials table); "
              "loosen the constraints, or widen the space")
    print(f"open the MLflow UI: {mask_credentials(ui_command)}")


def _diff(pair: tuple[float, float | None]) -> str:
    from cifar_exp.rerun import same

    before, after = pair
    if after is None:
        return "missing"
    return "=" if same(before, after) else f"{after - before:+.3g}"


def print_comparison(comparison: Any) -> None:
    """A rerun against its original, a line per epoch: '=' where the rerun's value is
    bit-identical, else rerun - original."""
    width = max([12, *(len(m) + 2 for m in comparison.metrics)])
    print("epoch" + "".join(f"{m:>{width}}" for m in comparison.metrics))
    for epoch, row in enumerate(comparison.epochs, 1):
        print(f"{epoch:>5}" + "".join(f"{_diff(row[m]) if m in row else '':>{width}}" for m in comparison.metrics))
    if comparison.test:
        shown = [k for k in ("test_loss", "test_accuracy", "test_macro_f1", "param_count") if k in comparison.test]
        print("test  " + "  ".join(f"{k} {_diff(comparison.test[k])}" for k in shown))
        others = [k for k in comparison.test if k not in shown]
        differing = [f"{k} {_diff(comparison.test[k])}" for k in others if _diff(comparison.test[k]) != "="]
        if others:
            print(f"      {len(others) - len(differing)} of {len(others)} per-class test metrics identical"
                  + (f"; {', '.join(differing)}" if differing else ""))
    total = len(comparison.values())
    if comparison.matched and comparison.max_abs_diff == 0:
        print(f"identical: all {total} values match the original bit for bit")
    elif comparison.matched:
        print(f"within tolerance: all {total} values within {comparison.tolerance} "
              f"(largest difference {comparison.max_abs_diff:.3g})")
    else:
        print(f"differs: {comparison.mismatches} of {total} values differ by more than {comparison.tolerance} "
              f"(largest difference {comparison.max_abs_diff:.3g})")
