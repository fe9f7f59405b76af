"""A small Chrome DevTools Protocol driver for browser tests: a real headless Chromium, driven
over its DevTools websocket with aiohttp's client (no Selenium, no extra dependency).

    with Browser() as b:
        b.goto("http://127.0.0.1:8080/login")
        b.type_text("#token", "…")
        b.click("#login")                  # a real mouse click at the element's centre
        b.press("2")                       # a real key press (keyDown / keyUp)
        b.evaluate("document.title")
        b.screenshot(path)

Every wait has a deadline (no fixed sleeps): actions that navigate wait until the new document
has loaded; `wait_for(js)` polls a JavaScript condition. `last_status` is the HTTP status of the
last document loaded; `dialogs` lists every alert/confirm/prompt a page tried to open (each is
dismissed), so a test can prove that no injected script ran.

Chromium: `chromium` from Debian (`apt-get install chromium`), or $CHROMIUM. As root it needs
--no-sandbox (containers, CI).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp

# key → (code, Windows virtual key code, text it types)
_SPECIAL_KEYS = {
    "ArrowLeft": ("ArrowLeft", 37, ""), "ArrowRight": ("ArrowRight", 39, ""),
    "ArrowUp": ("ArrowUp", 38, ""), "ArrowDown": ("ArrowDown", 40, ""),
    "Enter": ("Enter", 13, "\r"), "Escape": ("Escape", 27, ""), "Tab": ("Tab", 9, ""),
}


def chromium_binary() -> str | None:
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


class CDPError(RuntimeError):
    pass


class Browser:
    """One headless Chromium with one page, driven synchronously (its own event loop thread)."""

    def __init__(self, *, timeout: float = 30.0, width: int = 1280, height: int = 900):
        self.timeout = timeout
        self.size = (width, height)
        self.dialogs: list[dict] = []
        self.console_errors: list[str] = []
        self.last_status: int | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._proc: subprocess.Popen | None = None
        self._dir = Path(tempfile.mkdtemp(prefix="rlhf-chromium-"))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="cdp")

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "Browser":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        binary = chromium_binary()
        if binary is None:
            raise RuntimeError("chromium not found (apt-get install chromium, or set $CHROMIUM)")
        args = [binary, "--headless=new", "--remote-debugging-port=0",
                f"--user-data-dir={self._dir / 'profile'}", "--no-first-run",
                "--no-default-browser-check", "--disable-gpu", "--disable-extensions",
                "--disable-background-networking", "--disable-sync", "--disable-dev-shm-usage",
                "--mute-audio", "--password-store=basic", f"--window-size={self.size[0]},{self.size[1]}"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            args.append("--no-sandbox")  # Chromium refuses to run its sandbox as root
        log = open(self._dir / "chromium.log", "wb")
        self._proc = subprocess.Popen([*args, "about:blank"], stdout=log, stderr=log,
                                      stdin=subprocess.DEVNULL)
        log.close()
        port_file = self._dir / "profile" / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout
        while not (port_file.is_file() and port_file.read_text().count("\n") >= 1):
            if self._proc.poll() is not None:
                raise RuntimeError(f"chromium exited ({self._proc.returncode}): {self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"chromium wrote no DevToolsActivePort: {self.log_tail()}")
            time.sleep(0.05)
        self.devtools_port = int(port_file.read_text().splitlines()[0])
        self._thread.start()
        self._run(self._connect())

    def log_tail(self, n: int = 2000) -> str:
        try:
            return (self._dir / "chromium.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    async def _connect(self) -> None:
        self._http = aiohttp.ClientSession()
        base = f"http://127.0.0.1:{self.devtools_port}"
        deadline = time.monotonic() + self.timeout
        while True:
            async with self._http.get(f"{base}/json/list") as resp:
                pages = [t for t in await resp.json() if t.get("type") == "page"]
            if pages:
                break
            if time.monotonic() > deadline:
                raise TimeoutError("chromium has no page target")
            await asyncio.sleep(0.05)
        self._ws = await self._http.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
        self._reader = asyncio.ensure_future(self._read())
        for domain in ("Page", "Runtime", "Network"):
            await self._send(f"{domain}.enable")
        await self._send("Emulation.setDeviceMetricsOverride", width=self.size[0],
                         height=self.size[1], deviceScaleFactor=1, mobile=False)

    async def _read(self) -> None:
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(msg.data)
            if "id" in data:
                fut = self._pending.pop(data["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(data)
                continue
            method, params = data.get("method"), data.get("params", {})
            if method == "Page.javascriptDialogOpening":
                self.dialogs.append(params)
                asyncio.ensure_future(self._send("Page.handleJavaScriptDialog", accept=False))
            elif method == "Network.responseReceived" and params.get("type") == "Document":
                self.last_status = params["response"]["status"]
            elif method == "Runtime.exceptionThrown":
                self.console_errors.append(json.dumps(params.get("exceptionDetails", {}))[:500])
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(CDPError("the DevTools connection closed"))

    async def _send(self, method: str, **params) -> dict:
        msg_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        await self._ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params}))
        reply = await asyncio.wait_for(fut, self.timeout)
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error'].get('message')}")
        return reply.get("result", {})

    def _run(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(
            (timeout or self.timeout) + 5)

    def close(self) -> None:
        if self._thread.is_alive():
            async def shut():
                if getattr(self, "_ws", None) is not None:
                    await self._ws.close()
                if getattr(self, "_http", None) is not None:
                    await self._http.close()
            try:
                self._run(shut(), 10)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(10)
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        shutil.rmtree(self._dir, ignore_errors=True)

    # ------------------------------------------------------------------ CDP
    def send(self, method: str, **params) -> dict:
        """One raw DevTools command (its result)."""
        return self._run(self._send(method, **params))

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        return self._run(self._evaluate(expression))

    async def _evaluate(self, expression: str) -> Any:
        result = await self._send("Runtime.evaluate", expression=expression, returnByValue=True,
                                  awaitPromise=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise CDPError(details.get("exception", {}).get("description") or details.get("text"))
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float | None = None) -> Any:
        """Poll a JavaScript expression until it is truthy (its value) or the deadline passes."""
        return self._run(self._wait_for(expression, timeout or self.timeout), timeout)

    async def _wait_for(self, expression: str, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            try:
                last = await self._evaluate(expression)
                if last:
                    return last
            except CDPError as exc:  # between documents: the context is gone for a moment
                last = exc
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout}s for {expression!r} (last: {last!r})")
            await asyncio.sleep(0.05)

    # ------------------------------------------------------------------ navigation
    async def _mark(self) -> None:
        self.last_status = None
        await self._evaluate("window.__cdpOldDocument = true")

    async def _loaded(self, timeout: float) -> None:
        await self._wait_for("window.__cdpOldDocument === undefined && "
                             "document.readyState === 'complete'", timeout)

    def goto(self, url: str, timeout: float | None = None) -> int | None:
        """Load `url`; its HTTP status."""
        async def go():
            await self._mark()
            await self._send("Page.navigate", url=url)
            await self._loaded(timeout or self.timeout)
        self._run(go(), timeout)
        return self.last_status

    def navigates(self, action, timeout: float | None = None) -> int | None:
        """Run `action()` (a click, a key press) that submits a form; wait for the new
        document; its HTTP status."""
        self._run(self._mark())
        action()
        self._run(self._loaded(timeout or self.timeout), timeout)
        return self.last_status

    @property
    def url(self) -> str:
        return self.evaluate("location.href")

    # ------------------------------------------------------------------ input
    def click(self, selector: str) -> None:
        """A real left click at the centre of the first element matching `selector`."""
        x, y = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            f" if (!e) throw new Error('no element ' + {json.dumps(selector)});"
            " e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
            " return [r.left + r.width / 2, r.top + r.height / 2]; })()")

        async def clk():
            await self._send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
            for kind in ("mousePressed", "mouseReleased"):
                await self._send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left",
                                 clickCount=1)
        self._run(clk())

    def press(self, key: str) -> None:
        """A real key press: "1", "t", "ArrowLeft", "Enter" …"""
        if key in _SPECIAL_KEYS:
            code, vk, text = _SPECIAL_KEYS[key]
        elif len(key) == 1:
            code = f"Digit{key}" if key.isdigit() else f"Key{key.upper()}" if key.isalpha() else ""
            vk, text = ord(key.upper()), key
        else:
            raise ValueError(f"unknown key {key!r}")

        async def prs():
            down = dict(key=key, code=code, windowsVirtualKeyCode=vk, nativeVirtualKeyCode=vk)
            await self._send("Input.dispatchKeyEvent", type="keyDown" if text else "rawKeyDown",
                             text=text, unmodifiedText=text, **down)
            await self._send("Input.dispatchKeyEvent", type="keyUp", **down)
        self._run(prs())

    def type_text(self, selector: str, text: str) -> None:
        """Focus an input and type `text` into it (as an IME would: one insertText)."""
        self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
        self.send("Input.insertText", text=text)

    def text(self, selector: str) -> str | None:
        return self.evaluate(f"document.querySelector({json.dumps(selector)})?.textContent ?? null")

    def texts(self, selector: str) -> list[str]:
        return self.evaluate(f"[...document.querySelectorAll({json.dumps(selector)})]"
                             ".map(e => e.textContent)")

    def cookies(self) -> list[dict]:
        return self.send("Network.getCookies")["cookies"]

    def clear_cookies(self) -> None:
        self.send("Network.clearBrowserCookies")

    def screenshot(self, path: str | Path, *, full_page: bool = True) -> Path:
        """A PNG of the page (the whole page, not only the viewport, by default)."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            metrics = self.send("Page.getLayoutMetrics")
            size = metrics.get("cssContentSize") or metrics["contentSize"]
            params.update(captureBeyondViewport=True, clip={
                "x": 0, "y": 0, "width": max(size["width"], self.size[0]),
                "height": size["height"], "scale": 1})
        data = base64.b64decode(self.send("Page.captureScreenshot", **params)["data"])
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path
