"""The MLflow UI this project serves: the command that opens it, and the app behind
``python -m cifar_exp.ui`` (MLflow's, refusing state changes from other origins)."""

from __future__ import annotations

import os
from typing import Any


def ui_command(tracking_uri: str) -> str:
    """The shell command that opens the MLflow UI on this store."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri}"
    return f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000"


UI_ORIGINS_ENV = "CIFAR_EXP_UI_ORIGINS"  # comma-separated origins that may change the store through the UI
_WRITES = (b"POST", b"PUT", b"PATCH", b"DELETE")


class SameOriginWrites:
    """ASGI middleware: a state-changing request that carries an ``Origin`` header other than the
    ``origins`` is refused (403). MLflow's own guard lets every localhost origin through, so any
    other program's page on this machine could change the store; requests without ``Origin``
    (the Python client, curl) are no browser page and pass."""

    def __init__(self, app: Any, origins: frozenset[str]) -> None:
        self.app, self.origins = app, origins

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"].encode() in _WRITES:
            origin = dict(scope["headers"]).get(b"origin")
            if origin is not None and origin.decode("latin-1") not in self.origins:
                await send({"type": "http.response.start", "status": 403,
                            "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
                await send({"type": "http.response.body",
                            "body": b"cross-origin request refused: only the UI's own pages may change the store"})
                return
        await self.app(scope, receive, send)


def create_ui_app() -> Any:
    """The MLflow app that ``python -m cifar_exp.ui`` serves (``mlflow ui --app-name cifar-exp-ui``,
    an ``mlflow.app`` entry point): MLflow's own, behind ``SameOriginWrites`` for the origins in
    ``$CIFAR_EXP_UI_ORIGINS``."""
    from mlflow.server import app as flask_app
    from mlflow.server.fastapi_app import create_fastapi_app

    origins = frozenset(o for o in os.environ.get(UI_ORIGINS_ENV, "").split(",") if o)
    return SameOriginWrites(create_fastapi_app(flask_app), origins)
