"""A tracking server seen from a client: its health and login checked before anything is
written, credentials moved from the URI to MLflow's own variables, its MLflow version compared
with this process's."""

from __future__ import annotations

import os
import urllib.parse
import urllib.request

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cifar_exp.config import UserError, mask_credentials


def _credentials_to_env(tracking_uri: str) -> str:
    """``tracking_uri`` without ``user:password@``, which go to MLflow's own variables
    ``MLFLOW_TRACKING_USERNAME`` and ``MLFLOW_TRACKING_PASSWORD`` (where MLflow's client reads
    them, for every request; they are not in the URI that MLflow stores or prints)."""
    parts = urllib.parse.urlsplit(tracking_uri)
    if parts.scheme not in ("http", "https") or parts.username is None:
        return tracking_uri
    os.environ["MLFLOW_TRACKING_USERNAME"] = urllib.parse.unquote(parts.username)
    if parts.password is not None:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = urllib.parse.unquote(parts.password)
    netloc = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def check_server(tracking_uri: str) -> None:
    """``UserError`` if ``tracking_uri`` is a tracking server (``http(s)://``) that does not answer
    its health check, or refuses this user (credentials from the URI or MLflow's variables, see
    ``_credentials_to_env``); writes nothing."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    plain = _credentials_to_env(tracking_uri)
    try:
        with urllib.request.urlopen(f"{plain.rstrip('/')}/health", timeout=10) as response:
            response.read()
    except OSError as exc:  # refused, timed out, or an HTTP error status
        raise UserError(f"the MLflow tracking server {mask_credentials(tracking_uri)} does not answer "
                        f"({getattr(exc, 'reason', exc)}): start it (README, 'Many hosts') or fix "
                        f"--tracking-uri") from None
    try:  # /health needs no login; this does, through MLflow's own client and credentials
        MlflowClient(plain).search_experiments(max_results=1)
    except MlflowException as exc:
        status = getattr(exc, "get_http_status_code", lambda: None)()
        reason = mask_credentials(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        if status in (401, 403) or "401" in reason or "403" in reason or "Unauthorized" in reason:
            raise UserError(f"the MLflow tracking server {mask_credentials(plain)} refused this user ({reason[:200]}): "
                            f"set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (README, 'Many hosts')"
                            ) from None
        raise UserError(f"the MLflow tracking server {mask_credentials(plain)} failed a request ({reason[:200]})"
                        ) from None


def version_mismatch(tracking_uri: str) -> str:
    """One line if ``tracking_uri`` is a tracking server whose MLflow version is not this
    client's, "" otherwise (or when the server does not say). A server's database schema is
    upgraded (``mlflow db upgrade``) with every writer stopped, and clients of another version
    may write what it does not expect: the line says so."""
    if not tracking_uri.startswith(("http://", "https://")):
        return ""
    try:
        with urllib.request.urlopen(f"{_credentials_to_env(tracking_uri).rstrip('/')}/version", timeout=10) as response:
            theirs = response.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""
    if not theirs or theirs == mlflow.__version__:
        return ""
    return (f"the MLflow server {mask_credentials(tracking_uri)} runs MLflow {theirs[:40]} and this process "
            f"{mlflow.__version__}: install the server's version here (pip install mlflow=={theirs[:40]}), or "
            f"upgrade the server with every sweep stopped")
