"""The live web view (issue #17): a real daemon with simulated instruments on loopback, the web app
on a free 127.0.0.1 port in a thread, a real headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by selenium) and a plain HTTP client.

Checks: the page shows the queue; a time series' frames arrive on the page (counter and image);
an observer's cancel is refused (403, the job keeps running) and an operator's accepted; every
route refuses a request without credentials and an observer's request for an operator action;
plots and reports are served by name only; unsafe settings are refused. Every wait is on a
condition with a generous timeout, never on wall-clock timing.
"""

from __future__ import annotations

import asyncio
import base64
import re
import secrets
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import wait_for

from scherzer.clients.client import LocalDaemon
from scherzer.config import ConfigError
from scherzer.web import WebSettings, start_web
from scherzer.web.auth import Guarded
from scherzer.web.files import DataFiles
from scherzer.web.hub import ProgressTracker
from scherzer.web.render import stretch_u8

#: Hang guard per test (s): daemon processes and CLI subprocesses start several times slower on
#: a busy machine; a passing test never comes near it.
pytestmark = pytest.mark.timeout(300)

SIM = {"kind": "sim", "camera_shape": [64, 64], "speedup": 100.0}
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
OPERATOR_ROUTES = {"/api/jobs/{job_id:int}/cancel", "/api/queue/pause", "/api/queue/resume"}
#: A job that runs for tens of seconds at speedup 100 (0.1 s real per frame) unless cancelled.
LONG_JOB = {"kind": "time_series", "n_frames": 400, "exposure_s": 10.0, "name": "long"}
TOKENS = {"olga": "op-" + secrets.token_urlsafe(24), "otto": "obs-" + secrets.token_urlsafe(24)}


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name]}"}


def basic(name: str, token: str | None = None) -> str:
    raw = f"{name}:{token or TOKENS[name]}".encode()
    return "Basic " + base64.b64encode(raw).decode()


# --- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    directory = tmp_path_factory.mktemp("web")
    with LocalDaemon({"devices": dict(SIM), "server": {"heartbeat_s": 0.5}}, directory) as d:
        yield d


@pytest.fixture(scope="module")
def client(daemon):
    with daemon.client(timeout_s=10.0) as c:
        yield c


@pytest.fixture(scope="module")
def web(daemon):
    users = []
    for name, role in (("olga", "operator"), ("otto", "observer")):
        path = daemon.dir / f"{name}.token"
        path.write_text(TOKENS[name] + "\n")
        users.append({"name": name, "role": role, "token_file": str(path)})
    settings = WebSettings(port=0, users=users)
    with start_web(settings, lambda role: daemon.client(timeout_s=10.0), daemon.dir / "data") as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("headless Chromium needed: apt-get install -y chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--no-first-run", "--disable-extensions", "--window-size=1200,1000"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


def open_page_as(driver, web, name: str) -> None:
    """Open the page as ``name`` through the browser's own HTTP Basic authentication (the
    credentials in the URL answer the 401, as a user answers the browser's prompt; the browser
    then sends them with every request of the page) and wait until it shows who the user is."""
    driver.get(web.url.replace("://", f"://{name}:{TOKENS[name]}@") + "/")
    wait_for(lambda: name in text(driver, "who") and text(driver, "live") == "live", 30)


def text(driver, element_id: str) -> str:
    return driver.execute_script(f"return document.getElementById('{element_id}').textContent")


def js(driver, expression: str):
    return driver.execute_script(f"return {expression}")


def finish(client, job_id: int) -> None:
    """Cancel a job if it still runs and wait until it is final."""
    if client.job(job_id).state not in ("done", "failed", "cancelled", "interrupted"):
        client.cancel(job_id)
    client.wait(job_id, timeout_s=60)


# --- without a daemon -----------------------------------------------------------------------------
def test_settings_refuse_unsafe_binds_and_weak_tokens(tmp_path):
    token = tmp_path / "t"
    token.write_text("x" * 32)
    user = [{"name": "a", "role": "operator", "token_file": str(token)}]
    assert WebSettings().host == "127.0.0.1" and WebSettings().enabled is False
    WebSettings(users=user).check()  # loopback: fine
    with pytest.raises(ConfigError, match="not loopback"):
        WebSettings(host="0.0.0.0", users=user).check()
    with pytest.raises(ConfigError, match="tls"):
        WebSettings(host="192.0.2.1", allow_remote=True, users=user).check()
    WebSettings(host="0.0.0.0", allow_remote=True, tls_certfile="c", tls_keyfile="k",
                users=user).check()  # fmt: skip
    with pytest.raises(ConfigError, match="empty"):
        WebSettings().check()
    with pytest.raises(ConfigError, match="not loopback"):
        start_web(WebSettings(host="0.0.0.0", port=0, users=user), lambda role: None)
    from scherzer.web.settings import load_users

    token.write_text("short")
    with pytest.raises(ConfigError, match="at least"):
        load_users(WebSettings(users=user))


def test_eta_stretch_and_names():
    tracker = ProgressTracker()
    assert tracker.update(1, 100.0, 1, 10) is None
    assert tracker.update(1, 102.0, 3, 10) == pytest.approx(7.0)  # 1 frame/s, 7 left
    assert tracker.update(2, 50.0, 1, 4) is None  # a new job starts afresh
    image = np.arange(100 * 100, dtype=np.float32).reshape(100, 100)
    image[0, 0] = 1e9  # a hot pixel does not wash out the stretch
    out = stretch_u8(image)
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
    assert 100 < out[50, 50] < 155
    assert stretch_u8(np.full((8, 8), np.nan)).max() == 0
    assert stretch_u8(np.ones((3000, 10), np.float32)).shape == (1000, 3)
    files = DataFiles(None)
    assert files.file(None, "a.png") is None and files.reports() == []


def _token_settings(tmp_path) -> WebSettings:
    users = []
    for name, role in (("olga", "operator"), ("otto", "observer")):
        (tmp_path / name).write_text(TOKENS[name])
        users.append({"name": name, "role": role, "token_file": str(tmp_path / name)})
    return WebSettings(port=0, users=users)


def test_each_role_uses_its_own_connection_and_daemon_refusals_pass_through(tmp_path):
    from scherzer.clients.client import DaemonError
    from scherzer.web import create_app

    used = []

    class Fake:  # stands in for Client: records which connection (role) each call used
        def __init__(self, role):
            self.role = role

        def history(self, limit):
            used.append((self.role, "history"))
            return []

        def cancel(self, job_id):
            used.append((self.role, "cancel"))
            raise DaemonError("forbidden", "observers are read-only")

        def close(self):
            pass

    app = create_app(_token_settings(tmp_path), Fake, None)

    async def requests():
        transport = httpx.ASGITransport(app=app)  # no lifespan: no event reader
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            assert (await http.get("/api/history", headers=bearer("olga"))).status_code == 200
            act = {**bearer("olga"), "X-Scherzer-Request": "1"}
            return await http.post("/api/jobs/3/cancel", headers=act)

    r = asyncio.run(requests())
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    assert used == [("observer", "history"), ("operator", "cancel")]


def test_daemon_client_factory_keys_per_role():
    from scherzer.config import Settings
    from scherzer.web.link import connect_endpoint, daemon_client_factory

    assert connect_endpoint("tcp://*:6000") == "tcp://127.0.0.1:6000"
    assert connect_endpoint("tcp://10.0.0.2:6000") == "tcp://10.0.0.2:6000"
    plain = Settings(
        server={"endpoint": "tcp://127.0.0.1:6000", "events_endpoint": "tcp://127.0.0.1:6001"}
    )
    c = daemon_client_factory(plain, WebSettings())("operator")
    assert c.endpoint == "tcp://127.0.0.1:6000" and c._keys is None
    curve = Settings(security={"curve": True, "server_secret_key_file": "s",
                               "clients": [{"name": "w", "public_key": "k" * 40}]})  # fmt: skip
    with pytest.raises(ConfigError, match="curve_observer_key"):
        daemon_client_factory(curve, WebSettings())
    keys = {"curve_observer_key": "obs.key_secret", "curve_server_key": "server.key"}
    read_only = daemon_client_factory(curve, WebSettings(**keys))
    assert read_only("operator")._keys == ("obs.key_secret", "server.key")  # no operator key
    both = daemon_client_factory(curve, WebSettings(**keys, curve_operator_key="op.key_secret"))
    assert both("operator")._keys[0] == "op.key_secret"
    assert both("observer")._keys[0] == "obs.key_secret"


# --- plain HTTP: every route and its role ---------------------------------------------------
def _concrete(path: str) -> str:
    return re.sub(r"{(\w+)(:int)?}", lambda m: "1" if m.group(2) else "x.png", path).replace(
        "x.png.png", "1.png"
    )


def test_every_route_needs_its_role(web, client):
    routes = web.app.routes
    guards = {r.path: r.endpoint.__self__ for r in routes}
    assert all(isinstance(g, Guarded) for g in guards.values()), "an unguarded route"
    assert {p for p, g in guards.items() if g.role == "operator"} == OPERATOR_ROUTES
    with httpx.Client(base_url=web.url, timeout=10.0) as http:
        for route in routes:
            url, method = _concrete(route.path), next(iter(route.methods - {"HEAD"}))
            for headers in ({}, {"Authorization": "Bearer not-a-token"},
                            {"Authorization": basic("olga", TOKENS["otto"])}):  # fmt: skip
                r = http.request(method, url, headers=headers)
                assert r.status_code == 401, (url, headers, r.status_code)
                assert r.headers["www-authenticate"].startswith("Basic")
            as_observer = {**bearer("otto"), "X-Scherzer-Request": "1"}
            if route.path in OPERATOR_ROUTES:
                assert http.request(method, url, headers=as_observer).status_code == 403, url
            elif route.path != "/api/events":
                assert http.request(method, url, headers=as_observer).status_code not in (401, 403)
        with http.stream("GET", "/api/events", headers=bearer("otto")) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event")
        assert client.status().queue_paused is False  # the observer's pause did nothing
        # an operator's state change needs the same-origin header: no cross-site form posts
        assert http.post("/api/queue/pause", headers=bearer("olga")).status_code == 403
        foreign = {**bearer("olga"), "X-Scherzer-Request": "1", "Origin": "http://evil.example"}
        assert http.post("/api/queue/pause", headers=foreign).status_code == 403
        assert client.status().queue_paused is False
        assert http.get("/", headers={**bearer("otto"), "Host": "evil.example"}).status_code == 400
        assert http.get("/", headers={"Authorization": basic("otto")}).status_code == 200


# --- the page in a real browser -------------------------------------------------------------------
def test_page_shows_queue_and_frames_arrive(web, client, browser):
    client.pause()
    try:
        queued = [client.submit({"kind": "camera_image", "exposure_s": 0.1, "name": f"q{i}"})
                  for i in range(2)]  # fmt: skip
        open_page_as(browser, web, "otto")
        ids = {str(j.job_id) for j in queued}
        rows = "[...document.querySelectorAll('#queue tbody tr')].map(r => r.dataset.jobId)"
        wait_for(lambda: ids <= set(js(browser, rows)), 30)
        assert "PAUSED" in text(browser, "queue-state")
        for job in queued:
            client.cancel(job.job_id)
    finally:
        client.resume()
    wait_for(lambda: not js(browser, "document.querySelectorAll('#queue tbody tr').length"), 30)
    series = client.submit({"kind": "time_series", "n_frames": 6, "exposure_s": 5.0,
                            "name": "series"})  # fmt: skip
    wait_for(lambda: text(browser, "frame-counter") == "frame 6 / 6", 60)
    assert client.wait(series.job_id, timeout_s=60).state == "done"
    with httpx.Client(base_url=web.url, timeout=10.0, headers=bearer("otto")) as http:
        last = http.get("/api/overview").json()["last_frame"]
    assert last["job_id"] == series.job_id and last["index"] == 5
    img = "document.getElementById('frame-img')"
    # the image follows the frames: the newest one ends up shown, after at least one earlier
    wait_for(lambda: js(browser, f"{img}.dataset.frameId") == str(last["frame_id"]), 30)
    assert js(browser, f"{img}.complete && {img}.naturalWidth") == 64
    assert int(js(browser, f"{img}.dataset.shown")) >= 2
    assert f"job {series.job_id}" in text(browser, "frame-caption")
    # the running, drift-compensated average arrives through the daemon's live events
    wait_for(lambda: js(browser, "document.getElementById('live-img').dataset.frames") == "6", 30)
    assert f"job {series.job_id}" in text(browser, "live-caption")
    history = "[...document.querySelectorAll('#history tbody tr')].map(r => r.dataset.jobId)"
    wait_for(lambda: str(series.job_id) in js(browser, history), 30)


def test_observer_cancel_refused_operator_cancel_accepted(web, client, browser):
    job = client.submit(dict(LONG_JOB))
    try:
        wait_for(lambda: client.job(job.job_id).frames_done >= 2, 60)
        open_page_as(browser, web, "otto")
        wait_for(lambda: text(browser, "current").startswith(f"#{job.job_id}"), 30)
        assert js(browser, "document.getElementById('cancel-current').disabled") is True
        wait_for(lambda: re.fullmatch(r"ETA \d+ s", text(browser, "eta")), 30)  # from progress
        assert js(browser, "document.getElementById('progress').value") >= 2
        status = browser.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            f"fetch(location.origin + '/api/jobs/{job.job_id}/cancel', {{method: 'POST',"
            " headers: {'X-Scherzer-Request': '1'}}).then(r => done(r.status));"
        )
        assert status == 403
        before = client.job(job.job_id)
        assert before.state == "running" and not before.cancel_requested
        wait_for(lambda: client.job(job.job_id).frames_done > before.frames_done + 1, 60)
        open_page_as(browser, web, "olga")
        wait_for(lambda: js(browser, "!document.getElementById('cancel-current').disabled"), 30)
        browser.execute_script("document.getElementById('cancel-current').click()")
        assert client.wait(job.job_id, timeout_s=60).state == "cancelled"
        wait_for(lambda: "cancelled" in text(browser, "history"), 30)
    finally:
        finish(client, job.job_id)


def test_plain_operator_cancel_and_plots_and_reports_by_name(web, client, daemon):
    long = client.submit(dict(LONG_JOB))
    with httpx.Client(base_url=web.url, timeout=10.0, headers=bearer("olga")) as http:
        try:
            act = {"X-Scherzer-Request": "1"}
            r = http.post(f"/api/jobs/{long.job_id}/cancel", headers=act)
            assert r.status_code == 200 and r.json()["job"]["job_id"] == long.job_id
            assert client.wait(long.job_id, timeout_s=60).state == "cancelled"
            assert http.post(f"/api/jobs/{long.job_id}/cancel", headers=act).status_code == 409
        finally:
            finish(client, long.job_id)
        job = client.submit({"kind": "time_series", "n_frames": 3, "exposure_s": 0.5,
                             "processing": ["align"], "name": "plots"})  # fmt: skip
        assert client.wait(job.job_id, timeout_s=60).state == "done"
        detail = http.get(f"/api/jobs/{job.job_id}").json()
        assert "average.png" in detail["plots"]
        png = http.get(f"/api/jobs/{job.job_id}/plots/average.png")
        assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
        for name in ("..%2F..%2Fscherzer.toml", "%2Fetc%2Fpasswd", "%2E%2E", "scherzer.toml"):
            assert http.get(f"/api/jobs/{job.job_id}/plots/{name}").status_code == 404, name
        assert http.get("/api/jobs/99999").status_code == 404
        client.report([job.job_id], name="web")
        stem = wait_for(lambda: http.get("/api/reports").json()["reports"], 30)[0]
        report = http.get(f"/api/reports/{stem}").json()
        assert "Scherzer run" in report["markdown"] and report["images"]
        image = http.get(f"/api/reports/{stem}/{report['images'][0]}")
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        assert http.get(f"/api/reports/{stem}/..%2F{stem}.md").status_code == 404
