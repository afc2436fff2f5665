"""The web view started from the daemon's config: `scherzer daemon` with ``[web] enabled`` serves
it beside the API (a real daemon process on loopback); requests without a token are refused, an
observer's token gets the page; `scherzer web` refuses a public bind with one error line."""

from __future__ import annotations

import base64
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers import PortTaken, listens, lost_port_race, on_free_port, wait_for

from scherzer.cli import main
from scherzer.clients.client import LocalDaemon, free_tcp_port

TOKEN = "observer-token-0123456789abcdef"
PATTERN = {"kind": "pattern", "camera_shape": [64, 64], "speedup": 100.0}


def _status(url: str, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def _web_section(tmp_path: Path, port: int, enabled: bool) -> dict:
    token = tmp_path / "observer.token"
    token.write_text(TOKEN + "\n")
    user = {"name": "olga", "role": "observer", "token_file": str(token)}
    return {"enabled": enabled, "port": port, "users": [user]}


def _web_daemon(tmp_path: Path, port: int) -> LocalDaemon:
    """A daemon serving the web view on ``port``; :class:`PortTaken` when any of its ports
    (web, requests, events) was taken by another process first."""
    config = {"devices": dict(PATTERN), "web": _web_section(tmp_path, port, enabled=True)}
    daemon = LocalDaemon(config, tmp_path / f"daemon-{port}")
    daemon.PORT_ATTEMPTS = 1  # one retry loop for all three ports: on_free_port's
    try:
        return daemon.start()
    except RuntimeError as exc:
        if lost_port_race(daemon.stderr_tail(since_start=True)):
            raise PortTaken(str(exc)) from exc
        raise


def test_daemon_serves_the_web_view_when_enabled(tmp_path: Path) -> None:
    port, daemon = on_free_port(lambda p: _web_daemon(tmp_path, p))
    try:
        assert listens(daemon.proc.pid, port)  # this daemon serves the page, no other process
        url = f"http://127.0.0.1:{port}/"
        wait_for(lambda: _status(url) != 0, timeout_s=60)
        assert _status(url) == 401  # no token, no page
        basic = base64.b64encode(f"olga:{TOKEN}".encode()).decode()
        assert _status(url, {"Authorization": f"Basic {basic}"}) == 200
    finally:
        daemon.stop()


def test_web_command_refuses_a_public_bind(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "scherzer.toml"
    section = _web_section(tmp_path, free_tcp_port(), enabled=False)
    user = section["users"][0]
    cfg.write_text(
        f'[web]\nport = {section["port"]}\n[[web.users]]\nname = "{user["name"]}"\n'
        f'role = "observer"\ntoken_file = "{user["token_file"]}"\n'
    )
    assert main(["web", "--config", str(cfg), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "allow_remote" in err


@pytest.mark.parametrize("bad", ["nonsense = 1\n", "[web]\nport = -3\n"])
def test_bad_web_settings_are_one_error(tmp_path: Path, capsys, bad: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(bad)
    assert main(["web", "--config", str(cfg)]) == 2
    assert capsys.readouterr().err.count("error:") == 1
