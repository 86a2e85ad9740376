"""Drive headless Chromium through the DevTools protocol over `--remote-debugging-pipe`: no driver package.

The browser reads commands on its fd 3 and writes replies and events on its fd 4, each a JSON text ended by
a NUL byte (the transport Puppeteer and Playwright use). No debugging port is opened, so no other process
on the machine can drive the browser, and nothing needs installing beyond Debian's chromium.

    with Browser.launch("/usr/bin/chromium", tmp_path) as browser:
        page = browser.open("http://127.0.0.1:8765/?token=...")
        page.wait("document.querySelectorAll('#runs tbody tr').length > 0")
        page.click("#pause")
        page.screenshot(tmp_path / "page.png")
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any


class CDPError(AssertionError):
    """A protocol command failed, or the page did not reach a state in time."""


class Browser:
    def __init__(self, proc: subprocess.Popen, to_browser: int, from_browser: int):
        self.proc, self.to_browser, self.from_browser = proc, to_browser, from_browser
        self.next_id = 0
        self.replies: dict[int, dict] = {}
        self.events: list[dict] = []  # every event, in order (console messages, exceptions, log entries)
        self.cond = threading.Condition()
        self.reader = threading.Thread(target=self._read, name="cdp-reader", daemon=True)
        self.reader.start()

    @classmethod
    def launch(cls, exe: str, tmp: Path) -> Browser:
        """Start Chromium headless with a fresh profile under `tmp`; requests to names go nowhere."""
        cmd_r, cmd_w = os.pipe()  # we write commands; the browser reads them on its fd 3
        out_r, out_w = os.pipe()  # the browser writes on its fd 4; we read
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (cmd_r, out_w)]  # out of the way of 3 and 4

        def fds_3_and_4() -> None:
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        args = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--remote-debugging-pipe", "--disable-background-networking", "--disable-component-update",
                "--disable-extensions", "--mute-audio", "--hide-scrollbars",
                "--no-proxy-server", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",  # loopback only
                f"--user-data-dir={tmp / 'chromium-profile'}", "about:blank"]
        proc = subprocess.Popen(args, preexec_fn=fds_3_and_4, pass_fds=(3, 4), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=open(tmp / "chromium.log", "wb"))
        for fd in (cmd_r, out_w, *high):
            os.close(fd)
        browser = cls(proc, cmd_w, out_r)
        browser.send("Browser.getVersion", timeout=60)  # the browser is up and speaking the protocol
        return browser

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except (CDPError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        for fd in (self.to_browser, self.from_browser):
            try:
                os.close(fd)
            except OSError:
                pass

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self.from_browser, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                with self.cond:
                    self.cond.notify_all()
                return
            buf += chunk
            *messages, buf = buf.split(b"\0")
            with self.cond:
                for raw in messages:
                    msg = json.loads(raw)
                    if "id" in msg:
                        self.replies[msg["id"]] = msg
                    else:
                        self.events.append(msg)
                self.cond.notify_all()

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30) -> dict[str, Any]:
        """One command and its result; CDPError with the browser's message when it fails."""
        with self.cond:
            self.next_id += 1
            mid = self.next_id
        msg = {"id": mid, "method": method, "params": params or {}, **({"sessionId": session} if session else {})}
        os.write(self.to_browser, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self.cond:
            while mid not in self.replies:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise CDPError(f"{method}: no reply within {timeout} s (browser exit {self.proc.poll()})")
                self.cond.wait(min(left, 0.5))
            reply = self.replies.pop(mid)
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error'].get('message')}")
        return reply.get("result", {})

    def open(self, url: str, width: int = 1360, height: int = 940) -> Page:
        """A new tab at `url`, its console and errors recorded, its viewport `width` x `height`."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        for domain in ("Page", "Runtime", "Log"):
            page.send(f"{domain}.enable")
        page.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                         "mobile": False})
        page.send("Page.navigate", {"url": url})
        return page


class Page:
    def __init__(self, browser: Browser, session: str):
        self.browser, self.session = browser, session

    def send(self, method: str, params: dict | None = None, timeout: float = 30) -> dict[str, Any]:
        return self.browser.send(method, params, self.session, timeout)

    def eval(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            raise CDPError(f"{expression}: {result['exceptionDetails'].get('text')} "
                           f"{result['exceptionDetails'].get('exception', {}).get('description', '')}")
        return result["result"].get("value")

    def wait(self, expression: str, timeout: float = 30, what: str | None = None) -> Any:
        """Poll until `expression` is truthy; its value."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            try:
                value = self.eval(expression)
            except CDPError:  # the page is still loading
                value = None
            if value:
                return value
            time.sleep(0.1)
        raise CDPError(f"timed out waiting for {what or expression} (last value {value!r}); "
                       f"page errors: {self.problems()}")

    def click(self, selector: str) -> None:
        """A real mouse click (pressed and released) at the middle of the element."""
        box = self.eval(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return null;"
                        " e.scrollIntoView({block: 'nearest'}); const r = e.getBoundingClientRect();"
                        " return {x: r.x + r.width / 2, y: r.y + r.height / 2}; })()")
        if box is None:
            raise CDPError(f"no element {selector} to click")
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": box["x"], "y": box["y"], "button": "left",
                                                   "clickCount": 1})

    def type(self, selector: str, text: str) -> None:
        """Focus the field, clear it, and type `text` as keyboard input would."""
        self.eval(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.focus(); e.value = ''; }})()")
        self.send("Input.insertText", {"text": text})

    def screenshot(self, path: Path) -> bytes:
        data = base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"])
        Path(path).write_bytes(data)
        return data

    def problems(self) -> list[str]:
        """Uncaught exceptions, console errors and browser log errors (a CSP refusal among them)."""
        found = []
        with self.browser.cond:
            events = [e for e in self.browser.events if e.get("sessionId") == self.session]
        for e in events:
            p = e.get("params", {})
            if e["method"] == "Runtime.exceptionThrown":
                found.append(p["exceptionDetails"].get("exception", {}).get("description") or p["exceptionDetails"]["text"])
            elif e["method"] == "Runtime.consoleAPICalled" and p.get("type") == "error":
                found.append(" ".join(str(a.get("value", a.get("description"))) for a in p.get("args", [])))
            elif e["method"] == "Log.entryAdded" and p["entry"]["level"] == "error":
                found.append(p["entry"]["text"])
        return found
