"""The live dashboard (`rloopd serve --http`): the token, its JSON, refused actions, and the page in Chromium.

The quick tests share one real daemon and one finished run; the browser test (extended: `make test-slow`)
drives the page with real mouse clicks over the DevTools protocol (tests/cdp.py) against a live run.
"""

from __future__ import annotations

import json
import os
import select
import socket
import stat
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest

from rloopd import commands, control, dashboard, runs
from rloopd.agents import random_search
from rloopd.config import DaemonConfig
from rloopd.dashboard import Dashboard
from rloopd.errors import DaemonError
from rloopd.home import Home
from rloopd.loop import Loop
from rloopd.service import Daemon
from rloopd.slots import SlotPool

from .cdp import Browser
from .conftest import need_tool
from .daemon_helpers import INSTANT, Served, cli, detach, events, make_lab, state, wait_for

DOCS = Path(__file__).resolve().parent.parent / "docs"


def http(url: str, token: str | None = None, body: dict | None = None) -> tuple[int, bytes]:
    """(status, body) of one request, with the token as the page sends it when given."""
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture
def quick(tmp_path):
    """The dashboard of a daemon object that is not started (no scheduler, no loops: the quick tests need
    only its control ops), over a home with one created run that has no step yet."""
    with Home.open(tmp_path / "home") as h:
        run = runs.create_run(h, INSTANT, agent="random", experiments=3, budget=None, seed=0, name="quick")
    board = Dashboard(Daemon(tmp_path / "home", SlotPool("cpu", ["cpu0"])), "127.0.0.1:0").start()
    yield board, run
    board.stop()


def test_the_token_lives_in_the_home_and_every_request_needs_it(quick):
    board, run = quick
    url, token, home = board.url, board.token, board.daemon.home_path
    path = home / "http.token"
    assert path.read_text().strip() == token and stat.S_IMODE(path.stat().st_mode) == 0o600
    for target in ("", "api/overview", f"api/runs/{run}", f"api/runs/{run}/steps/0", "no/such/page"):
        for given in (None, "wrong", token[:-1]):
            status, body = http(url + target + (f"?token={given}" if given else ""))
            assert status == 401 and run.encode() not in body and b"quick" not in body, (target, given)
    status, _ = http(f"{url}api/runs/{run}/pause", "wrong", body={})
    assert status == 401 and not events(home, run, "run.paused"), "a refused request changes nothing"
    assert http(f"{url}?token={token}")[0] == 200
    assert [r["name"] for r in json.loads(http(f"{url}api/overview", token)[1])["runs"]] == ["quick"]


def test_a_fork_from_a_missing_step_is_refused_naming_it(quick):
    board, run = quick
    url, token, home = board.url, board.token, board.daemon.home_path
    status, body = http(f"{url}api/runs/{run}/fork", token, body={"step": 99})
    assert status == 409 and "no step 99" in json.loads(body)["error"]
    status, body = http(f"{url}api/runs/{run}/fork", token, body={"step": "1"})
    assert status == 400 and "'step' must be an integer" in json.loads(body)["error"]
    assert http(f"{url}api/runs/{run}/steps/99", token)[0] == 404
    for action in ("pause", "resume", "stop", "fork"):  # an unknown run: 404, as the README says
        status, body = http(f"{url}api/runs/nosuch/{action}", token, body={"step": 0} if action == "fork" else {})
        assert status == 404 and "no run or stream named 'nosuch'" in json.loads(body)["error"], (action, body)
    assert http(f"{url}api/runs/home/pause", token, body={})[0] == 404
    with Home.open(home, create=False) as h:
        assert [e.stream for e in h.log.runs()] == [run], "nothing half-written"
    assert http(f"{url}api/overview", token)[0] == 200, "the dashboard keeps serving"


def test_idle_connections_hold_no_thread_and_the_daemon_answers(quick):
    """100 connections that send nothing cost no thread: a request with the token and the control socket
    still answer at once."""
    board, run = quick
    control_server = board.daemon.serve_socket()
    before = threading.active_count()
    idle = []
    try:
        for _ in range(100):
            idle.append(socket.create_connection(board.server.server_address[:2], timeout=5))
        t0 = time.monotonic()
        status, body = http(f"{board.url}api/overview", board.token)
        assert status == 200 and [r["run_id"] for r in json.loads(body)["runs"]] == [run]
        assert control.call(board.daemon.home_path, "status", timeout=5)["runs"] == {}
        assert time.monotonic() - t0 < 5
        assert threading.active_count() - before < 5, "a thread per idle connection"
    finally:
        for s in idle:
            s.close()
        control_server.shutdown()
        control_server.server_close()


def closed(s: socket.socket, within: float) -> bool:
    """Whether the server hung up on `s` (without a byte of answer) within `within` seconds."""
    s.settimeout(within)  # 0: a look, no wait
    try:
        return s.recv(100) == b""
    except ConnectionResetError:
        return True
    except (TimeoutError, BlockingIOError):
        return False


def test_a_request_sent_a_byte_at_a_time_meets_the_deadline(quick, monkeypatch):
    board, _ = quick
    monkeypatch.setattr(dashboard, "READ_SECONDS", 0.5)
    with socket.create_connection(board.server.server_address[:2], timeout=5) as s:
        t0 = time.monotonic()
        for b in b"GET /api/overview HTTP/1.0\r\n" + b"X-Slow: y\r\n" * 40:  # far past the deadline
            try:
                s.sendall(bytes([b]))
            except OSError:
                break
            if closed(s, 0.02):
                break
        assert closed(s, 3) and time.monotonic() - t0 < 3, "hung up on at the deadline, unanswered"


def test_requests_over_the_cap_are_closed_at_once(quick, monkeypatch):
    """Requests whose bodies never come hold their threads until the deadline; those over the cap are closed
    at once, and nothing is recorded."""
    board, run = quick
    monkeypatch.setattr(dashboard, "READ_SECONDS", 1.5)
    n = dashboard.MAX_CONNECTIONS + 8
    head = (f"POST /api/runs/{run}/pause HTTP/1.0\r\nAuthorization: Bearer {board.token}\r\n"
            "Content-Length: 10\r\n\r\n").encode()
    conns = [socket.create_connection(board.server.server_address[:2], timeout=5) for _ in range(n)]
    try:
        for s in conns:
            s.sendall(head)
        t0 = time.monotonic()
        time.sleep(0.5)
        at_once = select.select(conns, [], [], 0)[0]
        assert len(at_once) == 8 and all(closed(s, 0) for s in at_once) and time.monotonic() - t0 < 1.4
        assert all(closed(s, 3) for s in conns if s not in at_once) and time.monotonic() - t0 < 4
    finally:
        for s in conns:
            s.close()
    assert not events(board.daemon.home_path, run, "run.paused")
    assert http(f"{board.url}api/overview", board.token)[0] == 200


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A real daemon serving the dashboard on a port it picks, with one finished run of three experiments."""
    tmp = tmp_path_factory.mktemp("dashboard")
    d = Served(tmp / "home", "--http", "127.0.0.1:0").start()
    try:
        run = detach(d.home, make_lab(tmp), "--agent", "random", "-n", "3", "--name", "quick")
        wait_for(lambda: state(d.home, run).status == "finished", what="the run to finish")
        link = json.loads(cli(d.home, "dashboard", "--json").stdout)
        yield {"served": d, "run": run, "url": link["url"], "token": link["link"].split("token=")[1]}
    finally:
        d.close()


@pytest.mark.extended
def test_the_json_reuses_the_cli_reads(served):
    url, token, run, home = served["url"], served["token"], served["run"], served["served"].home
    overview = json.loads(http(f"{url}api/overview", token)[1])
    status_rows = json.loads(cli(home, "status", "--json").stdout)
    [row] = [r for r in overview["runs"] if r["run_id"] == run]
    [cli_row] = [r for r in status_rows if r["run_id"] == run]
    assert {k: row[k] for k in ("name", "status", "step", "best")} == {k: cli_row[k] for k in ("name", "status", "step", "best")}
    detail = json.loads(http(f"{url}api/runs/{run}", token)[1])
    assert [x["step"] for x in detail["experiments"]] == [0, 1, 2, 3]
    assert detail["best"] == min(x["value"] for x in detail["experiments"])
    assert detail["experiments"][-1]["best_after"] == detail["best"] and detail["programs"][0]["source"] == "created"
    assert json.loads(http(f"{url}api/runs/{run}?n={detail['n']}", token)[1])["unchanged"] is True
    step = json.loads(http(f"{url}api/runs/{run}/steps/1", token)[1])
    assert step == json.loads(cli(home, "show", run, "1", "--json").stdout)
    status, body = http(f"{url}api/runs/{run}/pause", token, body={})
    assert status == 409 and "finished" in json.loads(body)["error"]  # the CLI's own refusal
    assert f"dashboard: {url} (`rloopd dashboard` prints the link" in cli(home, "status").stdout


def test_without_http_there_is_no_dashboard_to_link(tmp_path):
    with pytest.raises(DaemonError, match="serves no dashboard: start it with `rloopd serve --http"):
        commands.dashboard(Daemon(tmp_path, SlotPool("cpu", ["cpu0"])), None, {}, "request")


def test_the_address_is_loopback_unless_allowed(tmp_path):
    proc = cli(tmp_path / "home", "serve", "--http", "0.0.0.0:8765", check=False)
    [line] = proc.stderr.splitlines()
    assert proc.returncode == 2 and "--http '0.0.0.0:8765': 0.0.0.0 is not a loopback address" in line
    assert "--http-allow-remote" in line and not (tmp_path / "home" / "http.token").exists()
    with pytest.raises(ValueError, match="not a loopback address"):
        DaemonConfig(http="0.0.0.0:8765")
    with pytest.raises(ValueError, match="HOST:PORT"):
        DaemonConfig(http="8765")
    assert DaemonConfig(http="[::1]:0").http == "[::1]:0"
    assert DaemonConfig(http="0.0.0.0:8765", http_allow_remote=True).http_allow_remote


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


XSS = "<img src=x onerror=alert(1)></script><script>alert(2)</script>"


def marked_run(home_dir: Path, tmp: Path, monkeypatch) -> str:
    """A finished run whose step 1 description and notes.md are markup an agent might write."""
    original = random_search.propose
    monkeypatch.setattr(random_search, "propose", lambda *a: replace(original(*a), description=XSS))
    with Home.open(home_dir) as h:
        run = runs.create_run(h, make_lab(tmp, "xss-lab"), agent="random", experiments=1, budget=None, seed=0,
                              name="markup")
        Loop(h, run).run()
        h.log.append_one(run, "memory.written", {"path": "notes.md", "blob": h.blobs.put(XSS.encode()), "session": 1})
    monkeypatch.undo()
    return run


@pytest.mark.extended
def test_the_page_in_chromium_pauses_forks_and_stops(tmp_path, monkeypatch):
    exe = need_tool("chromium")
    port = free_port()
    markup = marked_run(tmp_path / "home", tmp_path, monkeypatch)
    d = Served(tmp_path / "home", "--http", f"127.0.0.1:{port}", "--cpu-slots", "2").start()
    try:
        home = d.home
        link = json.loads(cli(home, "dashboard", "--json").stdout)
        assert link["url"] == f"http://127.0.0.1:{port}/"
        with Browser.launch(exe, tmp_path) as browser:
            page = browser.open(link["link"])
            page.wait("document.getElementById('conn').textContent.startsWith('live')", what="the page to poll")
            assert "token" not in page.eval("location.href"), "the token leaves the address bar once read"

            page.click(f"#runs tr[data-run='{markup}']")  # what an agent wrote is shown as text, never run
            page.wait(f"document.getElementById('notes').textContent === {json.dumps(XSS)} && "
                      f"document.querySelector(\"#experiments tr[data-step='1']\")?.cells[4].textContent === "
                      f"{json.dumps(XSS)}", what="the markup as text")
            assert page.eval("document.querySelectorAll('main img, main script').length") == 0
            run = detach(home, make_lab(tmp_path, SLEEP=0.3), "--agent", "random", "-n", "50", "--name", "lr-sweep")
            row = f"#runs tr[data-run='{run}']"
            page.wait(f"!!document.querySelector(\"{row}\")", what="the run to appear")
            page.click(row)
            page.wait("document.querySelectorAll('#experiments tbody tr').length >= 3 && "
                      "!!document.getElementById('best-line')", what="the curve and three experiments")
            wait_for(lambda: state(home, run).experiments >= 12, what="a dozen experiments, for the picture")
            kept = page.wait("[...document.querySelectorAll('#experiments tr[data-step]')].map(r => r.dataset.step)"
                             ".find(s => s !== '0' && document.querySelector(`#experiments tr[data-step='${s}']`)"
                             ".cells[3].textContent === 'yes') || '1'", what="a step to show")
            page.click(f"#experiments tr[data-step='{kept}']")
            page.wait("document.querySelectorAll('#diff .add').length", what="a step's diff")
            if os.environ.get("RLOOPD_UPDATE_DOCS"):  # the README's picture: RLOOPD_UPDATE_DOCS=1 make test-slow
                page.eval("window.scrollTo(0, 0)")
                page.screenshot(DOCS / "dashboard.png")

            page.click("#pause")
            page.wait("document.getElementById('run-status').textContent === 'paused'", what="the run paused")
            [paused] = [json.loads(line) for line in cli(home, "log", run, "--type", "run.paused", "--json").stdout.splitlines()]
            assert paused["data"]["by"] == "cli", "recorded as `rloopd pause` records it"
            assert state(home, run).status == "paused"

            page.type("#fork-step", "999")
            page.click("#fork")
            page.wait("document.getElementById('message').className === 'error'", what="the refusal")
            assert "no step 999" in page.eval("document.getElementById('message').textContent")
            assert len(json.loads(cli(home, "status", "--json").stdout)) == 2, "nothing half-written"

            page.type("#fork-step", "1")
            page.click("#fork")
            said = page.wait("(m => m.startsWith('forked') || m.startsWith('fork refused') ? m : '')"
                             "(document.getElementById('message').textContent)", what="the fork")
            assert said.startswith("forked"), said
            fork = said.split()[-1]
            assert events(home, fork, "run.created")[0]["data"]["parent"]["step"] == 1
            page.wait(f"document.getElementById('run-title').textContent.includes('{fork}')", what="the fork shown")
            page.click(f"#runs tr[data-run='{run}']")
            page.wait("document.getElementById('resume').disabled === false", what="the parent, paused")
            page.click("#resume")
            page.wait("document.getElementById('run-status').textContent === 'running'", what="the run resumed")
            page.click("#stop")
            page.wait("document.getElementById('run-status').textContent === 'stopped'", what="the run stopped")
            assert [e["type"] for e in events(home, run, "run.paused", "run.resumed", "run.stopped")] == [
                "run.paused", "run.resumed", "run.stopped"]

            status, body = http(f"{link['url']}api/runs/{fork}/pause", body={})  # no token: 401 and nothing else
            assert status == 401 and fork.encode() not in body and not events(home, fork, "run.paused")
            page.screenshot(tmp_path / "dashboard.png")
            assert (tmp_path / "dashboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            scripting = [p for p in page.problems() if "Content Security Policy" in p or "Uncaught" in p]
            assert not scripting, scripting
        cli(home, "stop", fork)
        assert cli(home, "audit").returncode == 0
    finally:
        d.close()
