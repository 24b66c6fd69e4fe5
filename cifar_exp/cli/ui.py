"""``cifar-exp ui [NAME]``: the MLflow UI on this project's store, refusing other pages' state changes."""

from __future__ import annotations

import argparse
import os
import sys

from cifar_exp.cli import arguments
from cifar_exp.cli.environment import existing_store
from cifar_exp.config import UserError, mask_credentials
from cifar_exp.config.sweepfile import load_sweep

DESCRIPTION = "Start the MLflow UI on this project's store, bound to 127.0.0.1 unless told otherwise."
SUMMARY = "the MLflow UI on this project's store"  # its line in cifar-exp --help


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="a sweep: also print the address of its experiment")
    p.add_argument("--port", type=arguments.number(int, "--port", lambda v: 0 < v < 65536, "in 1..65535"), default=5000,
                   help="port (default 5000)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; see README before exposing it)")
    arguments.study_name(p)
    arguments.tracking(p)


def run(args: argparse.Namespace) -> int:
    existing_store(args.tracking_uri)
    from cifar_exp import track

    track.configure(args.tracking_uri)
    address = f"http://{args.host}:{args.port}"
    experiment = None
    if args.name:
        name = load_sweep(args.name, args.study).name
        if track.find_experiment(name) is None:
            raise UserError(f"no experiment '{args.name}' in {args.tracking_uri}: run the sweep first")
        experiment = track.experiment_id(name)  # tags a store's older experiment as one of runs
    print(f"MLflow UI on {mask_credentials(args.tracking_uri)}: {address}", flush=True)
    if experiment is not None:
        # The runs table in MLflow's model-training view (its default view is GenAI's), on the
        # sweep's saved view of its trials where the store has it
        view = f"&viewStateShareKey={track.view.TRIALS_VIEW}" if track.view.has_trials_view(experiment) else ""
        print(f"experiment {args.name}: {address}/#/experiments/{experiment}/runs?workflowType=machine_learning"
              f"{view}", flush=True)
    # The server replaces this process: Ctrl-C and signals reach it directly, no orphan is left.
    # MLflow accepts state changes from every localhost origin: any other program's page on this
    # machine could change the store. Our app (track.ui.create_ui_app) lets only the UI's own pages.
    origins = {address, f"http://localhost:{args.port}", f"http://127.0.0.1:{args.port}"}
    os.environ[track.ui.UI_ORIGINS_ENV] = ",".join(sorted(origins))
    os.environ[track.ui.UI_HOSTS_ENV] = ",".join(sorted(track.ui.ui_hosts(args.host, args.port)))
    # MLflow's job runner (GenAI evaluation jobs) serves nothing a sweep logs: with it the UI was
    # 10 processes and answered /health after 16.1 and 19.5 s on this 2-core machine, without it
    # 2 processes and 12.1 and 12.7 s. A user who wants it sets the variable to true.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    # One worker process: MLflow's default 4 each import its server app at start. On a 2-core
    # machine /health answered after 16.0 s with 4, 10.6 s with 1, and not within 120 s with 4
    # while sweeps trained beside it. One user's UI needs no more.
    # A quiet terminal: the address above is what a user needs. MLflow's own lines are given what
    # they ask for (the registry store, the hosts and origins its middleware allows: ours, so its
    # start-up line states them), Uvicorn logs warnings only and no line per request, and the
    # deprecation of a Starlette module MLflow imports is no concern of the user's.
    warnings = "ignore::UserWarning:mlflow.server.fastapi_app"
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), warnings]))
    os.execv(sys.executable, [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", args.tracking_uri,
                              "--registry-store-uri", args.tracking_uri,
                              "--allowed-hosts", os.environ[track.ui.UI_HOSTS_ENV],
                              "--cors-allowed-origins", os.environ[track.ui.UI_ORIGINS_ENV],
                              "--host", args.host, "--port", str(args.port), "--app-name", "cifar-exp-ui",
                              "--workers", "1", "--uvicorn-opts", "--log-level warning --no-access-log"])
    return 0  # not reached
