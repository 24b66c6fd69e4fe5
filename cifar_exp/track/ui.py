"""The MLflow UI this project serves: the command that opens it, and the app behind
``python -m cifar_exp ui`` (MLflow's, answering only its own address, refusing large bodies and
state changes from other origins)."""

from __future__ import annotations

import os
import shlex
from typing import Any


def ui_command(tracking_uri: str, sweep: str, study: str | None, default_uri: str) -> str:
    """What opens the MLflow UI on the runs of ``sweep`` (as typed: a name or a path), under its
    ``study`` name if given: a tracking server's address, else ``cifar-exp ui`` (bound to 127.0.0.1
    and refusing other pages' state changes, which plain ``mlflow ui`` accepts from any localhost
    page), with ``--tracking-uri`` unless the store is ``default_uri``."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri}"
    named = f" --study {shlex.quote(study)}" if study else ""
    where = "" if tracking_uri == default_uri else f" --tracking-uri {shlex.quote(tracking_uri)}"
    return f"cifar-exp ui {shlex.quote(sweep)}{named}{where}"


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


def refusal(method: str, host: str, origin: str | None, length: str, hosts: frozenset[str],
            origins: frozenset[str]) -> tuple[int, str] | None:
    """Whether a local server (the MLflow UI, the Optuna dashboard) refuses a request, and with
    which status and text: a ``host`` header that is not one of ``hosts`` (DNS rebinding, 403), a
    Content-Length that is not a number or is over ``MAX_BODY_BYTES`` (413), a state-changing
    ``method`` that carries an ``origin`` other than ``origins`` (another page on this machine,
    403). Requests without ``Origin`` (the Python client, curl) are no browser page and pass."""
    if hosts and host.lower() not in hosts:
        return 403, f"this server answers only {', '.join(sorted(hosts))}"
    if not length.isdigit() or int(length) > MAX_BODY_BYTES:
        return 413, f"request body over {MAX_BODY_BYTES} bytes (or a bad Content-Length)"
    if method.encode() in _WRITES and origin is not None and origin not in origins:
        return 403, "cross-origin request refused: only the server's own pages may change the store"
    return None


class Guard:
    """ASGI middleware in front of MLflow's app: requests ``refusal`` names are refused, and a
    chunked body is cut once it passes ``MAX_BODY_BYTES``. MLflow's own guard lets every localhost
    origin through, so any other program's page on this machine could change the store."""

    def __init__(self, app: Any, origins: frozenset[str], hosts: frozenset[str]) -> None:
        self.app, self.origins, self.hosts = app, origins, hosts

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        origin = headers.get(b"origin")
        refused = refusal(scope["method"], headers.get(b"host", b"").decode("latin-1"),
                          None if origin is None else origin.decode("latin-1"),
                          headers.get(b"content-length", b"0").decode("latin-1"), self.hosts, self.origins)
        if refused:
            await _refuse(send, *refused)
            return
        await self.app(scope, _bounded(receive), send)


class WsgiGuard:
    """The same refusals (``refusal``) in front of a WSGI app (the Optuna dashboard's)."""

    def __init__(self, app: Any, origins: frozenset[str], hosts: frozenset[str]) -> None:
        self.app, self.origins, self.hosts = app, origins, hosts

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        refused = refusal(environ.get("REQUEST_METHOD", "GET"), environ.get("HTTP_HOST", ""),
                          environ.get("HTTP_ORIGIN"), environ.get("CONTENT_LENGTH") or "0", self.hosts, self.origins)
        if refused:
            status, text = refused
            start_response(f"{status} {'Forbidden' if status == 403 else 'Content Too Large'}",
                           [("Content-Type", "text/plain; charset=utf-8")])
            return [text.encode()]
        return self.app(environ, start_response)


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
