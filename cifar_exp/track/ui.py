"""The MLflow UI this project serves: the command that opens it, and the app behind
``python -m cifar_exp ui`` (MLflow's, answering only its own address, refusing large bodies and
state changes from other origins)."""

from __future__ import annotations

import os
from typing import Any


def ui_command(tracking_uri: str) -> str:
    """The shell command that opens the MLflow UI on this store."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri}"
    return f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000"


UI_ORIGINS_ENV = "CIFAR_EXP_UI_ORIGINS"  # comma-separated origins that may change the store through the UI
UI_HOSTS_ENV = "CIFAR_EXP_UI_HOSTS"  # comma-separated Host headers the UI answers (host:port)
MAX_BODY_BYTES = 16 << 20  # the UI's own requests are a few KB; larger bodies are refused (413)
_WRITES = (b"POST", b"PUT", b"PATCH", b"DELETE")


def ui_hosts(host: str, port: int) -> frozenset[str]:
    """The ``Host`` headers a UI bound to ``host:port`` answers: exactly the bound address and
    ``localhost``, with the bound port (anything else is DNS rebinding or a confused proxy)."""
    bound = f"[{host}]" if ":" in host else host
    return frozenset({f"{bound}:{port}", f"localhost:{port}"})


async def _refuse(send: Any, status: int, text: str) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
    await send({"type": "http.response.body", "body": text.encode()})


class Guard:
    """ASGI middleware in front of MLflow's app: a request whose ``Host`` header is not one of
    ``hosts`` is refused (403), one whose body is over ``MAX_BODY_BYTES`` too (413, by its
    Content-Length or as it streams in), and a state-changing request that carries an ``Origin``
    header other than the ``origins`` as well (403). MLflow's own guard lets every localhost
    origin through, so any other program's page on this machine could change the store; requests
    without ``Origin`` (the Python client, curl) are no browser page and pass."""

    def __init__(self, app: Any, origins: frozenset[str], hosts: frozenset[str]) -> None:
        self.app, self.origins, self.hosts = app, origins, hosts

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1").lower()
        if self.hosts and host not in self.hosts:
            await _refuse(send, 403, f"this server answers only {', '.join(sorted(self.hosts))}")
            return
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            await _refuse(send, 413, f"request body over {MAX_BODY_BYTES} bytes (or a bad Content-Length)")
            return
        origin = headers.get(b"origin")
        if scope["method"].encode() in _WRITES and origin is not None and origin.decode("latin-1") not in self.origins:
            await _refuse(send, 403, "cross-origin request refused: only the UI's own pages may change the store")
            return
        await self.app(scope, _bounded(receive), send)


def _bounded(receive: Any) -> Any:
    """``receive`` that ends the request once its body passes ``MAX_BODY_BYTES`` (a chunked body
    has no Content-Length to check up front)."""
    seen = 0

    async def bounded() -> Any:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > MAX_BODY_BYTES:
                return {"type": "http.disconnect"}
        return message

    return bounded


def create_ui_app() -> Any:
    """The MLflow app that ``python -m cifar_exp ui`` serves (``mlflow ui --app-name cifar-exp-ui``,
    an ``mlflow.app`` entry point): MLflow's own, behind ``Guard`` for the origins in
    ``$CIFAR_EXP_UI_ORIGINS`` and the hosts in ``$CIFAR_EXP_UI_HOSTS``."""
    from mlflow.server import app as flask_app
    from mlflow.server.fastapi_app import create_fastapi_app

    origins = frozenset(o for o in os.environ.get(UI_ORIGINS_ENV, "").split(",") if o)
    hosts = frozenset(h for h in os.environ.get(UI_HOSTS_ENV, "").split(",") if h)
    return Guard(create_fastapi_app(flask_app), origins, hosts)
