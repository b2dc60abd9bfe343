"""Open a local page in headless Chromium and report what a person would see: a screenshot, the
console errors and failed loads, and the drawn size of each inline SVG.

Talks the DevTools protocol over `--remote-debugging-pipe` (fd 3 in, fd 4 out, NUL-separated JSON),
so no port is opened and nothing beyond Debian's `chromium` is needed. The flags keep Chromium off
the network (no updates, sync, QUIC or background requests) with a fresh profile each time.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-pipe")


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class Rendered:
    screenshot: bytes
    errors: list[str] = field(default_factory=list)
    svg_sizes: list[tuple[float, float]] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)


class _Pipe:
    def __init__(self, proc, send_fd: int, recv_fd: int):
        self.proc, self.send_fd, self.recv_fd = proc, send_fd, recv_fd
        self.buffer, self.next_id, self.events = b"", 0, []

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self.buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self.recv_fd, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, session: str | None = None, timeout: float = 30, **params) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self.send_fd, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        for i, event in enumerate(self.events):
            if event.get("method") == method:
                return self.events.pop(i)
        while True:
            event = self._read_message(deadline)
            if event.get("method") == method:
                return event
            self.events.append(event)


def _wait_until(pipe: _Pipe, session: str, expression: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pipe.call("Runtime.evaluate", session, returnByValue=True, expression=f"Boolean({expression})")
        if value["result"].get("value"):
            return
        time.sleep(0.5)
    text = pipe.call("Runtime.evaluate", session, returnByValue=True,
                     expression="document.body ? document.body.innerText.slice(-800) : ''")["result"].get("value")
    raise TimeoutError(f"page never satisfied {expression!r} within {timeout:.0f} s; it shows: {text!r}")


def render(page: Path | str, width: int = 1400, height: int = 2400, ready: str | None = None,
           ready_timeout: float = 60) -> Rendered:
    """Load `page` (a local file or an http URL), wait for it, and collect what it shows and what went wrong.

    `ready` is a JavaScript expression polled until it is true before the screenshot: a single-page app
    (the MLflow UI) has fired its load event long before it has fetched and drawn its data."""
    binary = chromium()
    if binary is None:
        raise FileNotFoundError("chromium is not installed (apt-get install chromium)")
    to_chrome_r, to_chrome_w = os.pipe()
    from_chrome_r, from_chrome_w = os.pipe()

    def child_fds() -> None:  # Chromium reads commands on fd 3 and writes replies on fd 4
        os.dup2(to_chrome_r, 3)
        os.dup2(from_chrome_w, 4)

    with tempfile.TemporaryDirectory(prefix="edgeopt-chromium-") as profile:
        proc = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=child_fds, pass_fds=(3, 4), close_fds=True,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        pipe = _Pipe(proc, to_chrome_w, from_chrome_r)
        try:
            target = pipe.call("Target.createTarget", url="about:blank")["targetId"]
            session = pipe.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            for domain in ("Page", "Runtime", "Log", "Network"):
                pipe.call(f"{domain}.enable", session)
            pipe.call("Emulation.setDeviceMetricsOverride", session, width=width, height=height,
                      deviceScaleFactor=1, mobile=False)
            url = page if isinstance(page, str) and page.startswith(("http://", "https://")) else Path(page).resolve().as_uri()
            pipe.call("Page.navigate", session, url=url)
            pipe.wait_event("Page.loadEventFired")
            if ready:
                _wait_until(pipe, session, ready, ready_timeout)
            sizes = pipe.call(
                "Runtime.evaluate", session, returnByValue=True,
                expression="JSON.stringify([...document.querySelectorAll('svg')].map("
                           "s => [s.getBoundingClientRect().width, s.getBoundingClientRect().height]))",
            )["result"]["value"]
            shot = pipe.call("Page.captureScreenshot", session, format="png", captureBeyondViewport=True)
            result = Rendered(screenshot=base64.b64decode(shot["data"]), svg_sizes=[tuple(s) for s in json.loads(sizes)])
            for event in pipe.events:
                method, params = event.get("method"), event.get("params", {})
                if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                    result.errors.append(f"console: {params.get('args')}")
                elif method == "Runtime.exceptionThrown":
                    result.errors.append(f"exception: {params.get('exceptionDetails', {}).get('text')}")
                elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                    result.errors.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
                elif method == "Network.loadingFailed":
                    result.errors.append(f"load failed: {params.get('errorText')}")
                elif method == "Network.requestWillBeSent":
                    result.requests.append(params.get("request", {}).get("url", ""))
            try:
                pipe.call("Browser.close", timeout=5)
            except (RuntimeError, TimeoutError):
                pass
            return result
        finally:
            os.close(to_chrome_w)
            os.close(from_chrome_r)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
