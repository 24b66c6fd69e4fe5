"""What the project must never do, checked in its source: load models with safe_mode off, or
unpickle what it did not write; and what the UI's guard refuses (other hosts, big bodies, other
origins' writes), through the ASGI middleware itself."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

from cifar_exp.track import ui
from tests.conftest import ROOT

SOURCES = sorted((ROOT / "cifar_exp").rglob("*.py"))


@pytest.mark.parametrize("pattern", [r"enable_unsafe_deserialization", r"safe_mode\s*=\s*False",
                                     r"allow_pickle\s*=\s*True", r"pickle\.loads?\(", r"cloudpickle\.",
                                     r"yaml\.load\(", r"yaml\.unsafe_load", r"\beval\(", r"\bexec\("])
def test_the_package_never_calls(pattern: str) -> None:
    found = [f"{path.name}:{n}" for path in SOURCES for n, line in enumerate(path.read_text().splitlines(), 1)
             if re.search(pattern, line)]
    assert found == []


def test_keras_models_are_loaded_with_safe_mode_on() -> None:
    loads = [line for path in SOURCES for line in path.read_text().splitlines()
             if re.search(r"(keras|mlflow\.keras|saving)\.load_model\b", line)]
    assert loads and all('"safe_mode": True' in line or "safe_mode=True" in line for line in loads), loads


def _ask(method: str, headers: dict[str, str], body: bytes = b"", chunks: int = 1) -> tuple[int, bytes]:
    """One request through the UI's guard (bound to 127.0.0.1:5000): its status, and what the app behind it read."""
    scope = {"type": "http", "method": method, "headers": [(k.encode(), v.encode()) for k, v in headers.items()]}
    parts = [{"type": "http.request", "body": body, "more_body": i < chunks - 1} for i in range(chunks)]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return parts.pop(0) if parts else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def app(scope: Any, receive: Any, send: Any) -> None:  # reads the whole body, then answers 200
        read = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                await send({"type": "http.response.start", "status": 400})
                return
            read += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": read[:10]})

    asyncio.run(ui.Guard(app, frozenset({"http://127.0.0.1:5000"}), ui.ui_hosts("127.0.0.1", 5000))(
        scope, receive, send))
    return sent[0]["status"], sent[-1].get("body", b"")


@pytest.mark.parametrize("host", ["0.0.0.0:5000", "10.0.0.5", "[::1]:5000", "127.0.0.1:1@evil.example",
                                  "localhost:5000/evil.example", "127.0.0.1:5001", "localhost", "evil.example", ""])
def test_the_ui_answers_only_its_own_address(host: str) -> None:
    assert _ask("GET", {"host": host})[0] == 403


@pytest.mark.parametrize("host", ["127.0.0.1:5000", "localhost:5000", "LOCALHOST:5000"])
def test_the_ui_answers_its_bound_address_and_localhost(host: str) -> None:
    assert _ask("GET", {"host": host}) == (200, b"")
    assert ui.ui_hosts("::1", 5000) == {"[::1]:5000", "localhost:5000"}


def test_the_ui_refuses_bodies_over_its_cap_declared_or_streamed() -> None:
    ok = {"host": "127.0.0.1:5000"}
    assert _ask("POST", {**ok, "content-length": "5"}, b"hello") == (200, b"hello")
    assert _ask("POST", {**ok, "content-length": str(100 << 20)}, b"x")[0] == 413
    assert _ask("POST", {**ok, "content-length": "-1"}, b"x")[0] == 413
    streamed = b"x" * (ui.MAX_BODY_BYTES // 4 + 1)  # chunked: no Content-Length, 4 chunks over the cap
    assert _ask("POST", ok, streamed, chunks=4)[0] == 400  # the app saw the request end early
    assert _ask("POST", {**ok, "origin": "http://127.0.0.1:5001"})[0] == 403
