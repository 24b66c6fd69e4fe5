"""A corpus of malformed and hostile sweep files: each is one ConfigError on one line, with exit
code 2 from the command, before anything is written, whatever it tries (alias bombs, deep
nesting, duplicate keys, huge values, steps wider than their range, impossible seeds)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cifar_exp import cli
from cifar_exp.config import ConfigError
from cifar_exp.config.sweepfile import load_sweep

GOOD = """description: a good sweep
objective: {metric: val_accuracy, direction: maximize}
space:
  learning_rate: {type: float, low: 1.0e-4, high: 1.0e-1, log: true}
  dropout: {type: float, low: 0.0, high: 0.5}
  lr_schedule: {type: categorical, choices: [constant, step]}
  step_factor: {type: float, low: 0.1, high: 0.5, when: {lr_schedule: step}}
fixed: {optimizer: adam, batch_size: 64}
sampler: {name: tpe, seed: 0}
pruner: {name: hyperband, min_epochs: 1}
data: {source: keras, validation_fraction: 0.1}
epochs: 3
trials: 4
"""


def bomb(levels: int, width: int = 9) -> str:
    """The billion-laughs alias bomb: ``levels`` anchors, each a list of ``width`` of the last."""
    lines = ['a0: &a0 "lol"']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "\n".join(lines)


def corpus() -> dict[str, str]:
    cases: dict[str, str] = {}
    # Alias bombs, under every kind of key, and plain anchors.
    for levels in (1, 3, 5, 7, 9):
        cases[f"bomb-description-{levels}"] = f"x: 1\n{bomb(levels)}\ndescription: *a{levels}\n"
        cases[f"bomb-metric-{levels}"] = GOOD.replace("metric: val_accuracy", f"metric: *a{levels}") + bomb(levels)
        cases[f"bomb-fixed-{levels}"] = bomb(levels) + "\n" + GOOD.replace("optimizer: adam", f"optimizer: *a{levels}")
    cases["anchor-only"] = GOOD.replace("fixed: {", "fixed: &f {")
    cases["merge-key"] = "base: &b {epochs: 3}\n<<: *b\n" + GOOD
    # Nesting.
    for depth in (21, 100, 500, 5000):
        cases[f"nested-list-{depth}"] = "description: " + "[" * depth + "]" * depth + "\n"
        cases[f"nested-map-{depth}"] = "description: " + "{a: " * depth + "1" + "}" * depth + "\n"
    cases["unclosed-500"] = "space: " + "[" * 500 + "\n"
    # Duplicate keys.
    cases["epochs-twice"] = GOOD + "epochs: 5\n"
    cases["dimension-twice"] = GOOD.replace("  dropout:",
                                            "  learning_rate: {type: float, low: 0.1, high: 1}\n  dropout:")
    cases["fixed-key-twice"] = GOOD.replace("fixed: {optimizer: adam,", "fixed: {optimizer: adam, optimizer: sgd,")
    cases["dimension-key-twice"] = GOOD.replace("{type: float, low: 0.0, high: 0.5}",
                                                "{type: float, low: 0.0, high: 0.5, low: 0.1}")
    cases["space-twice"] = GOOD + "space: {}\n"
    # Steps wider than their range.
    cases["int-step-too-wide"] = GOOD.replace("fixed: {optimizer: adam, batch_size: 64}",
                                              "fixed: {optimizer: adam}").replace(
        "space:\n", "space:\n  batch_size: {type: int, low: 1, high: 64, step: 100}\n")
    cases["float-step-too-wide"] = GOOD.replace("high: 0.5}\n  lr_schedule", "high: 0.5, step: 0.6}\n  lr_schedule")
    cases["step-negative"] = GOOD.replace("high: 0.5}\n  lr_schedule", "high: 0.5, step: -0.1}\n  lr_schedule")
    # Seeds that are not seeds.
    for seed in ("-1", "100000000000000000000000", "4294967296", "x", "1.5", "null", "[1]", "true"):
        cases[f"seed-{seed}"] = GOOD.replace("seed: 0", f"seed: {seed}")
    # Huge values: numbers beyond Python's digit limit, long strings, long keys, a 2 MB file.
    cases["int-5000-digits"] = GOOD.replace("epochs: 3", "epochs: " + "9" * 5000)
    cases["float-overflow"] = GOOD.replace("high: 0.5}", "high: 1.0e+5000}", 1)
    cases["long-metric"] = GOOD.replace("metric: val_accuracy", "metric: " + "v" * 100_000)
    cases["long-key"] = GOOD + "k" * 100_000 + ": 1\n"
    cases["long-dimension-name"] = GOOD.replace("  dropout:", "  " + "d" * 100_000 + ":")
    cases["two-megabytes"] = GOOD + "# " + "x" * 2_000_000 + "\n"
    cases["flow-list-2mb"] = "description: [" + "1, " * 700_000 + "1]\n"
    cases["flow-list-60kb"] = "description: [" + "1, " * 20_000 + "1]\n"
    # Wrong shapes and types, one key at a time.
    wrong = {"list": "[1, 2]", "mapping": "{a: 1}", "text": "'abc'", "null": "null", "bool": "true",
             "nan": ".nan", "inf": ".inf", "negative": "-5", "zero": "0", "huge": "1.0e+308"}
    for key, good in (("epochs", "epochs: 3"), ("trials", "trials: 4"), ("objective", None),
                      ("fixed", None), ("space", None), ("sampler", None), ("data", None)):
        for label, value in wrong.items():
            if good is not None:
                text = GOOD.replace(good, f"{key}: {value}")
            else:
                text = GOOD.split(f"\n{key}:")[0] + f"\n{key}: {value}\n" if not GOOD.startswith(key) else GOOD
            cases[f"{key}-{label}"] = text
    cases["top-level-list"] = "- 1\n- 2\n"
    cases["top-level-text"] = "just text\n"
    cases["tab-indent"] = GOOD.replace("  dropout", "\tdropout")
    cases["nul-byte"] = GOOD.replace("a good sweep", "a\x00b")
    cases["not-utf8"] = "description: \udcff\n"
    cases["unknown-top-key"] = GOOD + "epoch: 3\n"
    cases["unknown-dimension-key"] = GOOD.replace("log: true}", "log: true, lgo: 1}")
    cases["low-above-high"] = GOOD.replace("low: 0.0, high: 0.5", "low: 0.5, high: 0.0")
    cases["empty-choices"] = GOOD.replace("choices: [constant, step]", "choices: []")
    cases["condition-cycle"] = GOOD.replace("lr_schedule: {type: categorical, choices: [constant, step]}",
                                            "lr_schedule: {type: categorical, choices: [constant, step], "
                                            "when: {step_factor: 0.2}}")
    cases["no-space"] = "description: nothing to search\n"
    cases["no-budget"] = GOOD.replace("trials: 4", "trials: null")
    cases["bad-hypermodel"] = "hypermodel: ../../etc/passwd:x\n"
    cases["weights-path"] = GOOD.replace("batch_size: 64}", "batch_size: 64, weights: /nonexistent.h5}")
    cases["weights-not-hdf5"] = GOOD.replace("batch_size: 64}", "batch_size: 64, weights: /etc/passwd}")
    cases["hypermodel-stdlib"] = "hypermodel: os:system\nfixed: {batch_size: 64}\n"
    cases["hypermodel-stdlib-package"] = "hypermodel: os.path:join\nfixed: {batch_size: 64}\n"
    # YAML 1.1 leftovers: read as YAML 1.2 reads them (text), so refused where a number or a
    # boolean is due.
    cases["sexagesimal-trials"] = GOOD.replace("trials: 4", "trials: 190:20:30")
    cases["sexagesimal-epochs"] = GOOD.replace("epochs: 3", "epochs: 1:30")
    for word in ("yes", "no", "on", "off", "y", "n", "Yes", "ON"):
        cases[f"yaml11-bool-{word}"] = GOOD + f"deterministic: {word}\n"
    cases["yaml11-bool-in-fixed"] = GOOD.replace("batch_size: 64}", "batch_size: 64, flip: off}")
    cases["yaml11-date"] = GOOD.replace("epochs: 3", "epochs: 2026-01-01")
    cases["yaml11-binary"] = GOOD.replace("epochs: 3", "epochs: 0b11")
    cases["yaml11-underscore"] = GOOD.replace("trials: 4", "trials: 1_000")
    # Seconds no timer holds (every trial failed with OverflowError, the sweep exited 0).
    cases["trial-timeout-1e10"] = GOOD + "trial_timeout: 1.0e10\n"
    cases["timeout-1e12"] = GOOD + "timeout: 1.0e12\n"
    cases["heartbeat-grace-1e10"] = GOOD + "heartbeat_grace: 1.0e10\n"
    # A quoted number is text, for float keys as for int keys.
    cases["quoted-trial-timeout"] = GOOD + "trial_timeout: '10'\n"
    cases["quoted-heartbeat-grace"] = GOOD + "heartbeat_grace: '60'\n"
    cases["quoted-constraint-max"] = GOOD + "constraints: {param_count: {max: '2'}}\n"
    cases["quoted-trials"] = GOOD.replace("trials: 4", "trials: '3'")
    return cases


CORPUS = corpus()


def test_the_corpus_is_at_least_a_hundred_files() -> None:
    assert len(CORPUS) >= 100


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_a_malformed_sweep_file_is_one_line_and_exit_2_before_anything_is_written(
        isolated: Path, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = isolated / f"{name}.yaml"
    text = CORPUS[name]
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ConfigError) as raised:
        load_sweep(str(path))
    message = str(raised.value)
    assert "\n" not in message and len(message) < 1000, message[:2000]
    assert cli.sweep_main([str(path)]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1 and out.err.startswith("error: ")
    assert sorted(p.name for p in isolated.iterdir()) == [path.name]  # no mlruns/, no cache


def test_list_names_a_bomb_in_the_sweeps_folder_as_invalid(isolated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (isolated / "sweeps").mkdir()
    (isolated / "sweeps" / "bomb.yaml").write_text(CORPUS["bomb-description-9"])
    assert cli.sweep_main(["--list"]) == 0
    (line,) = [l for l in capsys.readouterr().out.splitlines() if l.startswith("bomb ")]
    assert "(invalid:" in line and "anchors and aliases" in line


def test_a_missing_hypermodel_module_is_refused_before_anything_is_written(isolated: Path) -> None:
    path = isolated / "hm.yaml"
    path.write_text("hypermodel: no_such_package.models:build\nfixed: {batch_size: 64}\n")
    result = subprocess.run([sys.executable, "-m", "cifar_exp.sweep", str(path), "--data", "/nonexistent"],
                            cwd=isolated, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "hypermodel no_such_package.models:build: no module no_such_package.models on the Python path" in line
    assert sorted(p.name for p in isolated.iterdir()) == ["hm.yaml"]


def test_numbers_and_booleans_are_read_as_yaml_1_2_reads_them(isolated: Path) -> None:
    path = isolated / "core.yaml"
    path.write_text(GOOD.replace("epochs: 3", "epochs: 010").replace("trials: 4", "trials: 0x10")
                    .replace("low: 1.0e-4", "low: 1e-4") + "deterministic: false\n")
    sweep = load_sweep(str(path))
    assert (sweep.epochs, sweep.trials, sweep.space["learning_rate"].low, sweep.deterministic) == (10, 16, 1e-4, False)


@pytest.mark.parametrize("make", [os.mkfifo, lambda path: path.symlink_to("/dev/zero")], ids=["fifo", "dev-zero"])
def test_a_sweep_name_that_is_no_regular_file_is_refused_without_reading_it(isolated: Path, make: Any) -> None:
    (isolated / "sweeps").mkdir()
    make(isolated / "sweeps" / "trap.yaml")
    # A real process, with a timeout: reading either would never end.
    result = subprocess.run([sys.executable, "-m", "cifar_exp.sweep", "trap"], cwd=isolated, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "sweeps/trap.yaml is not a regular file" in line
    listed = subprocess.run([sys.executable, "-m", "cifar_exp.sweep", "--list"], cwd=isolated, capture_output=True,
                            text=True, timeout=120)
    assert listed.returncode == 0 and "trap " in listed.stdout and "not a regular file" in listed.stdout
    assert sorted(p.name for p in isolated.iterdir()) == ["sweeps"]
