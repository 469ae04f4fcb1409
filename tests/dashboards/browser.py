"""Headless Chromium driven over the DevTools protocol: open a page from disk, watch the console and the network.

`ensure_chromium()` installs Debian's `chromium` when it is missing and we are root (the test set-up
the dashboard issue asks for); otherwise the browser test fails saying how to install it.
"""
from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
         "--no-default-browser-check", "--disable-extensions", "--disable-component-update", "--disable-sync",
         "--remote-debugging-port=0", "--window-size=1280,900", "--hide-scrollbars"]


def ensure_chromium() -> str:
    """The chromium binary, installed with apt-get when missing (as root); raises saying what to do otherwise."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    import os

    if os.geteuid() != 0:
        raise RuntimeError("chromium is not installed and this is not root: run `apt-get install -y chromium`")
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=900,
                              env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if done.returncode != 0 and command[1] == "install":
            raise RuntimeError(f"`apt-get install -y chromium` failed: {done.stderr[-2000:]}")
    found = shutil.which("chromium")
    if not found:
        raise RuntimeError("apt-get installed chromium but `chromium` is not on PATH")
    return found


@dataclass
class PageReport:
    """What happened while a page loaded: console errors, requests, the JS value asked for, a screenshot."""

    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    value: Any = None
    screenshot: bytes = b""


class Browser:
    """One headless Chromium process with its own throw-away profile."""

    def __init__(self, binary: str) -> None:
        self.profile = tempfile.mkdtemp(prefix="lmforge-chromium-")
        self.proc = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.port = self._devtools_port()

    def _devtools_port(self, timeout: float = 60) -> int:
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.time() + timeout
        while time.time() < deadline:
            if port_file.is_file() and port_file.read_text().strip():
                return int(port_file.read_text().split()[0])
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode} before opening DevTools")
            time.sleep(0.1)
        raise RuntimeError("chromium did not open its DevTools port within 60 s")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)

    def open(self, path: Path, script: str, settle_s: float = 1.0, timeout: float = 120) -> PageReport:
        """Loads `path`, waits for the load event (+ `settle_s`), evaluates `script`, takes a full-page screenshot."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list") as reply:
            page = next(t for t in json.load(reply) if t["type"] == "page")
        return Session(page["webSocketDebuggerUrl"], timeout).load(path.resolve().as_uri(), script, settle_s)


class Session:
    """The DevTools protocol over one page's WebSocket: commands by id, events collected as they come."""

    def __init__(self, url: str, timeout: float) -> None:
        from websockets.sync.client import connect

        self.ws = connect(url, max_size=None, open_timeout=timeout)
        self.ids = itertools.count(1)
        self.timeout = timeout
        self.report = PageReport()
        self.loaded = False

    def load(self, url: str, script: str, settle_s: float) -> PageReport:
        try:
            for domain in ("Runtime", "Log", "Network", "Page"):
                self.call(f"{domain}.enable")
            self.call("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False)
            self.call("Page.navigate", url=url)
            self._wait_until(lambda: self.loaded)
            time.sleep(settle_s)
            self.report.value = self.evaluate(script)
            shot = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
            self.report.screenshot = base64.b64decode(shot["data"])
        finally:
            self.ws.close()
        return self.report

    def evaluate(self, script: str) -> Any:
        result = self.call("Runtime.evaluate", expression=script, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Sends a command and returns its result, recording every event that arrives meanwhile."""
        command_id = next(self.ids)
        self.ws.send(json.dumps({"id": command_id, "method": method, "params": params}))
        reply: dict[str, Any] = {}
        self._wait_until(lambda: bool(reply), on_reply=lambda message: reply.update(message)
                         if message.get("id") == command_id else None)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def _wait_until(self, done, on_reply=None) -> None:
        deadline = time.time() + self.timeout
        while not done():
            if time.time() > deadline:
                raise TimeoutError("the page did not answer within the timeout")
            message = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.time())))
            if "method" in message:
                self._event(message["method"], message.get("params", {}))
            elif on_reply is not None:
                on_reply(message)

    def _event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Page.loadEventFired":
            self.loaded = True
        elif method == "Network.requestWillBeSent":
            self.report.requests.append(params["request"]["url"])
        elif method == "Runtime.exceptionThrown":
            self.report.errors.append(f"exception: {params['exceptionDetails'].get('text')} "
                                      f"{params['exceptionDetails'].get('exception', {}).get('description', '')}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            self.report.errors.append("console: " + " ".join(str(a.get("value", a.get("description")))
                                                             for a in params.get("args", [])))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            self.report.errors.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
