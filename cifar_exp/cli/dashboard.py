"""``cifar-exp dashboard NAME``: optuna-dashboard on the sweep's study, live while it runs."""

from __future__ import annotations

import argparse
import errno

from cifar_exp.cli import arguments
from cifar_exp.config import UserError, mask_credentials
from cifar_exp.config.sweepfile import load_sweep

DESCRIPTION = ("Serve optuna-dashboard on a sweep's study (any storage the sweep takes), live while it runs, "
               "bound to 127.0.0.1 unless told otherwise.")
SUMMARY = "optuna-dashboard on a study, live"  # its line in cifar-exp --help


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="sweep name or path to its .yaml file")
    arguments.study_name(p)
    arguments.storage(p)
    p.add_argument("--port", type=arguments.number(int, "--port", lambda v: 0 < v < 65536, "in 1..65535"), default=8080,
                   help="port (default 8080)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; the dashboard can delete studies: see docs/security.md)")


def run(args: argparse.Namespace) -> int:
    name = load_sweep(args.name, args.study).name
    from cifar_exp.sweep import dashboard, storage

    storage.load_existing(args.storage, name)  # refuses a missing storage or study, writing nothing
    study_id = storage.open_storage(args.storage).get_study_id_from_name(name)
    try:
        server = dashboard.server(args.storage, args.host, args.port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise UserError(f"port {args.port} on {args.host} is taken: pass another --port") from None
        raise
    address = f"http://{args.host}:{args.port}"
    print(f"Optuna dashboard on {mask_credentials(args.storage)}: {address}", flush=True)
    print(f"study {name}: {address}/dashboard/studies/{study_id} (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
