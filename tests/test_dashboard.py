"""``cifar-exp dashboard NAME``: optuna-dashboard on a sweep's study, behind the UI's refusals, with
the objectives named; the page tested in a real headless Chromium (slow tier)."""

from __future__ import annotations

import io
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution

from tests.test_hosts import free_port
from tests.test_sweep import chromium, clean_env, page_lines


def _study(folder: Path, sweep: str = "deploy") -> optuna.Study:
    """The study of ``sweep`` as the sweep creates it (``storage.create_study``), in a journal under
    ``folder``, with three finished trials (no training) and, for several objectives, its
    companion pruning study."""
    from cifar_exp.config import Settings
    from cifar_exp.config.sweepfile import load_sweep
    from cifar_exp.sweep import pruning, storage

    settings = Settings(sweep=load_sweep(sweep), storage=str(folder / "mlruns" / "optuna.journal"),
                        tracking_uri="sqlite:///unused.db")
    study = storage.create_study(settings)
    for number, values in enumerate([(0.41, 3.0), (0.55, 5.0), (0.62, 4.0)]):
        study.add_trial(optuna.trial.create_trial(
            params={"learning_rate": 10 ** -(2 + number * 0.3)},
            distributions={"learning_rate": FloatDistribution(1e-4, 1e-1, log=True)},
            values=list(values[:len(study.directions)])))
    if len(study.directions) > 1:
        pruning.companion(settings, storage.open_storage(settings.storage))
    return study


def test_a_study_names_its_objectives_and_its_pruning_companion_says_what_it_is(tmp_path: Path) -> None:
    assert _study(tmp_path / "one", "lr_dropout").metric_names == ["val_accuracy"]
    study = _study(tmp_path / "two", "deploy")
    assert study.metric_names == ["val_accuracy", "latency_ms"]  # the Pareto plot's axes, not 0 and 1
    companion = optuna.load_study(study_name="deploy.pruning", storage=study._storage)
    assert companion.metric_names == ["val_accuracy (pruning curves of study deploy)"]
    assert companion.user_attrs["companion_of"] == "deploy"


def _call(app: object, method: str, host: str, origin: str | None = None, length: str = "0") -> str:
    environ = {"REQUEST_METHOD": method, "HTTP_HOST": host, "CONTENT_LENGTH": length, "PATH_INFO": "/api/studies",
               "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8080", "wsgi.input": io.BytesIO(b""),
               "wsgi.url_scheme": "http", "wsgi.errors": io.StringIO(), "QUERY_STRING": ""}
    if origin:
        environ["HTTP_ORIGIN"] = origin
    statuses: list[str] = []
    b"".join(app(environ, lambda status, headers, *_: statuses.append(status)))  # type: ignore[operator]
    return statuses[0]


def test_the_dashboard_answers_its_own_address_and_refuses_other_pages_changes(tmp_path: Path) -> None:
    from cifar_exp.sweep import dashboard

    _study(tmp_path)
    app = dashboard.app(str(tmp_path / "mlruns" / "optuna.journal"), "127.0.0.1", 8080)
    assert _call(app, "GET", "127.0.0.1:8080").startswith("200")
    assert _call(app, "GET", "localhost:8080").startswith("200")
    assert _call(app, "GET", "attacker.example:8080").startswith("403")  # DNS rebinding
    assert _call(app, "DELETE", "127.0.0.1:8080", origin="http://127.0.0.1:9999").startswith("403")
    assert _call(app, "POST", "127.0.0.1:8080", length=str(64 << 20)).startswith("413")
    # its own page may create a study (the dashboard's Create button): 201
    assert _call(app, "POST", "127.0.0.1:8080", origin="http://127.0.0.1:8080").split()[0] != "403"


@pytest.mark.parametrize("argv, message", [
    (["no_such_sweep"], "unknown sweep 'no_such_sweep'"),
    (["lr_dropout"], "no study 'lr_dropout' in mlruns/optuna.journal (studies: deploy, deploy.pruning)"),
    (["deploy", "--study", "../x"], "invalid --study '../x'"),
])
def test_dashboard_refuses_in_one_line(tmp_path: Path, argv: list[str], message: str) -> None:
    _study(tmp_path)
    done = subprocess.run([sys.executable, "-m", "cifar_exp", "dashboard", *argv], cwd=tmp_path, env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert message in line, line
    assert done.stdout == ""


def _serve(folder: Path, port: int) -> subprocess.Popen[str]:
    server = subprocess.Popen([sys.executable, "-m", "cifar_exp", "dashboard", "deploy", "--port", str(port)],
                              cwd=folder, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5).read()
            return server
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, server.communicate()
            time.sleep(0.3)


def test_a_taken_port_is_one_line_and_nothing_printed_before_it(tmp_path: Path) -> None:
    _study(tmp_path)
    port = free_port()
    first = _serve(tmp_path, port)
    try:
        second = subprocess.run([sys.executable, "-m", "cifar_exp", "dashboard", "deploy", "--port", str(port)],
                                cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and second.stdout == ""
        assert second.stderr.strip() == f"error: port {port} on 127.0.0.1 is taken: pass another --port"
    finally:
        first.terminate()
        first.wait(timeout=30)


@pytest.mark.slow
def test_the_dashboard_page_shows_the_study_with_its_objectives_named(tmp_path: Path) -> None:
    """In a real headless Chromium: the study list names the sweep's study and its pruning
    companion; the study's page draws its Pareto front on val_accuracy against latency_ms, not
    "Objective 0" and "Objective 1"; a screenshot is saved."""
    study = _study(tmp_path)
    port = free_port()
    server = _serve(tmp_path, port)
    try:
        listing = page_lines(f"http://127.0.0.1:{port}/dashboard", 30_000, tmp_path / "chrome")
        assert "0. deploy" in listing and "1. deploy.pruning" in listing, listing
        url = f"http://127.0.0.1:{port}/dashboard/studies/{study._study_id}"
        lines = page_lines(url, 30_000, tmp_path / "chrome")
        assert "deploy (id=0)" in lines and "Pareto Front" in lines, lines
        x, y = lines.index("Objective X:"), lines.index("Objective Y:")
        assert lines[x + 1] == "val_accuracy" and lines[y + 1] == "latency_ms", lines
        assert not [line for line in lines if line.startswith("Objective 0")], lines
        shot = tmp_path / "dashboard.png"
        chromium(url, "--virtual-time-budget=30000", f"--screenshot={shot}", profile=tmp_path / "chrome")
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    finally:
        server.terminate()
        out, err = server.communicate(timeout=30)
    assert "Traceback" not in err, err
