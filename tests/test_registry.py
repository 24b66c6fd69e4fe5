"""From best trial to a model people use: registration and promotion by alias, prediction,
evaluation, safe loading and serving, on a real MLflow store and the CIFAR-10 (JPEG copy)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
import zlib
from pathlib import Path
from unittest import mock

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from cifar_exp import registry, track
from cifar_exp.config import ConfigError, UserError
from cifar_exp.config.sweepfile import parse_sweep
from tests.conftest import ROOT, in_process, write_slice
from tests.test_shipped import sweep_in_process
from tests.test_sweep import clean_env, run_sweep

TEST_SWEEPS = ROOT / "tests" / "sweeps"
NAME = "cifar10-demo"

# ---------------------------------------------------------------------------------------------
# Fast


def test_top_k_orders_classes_by_probability() -> None:
    probs = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]])
    assert registry.top_k(probs, ["a", "b", "c"], 2) == [[("b", 0.7), ("c", 0.2)], [("a", 0.5), ("c", 0.3)]]
    assert len(registry.top_k(probs, ["a", "b", "c"], 10)[0]) == 3


def test_read_images_resizes_any_size_to_the_model_input(isolated: Path) -> None:
    Image.new("RGB", (100, 60), (255, 0, 0)).save(isolated / "wide.png")
    Image.new("L", (32, 32), 128).save(isolated / "gray.jpg")
    images = registry.resized(registry.read_images([str(isolated / "wide.png"), str(isolated / "gray.jpg")]), (32, 32))
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    assert images[0, 10, 10].tolist() == [255, 0, 0] and images[1, 5, 5].tolist() == [128, 128, 128]


def test_unreadable_images_are_named(isolated: Path) -> None:
    (isolated / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match="image .*notes.txt is not a readable image"):
        registry.read_images([str(isolated / "notes.txt")])
    with pytest.raises(UserError, match="image .*missing.jpg does not exist"):
        registry.read_images([str(isolated / "missing.jpg")])


def test_predict_checks_its_images_before_it_loads_a_model(isolated: Path) -> None:
    uri = f"sqlite:///{isolated}/mlruns/mlflow.db"
    track.configure(uri)  # a store, with no model in it: loading one would fail with another message
    os.mkfifo(isolated / "pipe.jpg")
    (isolated / "notes.txt").write_text("not an image")
    for image, fragment in (("pipe.jpg", "is not a regular file"), ("notes.txt", "is not a readable image"),
                            ("missing.png", "does not exist")):
        code, out, err = in_process(isolated, "predict", str(isolated / image), "--model", "models:/nothing@champion",
                                    "--tracking-uri", uri)
        assert code == 2 and out == "", err
        (line,) = err.strip().splitlines()
        assert f"{image} {fragment}" in line and "nothing@champion" not in line


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header says ``width`` x ``height``, 8-bit gray, with no pixels in it."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_pipes_huge_headers_and_16_bit_images_are_refused_before_decoding(isolated: Path) -> None:
    os.mkfifo(isolated / "pipe.jpg")
    with pytest.raises(UserError, match="pipe.jpg is not a regular file"):
        registry.read_images([str(isolated / "pipe.jpg")])  # would block forever on open
    # A PNG header claiming 12000x12000 (a decompression bomb): refused from the header alone.
    (isolated / "huge.png").write_bytes(png_header(12000, 12000))
    with pytest.raises(UserError, match="huge.png is 12000x12000 pixels"):
        registry.read_images([str(isolated / "huge.png")])
    Image.fromarray(np.full((32, 32), 32768, dtype=np.uint16)).save(isolated / "deep.png")
    with pytest.raises(UserError, match="deep.png has pixel mode I;16"):
        registry.read_images([str(isolated / "deep.png")])


def test_registered_model_name_defaults_and_is_validated() -> None:
    text = "space:\n  dropout: {type: float, low: 0.0, high: 0.5}\n"
    assert parse_sweep("abc", text, Path("abc.yaml")).model_name == "cifar10-abc"
    assert parse_sweep("abc", text + "registered_model: mine\n", Path("abc.yaml")).model_name == "mine"
    with pytest.raises(ConfigError, match="registered_model: 'a b/c' is not a valid name"):
        parse_sweep("abc", text + "registered_model: a b/c\n", Path("abc.yaml"))


class _Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        return model_input


def test_a_pickled_python_model_is_refused(isolated: Path) -> None:
    # Refused from its MLmodel alone, before anything is unpickled.
    track.configure(f"sqlite:///{isolated}/mlruns/mlflow.db")
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="model", python_model=_Echo())
    with pytest.raises(UserError, match=f"refusing to load {info.model_uri}: it carries Python code or a pickled"):
        registry.load(info.model_uri)


def test_a_keras_model_with_python_code_is_refused_and_says_why(isolated: Path) -> None:
    import keras

    track.configure(f"sqlite:///{isolated}/mlruns/mlflow.db")
    inputs = keras.Input((32, 32, 3))
    model = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2.0)(inputs))  # bytecode inside the file
    with mlflow.start_run():
        info = mlflow.keras.log_model(model, name="model")
    with pytest.raises(UserError, match=f"refusing to load {info.model_uri}: Keras' safe_mode refused it: it holds "
                                        f"a Lambda layer"):
        registry.load(info.model_uri)


def cli(module: str, *args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cifar_exp", module, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=900, env=clean_env(**(env or {})))


@pytest.mark.parametrize("module, args, fragment", [
    ("register", ["lr_dropout"], "no MLflow store at mlruns/mlflow.db"),
    ("predict", ["x.jpg"], "no MLflow store at mlruns/mlflow.db"),
    ("predict", ["x.jpg", "--top-k", "0"], "--top-k must be greater than 0"),
    ("evaluate", ["models:/nothing@champion"], "no MLflow store at mlruns/mlflow.db"),
    ("register", ["no_such_sweep"], "unknown sweep 'no_such_sweep'"),
])
def test_bad_input_is_one_line_exit_2(isolated: Path, module: str, args: list[str], fragment: str) -> None:
    result = cli(module, *args, cwd=isolated)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert not (isolated / "mlruns").exists()


# ---------------------------------------------------------------------------------------------
# Slow: two real sweeps registering into one model name


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """registry_good (2 trials) as the sweep command with --register, then registry_worse (1 trial)
    and its register command in this process, on 1,000 training and 200 test images of the
    CIFAR-10 (JPEG copy)."""
    folder = tmp_path_factory.mktemp("registry")
    data = write_slice(folder / "slice.zip", 100, 20)
    found = {"folder": folder, "data": data, "env": {"CIFAR_EXP_CACHE": str(folder / "cache")},
             "uri": f"sqlite:///{folder}/mlruns/mlflow.db", "storage": str(folder / "mlruns" / "optuna.journal")}
    good = run_sweep(folder, str(TEST_SWEEPS / "registry_good.yaml"), "--data", str(data), "--register",
                     env=found["env"])
    found["good"], found["good_stderr"] = good.stdout, good.stderr
    with mock.patch.dict(os.environ, found["env"]):
        sweep_in_process(folder, TEST_SWEEPS / "registry_worse.yaml", trials=1, epochs=2, data=data)
    code, found["worse"], err = command(found, "register", str(TEST_SWEEPS / "registry_worse.yaml"), "--data",
                                        str(data), "--storage", found["storage"], "--tracking-uri", found["uri"])
    assert code == 0, err
    return found


def command(registered: dict, *argv: str) -> tuple[int, str, str]:
    """A command in this process (``in_process``), in the registry's folder with its cache."""
    return in_process(registered["folder"], *argv, env=registered["env"])


def client(registered: dict) -> MlflowClient:
    mlflow.set_tracking_uri(registered["uri"])
    return MlflowClient()


def best_good_trial(registered: dict) -> tuple[str, float]:
    import optuna

    from cifar_exp.sweep.storage import open_storage

    study = optuna.load_study(study_name="registry_good",
                              storage=open_storage(str(registered["folder"] / "mlruns" / "optuna.journal")))
    return study.best_trial.user_attrs["mlflow_run_id"], study.best_trial.user_attrs["test_accuracy"]


@pytest.mark.slow
def test_the_champion_is_the_best_trial_and_a_worse_sweep_leaves_it(registered: dict) -> None:
    run_id, test_accuracy = best_good_trial(registered)
    assert f"alias champion -> version 1: first champion of {NAME}" in registered["good"]
    assert "not promoted to champion: test_accuracy" in registered["worse"]
    assert "does not beat champion version 1's" in registered["worse"]
    c = client(registered)
    champion = c.get_model_version_by_alias(NAME, "champion")
    assert str(champion.version) == "1" and champion.run_id == run_id
    assert str(c.get_model_version_by_alias(NAME, "challenger").version) == "2"  # the worse sweep's model
    assert champion.tags["run_id"] == run_id and float(champion.tags["test_accuracy"]) == test_accuracy
    assert {"seed", "learning_rate", "val_accuracy", "trial", "sweep"} <= set(champion.tags)
    assert run_id in champion.description and "learning_rate=" in champion.description
    aliases = c.get_registered_model(NAME).aliases
    assert {k: str(v) for k, v in aliases.items()} == {"champion": "1", "challenger": "2"}


@pytest.mark.slow
def test_keep_models_collects_the_rest_when_the_sweep_ends_after_registering(registered: dict) -> None:
    import optuna

    from cifar_exp.sweep.storage import open_storage

    study = optuna.load_study(study_name="registry_good",
                              storage=open_storage(str(registered["folder"] / "mlruns" / "optuna.journal")))
    (other,) = [t for t in study.trials if t.number != study.best_trial.number]
    assert f"gc registry_good: deleted the models of trial {other.number}: " in registered["good"]
    assert study.user_attrs["models_collected"] == [other.number]
    c = client(registered)
    c.get_logged_model(study.best_trial.user_attrs["model_uri"].removeprefix("models:/"))  # the best keeps its model
    with pytest.raises(mlflow.exceptions.MlflowException):
        c.get_logged_model(other.user_attrs["model_uri"].removeprefix("models:/"))


@pytest.mark.slow
def test_registering_the_same_run_twice_keeps_one_version(registered: dict) -> None:
    code, out, err = command(registered, "register", str(TEST_SWEEPS / "registry_good.yaml"), "--storage",
                             registered["storage"], "--tracking-uri", registered["uri"])
    assert code == 0, err
    assert f"already registered: {NAME} version 1" in out
    versions = client(registered).search_model_versions(f"name='{NAME}'")
    assert sorted(str(v.version) for v in versions) == ["1", "2"]


@pytest.mark.slow
def test_commands_that_load_a_model_keep_the_libraries_lines_off_the_terminal(registered: dict) -> None:
    """TensorFlow's native code writes to the process's stderr past its log level (start-up lines
    at import; a failed cuInit whenever it first looks for a device), and MLflow prints its
    registration messages: in real processes, a sweep's --register, register and predict print
    only their own lines; the libraries' go to the log. register and predict run with TensorFlow's
    log level at 0, so that its native lines come after the import too, on any machine."""
    where = {"cwd": registered["folder"], "env": {**registered["env"], "TF_CPP_MIN_LOG_LEVEL": "0"}}
    logs = registered["folder"] / "mlruns" / "logs"
    before = {name: (logs / name).stat().st_size if (logs / name).exists() else 0
              for name in ("registry_good.log", "predict.log")}
    register = cli("register", str(TEST_SWEEPS / "registry_good.yaml"), "--storage", registered["storage"],
                   "--tracking-uri", registered["uri"], **where)
    predict = cli("predict", str(jpegs(registered, 1)[0]), "--model", f"models:/{NAME}@champion", "--tracking-uri",
                  registered["uri"], **where)
    assert register.returncode == 0 and predict.returncode == 0, register.stderr + predict.stderr
    assert "already registered" in register.stdout and "probability" in predict.stdout
    noise = ("oneDNN", "cuda", "absl", "INFO", "WARNING", "Registered model", "Created version")
    for out, err in ((registered["good"], registered["good_stderr"]), (register.stdout, register.stderr),
                     (predict.stdout, predict.stderr)):
        assert err == "", err
        assert not [line for line in out.splitlines() if any(n in line for n in noise)], out
    assert all((logs / name).stat().st_size > size for name, size in before.items())  # TensorFlow's lines


def jpegs(registered: dict, n: int = 6) -> list[Path]:
    out = registered["folder"] / "images"
    out.mkdir(exist_ok=True)
    with zipfile.ZipFile(registered["data"]) as z:
        names = [name for name in z.namelist() if name.startswith("test/")][::37][:n]
        for name in names:
            (out / name.replace("/", "_")).write_bytes(z.read(name))
    return sorted(out.iterdir())


def champion_predictions(registered: dict, images: np.ndarray) -> np.ndarray:
    client(registered)
    model = mlflow.keras.load_model(f"models:/{NAME}@champion")
    return np.asarray(model.predict(images.astype("float32"), verbose=0))


@pytest.mark.slow
def test_predict_gives_the_models_own_classes(registered: dict) -> None:
    files = jpegs(registered)
    code, out, err = command(registered, "predict", *map(str, files), "--model", f"models:/{NAME}@champion", "--json",
                             "--top-k", "2", "--tracking-uri", registered["uri"])
    assert code == 0, err
    answers = json.loads(out)
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    expected = champion_predictions(registered, images)
    classes = [a["predictions"][0]["class"] for a in answers]
    names = mlflow.models.get_model_info(f"models:/{NAME}@champion").metadata["class_names"]
    assert classes == [names[i] for i in expected.argmax(axis=1)]
    assert all(len(a["predictions"]) == 2 for a in answers)
    np.testing.assert_allclose([a["predictions"][0]["probability"] for a in answers], expected.max(axis=1),
                               rtol=1e-5)


@pytest.mark.slow
def test_evaluate_logs_a_fresh_run_with_a_trials_artifacts(registered: dict) -> None:
    run_id, test_accuracy = best_good_trial(registered)
    code, _, err = command(registered, "evaluate", f"models:/{NAME}@champion", "--tracking-uri", registered["uri"])
    assert code == 0, err
    c = client(registered)
    (evaluation,) = [r for r in c.search_runs([c.get_run(run_id).info.experiment_id])
                     if r.data.tags.get("evaluated_model") == f"models:/{NAME}@champion"]
    assert evaluation.data.tags["source_run_id"] == run_id
    assert evaluation.data.metrics["test_accuracy"] == pytest.approx(test_accuracy, abs=1e-9)
    artifacts = {a.path for a in c.list_artifacts(evaluation.info.run_id)}
    assert {"confusion_matrix.png", "confusion_matrix.csv", "classification_report.json",
            "prediction_grid.png"} <= artifacts


@pytest.mark.slow
def test_pyfunc_loads_without_pickle(registered: dict) -> None:
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in jpegs(registered)])
    np.save(registered["folder"] / "images.npy", images)
    code = (f"import mlflow, numpy as np; m = mlflow.pyfunc.load_model('models:/{NAME}@champion'); "
            f"np.save('pyfunc.npy', m.predict(np.load('images.npy').astype('float32')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=registered["folder"], capture_output=True, text=True,
                            timeout=300, env=clean_env(MLFLOW_TRACKING_URI=registered["uri"],
                                                       MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false"))
    assert result.returncode == 0, result.stderr
    np.testing.assert_allclose(np.load(registered["folder"] / "pyfunc.npy"),
                               champion_predictions(registered, images), rtol=1e-5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_mlflow_models_serve_answers_rest_predictions(registered: dict) -> None:
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in jpegs(registered)])
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager",
         "local", "--host", "127.0.0.1", "--port", str(port)],
        cwd=registered["folder"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        # PATH: the server runs `uvicorn` from this environment, as from an activated virtualenv.
        env=clean_env(MLFLOW_TRACKING_URI=registered["uri"],
                      PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])))
    try:
        deadline = time.time() + 240
        while True:
            assert server.poll() is None, server.stderr.read() if server.stderr else "server exited"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "server did not answer /ping within 240 s"
                time.sleep(1)
        answers = []
        for pixels in (images.tolist(), images.astype(float).tolist()):  # uint8 values, then floats
            request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                             data=json.dumps({"inputs": pixels}).encode(),
                                             headers={"Content-Type": "application/json"})
            answers.append(np.asarray(json.loads(urllib.request.urlopen(request, timeout=60).read())["predictions"]))
    finally:
        server.terminate()
        server.wait(timeout=30)
    expected = champion_predictions(registered, images)
    for predictions in answers:
        assert predictions.shape == (len(images), 10)
        np.testing.assert_allclose(predictions, expected, rtol=1e-4, atol=1e-6)


def test_unknown_model_and_empty_study_are_one_line_errors(isolated: Path) -> None:
    import optuna

    from cifar_exp.sweep.storage import open_storage

    track.configure(f"sqlite:///{isolated}/mlruns/mlflow.db")
    Image.new("RGB", (32, 32)).save(isolated / "x.jpg")
    result = cli("predict", "x.jpg", "--model", "models:/nothing@champion", cwd=isolated)
    assert result.returncode == 2 and "error: cannot load models:/nothing@champion" in result.stderr
    optuna.create_study(study_name="lr_dropout", storage=open_storage(str(isolated / "mlruns" / "optuna.journal")),
                        direction="maximize")
    result = cli("register", "lr_dropout", cwd=isolated)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == \
        "error: the study has no completed trial with a logged model yet: run the sweep first"


KILL_AT_STATEMENT = """
import os, signal, sys
import sqlalchemy
from cifar_exp.cli import main

def kill_at(conn, cursor, statement, *args):  # SIGKILL itself as such a statement goes to the store
    if all(part in statement for part in os.environ["KILL_AT"].split("|")):
        os.kill(os.getpid(), signal.SIGKILL)

sqlalchemy.event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", kill_at)
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_register_killed_after_creating_the_version_is_completed_by_the_next_register(
        registered: dict, isolated: Path) -> None:
    shutil.copytree(registered["folder"] / "mlruns", isolated / "mlruns")  # the sweeps' store, to spoil
    uri, storage = f"sqlite:///{isolated}/mlruns/mlflow.db", str(isolated / "mlruns" / "optuna.journal")
    MlflowClient(uri).delete_registered_model(NAME)
    argv = ["register", str(TEST_SWEEPS / "registry_good.yaml"), "--storage", storage, "--tracking-uri", uri,
            "--data", str(registered["data"])]
    killed = subprocess.run([sys.executable, "-c", KILL_AT_STATEMENT, *argv], cwd=isolated, capture_output=True,
                            text=True, timeout=900, env=clean_env(KILL_AT="UPDATE model_versions SET|description",
                                                                  **registered["env"]))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (half,) = MlflowClient(uri).search_model_versions(f"name='{NAME}'")
    assert not half.description  # killed between the version and its description
    code, out, err = in_process(isolated, *argv, env=registered["env"])
    assert code == 0, err
    assert f"already registered: {NAME} version 1" in out and "alias champion -> version 1" in out
    (version,) = MlflowClient(uri).search_model_versions(f"name='{NAME}'")
    run_id, test_accuracy = best_good_trial(registered)
    assert run_id in version.description and "learning_rate=" in version.description
    assert version.tags["run_id"] == run_id and float(version.tags["test_accuracy"]) == test_accuracy
    assert {"seed", "learning_rate", "val_accuracy", "trial", "sweep"} <= set(version.tags)
