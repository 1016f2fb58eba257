"""Headless Chromium over the DevTools protocol (``--remote-debugging-pipe``: standard library only,
nothing downloaded), for the checks and screenshots that need a real browser: the MLflow UI and the
patient page of ``cnmc serve``."""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from helpers import local_server


class Chromium:
    """Headless Chromium driven over ``--remote-debugging-pipe`` (fd 3: commands in, fd 4: replies)."""

    def __init__(self, binary: str, width: int, height: int):
        self.width = width
        self.profile = tempfile.mkdtemp(prefix="cnmc-chromium-")
        cmd_r, self._out = os.pipe()
        self._in, res_w = os.pipe()

        def child_fds() -> None:  # dup above 4 first, so dup2 never maps a descriptor onto itself
            a, b = os.dup(cmd_r), os.dup(res_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [
                binary,
                *local_server.CHROMIUM_FLAGS,
                "--remote-debugging-pipe",
                f"--user-data-dir={self.profile}",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            preexec_fn=child_fds,
            close_fds=False,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(cmd_r)
        os.close(res_w)
        self._buffer, self._id = b"", 0
        page = next(t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
        self.page("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, session: str | None = None, timeout: float = 60, **params: object) -> dict:
        self._id += 1
        message: dict = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self._in], [], [], left)[0]:
                    raise TimeoutError(f"Chromium did not answer {method}")
                chunk = os.read(self._in, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed the DevTools pipe")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def page(self, method: str, **params: object) -> dict:
        return self.call(method, session=self.session, **params)

    def js(self, expression: str) -> object:
        result = self.page("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait(self, condition: str, timeout: float = 60) -> None:
        guarded = f"(() => {{ try {{ return !!({condition}); }} catch (e) {{ return false; }} }})()"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.js(guarded):
                return
            time.sleep(0.25)
        raise TimeoutError(f"page never satisfied: {condition}")

    def goto(self, url: str) -> None:
        self.page("Page.navigate", url=url)

    def png(self, height: int | None = None) -> bytes:
        params: dict = {"format": "png"}
        if height:
            params["clip"] = {"x": 0, "y": 0, "width": self.width, "height": height, "scale": 1}
        return base64.b64decode(self.page("Page.captureScreenshot", **params)["data"])

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
            self.proc.wait(10)
        except Exception:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        shutil.rmtree(self.profile, ignore_errors=True)

    def pick_files(self, selector: str, files: list[Path]) -> None:
        """Choose ``files`` in the page's file input, as a person does (the change event fires)."""
        root = self.page("DOM.getDocument")["root"]["nodeId"]
        node = self.page("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        self.page("DOM.setFileInputFiles", nodeId=node, files=[str(Path(f).resolve()) for f in files])


def patient_page(browser: str, url: str, files: list[Path], timeout: float = 120) -> tuple[dict, bytes]:
    """Open ``cnmc serve``'s page at ``url``, pick ``files`` and wait for the answer; return what the
    page shows (the call, each cell in page order, the files it refused) and a screenshot."""
    chromium = Chromium(browser, 1280, 1000)
    try:
        chromium.goto(url)
        chromium.wait("document.getElementById('model').textContent.includes('threshold')", timeout)
        chromium.pick_files("#files", files)
        chromium.wait(
            "document.getElementById('summary').dataset.call || "
            "document.getElementById('status').className === 'error'",
            timeout,
        )
        shown = chromium.js(
            """(() => ({
              status: document.getElementById('status').textContent,
              call: document.getElementById('summary').dataset.call,
              summary: document.getElementById('summary').innerText,
              cells: [...document.querySelectorAll('.cell')].map((c) => ({
                name: c.dataset.name, label: c.dataset.label, prob: Number(c.dataset.prob),
                ood: c.dataset.ood === 'true', text: c.innerText, thumbnail: c.querySelector('img').naturalWidth })),
              errors: [...document.querySelectorAll('#errors li')].map((e) => e.innerText),
              height: document.documentElement.scrollHeight,
            }))()"""
        )
        assert isinstance(shown, dict)
        chromium.page(
            "Emulation.setDeviceMetricsOverride",
            width=1280,
            height=min(int(shown["height"]), 4000),
            deviceScaleFactor=1,
            mobile=False,
        )
        return shown, chromium.png()
    finally:
        chromium.close()
