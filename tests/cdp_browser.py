"""A headless Chromium driven over the DevTools protocol (no selenium / chromedriver needed):
just enough to load a page, set a file input, type, click and read text."""

import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium():
    return next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)


class HeadlessChromium:
    def __init__(self, executable: str):
        from websockets.sync.client import connect

        self.profile = tempfile.mkdtemp(prefix="chromium_profile_")
        self.proc = subprocess.Popen(
            [executable, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run", "--disable-sync", f"--user-data-dir={self.profile}",
             "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            port = self._devtools_port()
            pages = [t for t in json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=10))
                     if t["type"] == "page"]
            self.ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        except Exception:
            self.close()
            raise
        self._ids = itertools.count(1)

    def _devtools_port(self, timeout=60) -> int:
        port_file = os.path.join(self.profile, "DevToolsActivePort")
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}")
            if os.path.exists(port_file):
                content = open(port_file).read().split()
                if content:
                    return int(content[0])
            time.sleep(0.1)
        raise TimeoutError("chromium did not open its DevTools port")

    def send(self, method: str, **params):
        msg_id = next(self._ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def evaluate(self, js: str):
        result = self.send("Runtime.evaluate", expression=js, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{js}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, js: str, timeout: float = 60):
        """Polls until `js` is truthy; returns its value (None on timeout)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.evaluate(js)
            if value:
                return value
            time.sleep(0.2)
        return None

    def goto(self, url: str):
        self.send("Page.enable")
        self.send("Page.navigate", url=url)

    def set_file(self, selector: str, path: str):
        if not self.wait_for(f"!!document.querySelector({json.dumps(selector)})"):
            raise TimeoutError(f"no element {selector}")
        root = self.send("DOM.getDocument")["root"]["nodeId"]
        node = self.send("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        self.send("DOM.setFileInputFiles", files=[path], nodeId=node)

    def type_into(self, selector: str, text: str):
        self.evaluate(f"""(() => {{
            const el = document.querySelector({json.dumps(selector)});
            el.value = {json.dumps(text)};
            el.dispatchEvent(new Event('input', {{bubbles: true}}));
        }})()""")

    def click(self, selector: str):
        self.evaluate(f"document.querySelector({json.dumps(selector)}).click()")

    def text(self, selector: str = "body") -> str:
        return self.evaluate(f"(document.querySelector({json.dumps(selector)}) || {{}}).innerText || ''")

    def close(self):
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.profile, ignore_errors=True)
