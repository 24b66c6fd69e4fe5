"""The Optuna dashboard (optuna-dashboard, Optuna's own live view) on a sweep's storage: any
storage the sweep takes (a journal file, SQLite, PostgreSQL), behind the same refusals as the
MLflow UI (``track.ui.refusal``): only its own address answers, and only its own pages may change
the study (the dashboard can delete studies and write notes; without the guard, any other page on
this machine could)."""

from __future__ import annotations

from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from cifar_exp.sweep import storage
from cifar_exp.track.ui import WsgiGuard, ui_hosts


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # the page polls while it is open; Ctrl-C ends the server, not a poll


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No line per request: the page polls every few seconds."""


def app(url: str, host: str, port: int) -> Any:
    """The dashboard's WSGI app on the storage ``url``, answering ``host:port`` only."""
    from optuna_dashboard import wsgi

    bound = f"[{host}]" if ":" in host else host
    origins = frozenset({f"http://{bound}:{port}", f"http://localhost:{port}", f"http://127.0.0.1:{port}"})
    return WsgiGuard(wsgi(storage.open_storage(url)), origins, ui_hosts(host, port))


def server(url: str, host: str, port: int) -> WSGIServer:
    """``app`` bound to ``host:port``, not yet serving (``OSError`` if the port is taken): the
    caller prints where it is, then calls ``serve_forever`` and, at the end, ``server_close``."""
    return make_server(host, port, app(url, host, port), server_class=_Server, handler_class=_Quiet)
