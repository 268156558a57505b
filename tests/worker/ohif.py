"""A real OHIF Viewer for end-to-end tests: its prebuilt dist served with our own app-config.js, DICOMweb
proxied to Orthanc on the same origin, and headless Chromium driven over the DevTools protocol.

The dist is fetched once by `make ohif` (npm pack of the pinned @ohif/app, outside the repository); tests
skip when it is absent. Nothing here talks to the internet: Chromium runs with background networking off.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import count
from pathlib import Path
from typing import Any, Final

import httpx

OHIF_VERSION: Final = (Path(__file__).resolve().parent / "OHIF_VERSION").read_text().strip()
OHIF_DIST: Final = Path(
    os.environ.get("CCFNET_OHIF_DIR", Path.home() / ".cache" / "ccfnet-worker" / f"ohif-{OHIF_VERSION}")
) / "dist"
CHROMIUM: Final = shutil.which("chromium") or shutil.which("chromium-browser")
_PASSED_HEADERS: Final = ("accept", "content-type", "range")
_RETURNED_HEADERS: Final = ("content-type", "content-range", "accept-ranges")


def app_config() -> str:
    """OHIF's app-config.js: one DICOMweb data source on our own origin (the proxy to Orthanc). Measurement
    tracking and the confirmation prompts stay at OHIF's defaults (standard mode, ask before loading an SR or
    SEG), as a site's unmodified OHIF has them."""
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 1,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "defaultDataSourceName": "orthanc",
        "dataSources": [
            {
                "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
                "sourceName": "orthanc",
                "configuration": {
                    "friendlyName": "Orthanc (test)",
                    "name": "orthanc",
                    "wadoUriRoot": "/dicom-web",
                    "qidoRoot": "/dicom-web",
                    "wadoRoot": "/dicom-web",
                    "qidoSupportsIncludeField": False,
                    "imageRendering": "wadors",
                    "thumbnailRendering": "wadors",
                    "enableStudyLazyLoad": True,
                    "supportsFuzzyMatching": False,
                    "supportsWildcard": True,
                    "omitQuotationForMultipartRequest": True,
                    "bulkDataURI": {"enabled": True},
                },
            }
        ],
    }
    return f"window.config = {json.dumps(config, indent=1)};\n"


class OhifServer:
    """OHIF's static files, our app-config.js, and /dicom-web/* forwarded to Orthanc (one origin, no CORS)."""

    def __init__(self, dist: Path, orthanc_url: str, config_js: str) -> None:
        self.dist = dist
        self.orthanc_url = orthanc_url.rstrip("/")
        self.config_js = config_js.encode()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="ohif-server", daemon=True)
        self.requests: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> OhifServer:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self
        client = httpx.Client(timeout=120)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                server.requests.append(format % args)

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path.startswith("/dicom-web/"):
                    self._forward()
                elif path == "/app-config.js":
                    self._reply(HTTPStatus.OK, "application/javascript", server.config_js)
                else:
                    self._static(path)

            def do_POST(self) -> None:
                self._forward()

            def _reply(self, status: int, content_type: str, body: bytes, extra: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for name, value in (extra or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def _static(self, path: str) -> None:
                file = (server.dist / path.lstrip("/")).resolve()
                if not file.is_relative_to(server.dist.resolve()) or not file.is_file():
                    file = server.dist / "index.html"  # the single-page app's routes
                content_type = _content_type(file.suffix)
                self._reply(HTTPStatus.OK, content_type, file.read_bytes(), {"Cache-Control": "no-store"})

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {name: value for name, value in self.headers.items() if name.lower() in _PASSED_HEADERS}
                # Orthanc writes absolute BulkDataURIs from the Host header: make them point back at us.
                headers["Host"] = self.headers.get("Host", "")
                response = client.request(
                    self.command, server.orthanc_url + self.path, content=body, headers=headers
                )
                extra = {
                    name: value for name, value in response.headers.items()
                    if name.lower() in _RETURNED_HEADERS and name.lower() != "content-type"
                }
                self._reply(
                    response.status_code, response.headers.get("content-type", "application/octet-stream"),
                    response.content, extra,
                )

        return Handler


def _content_type(suffix: str) -> str:
    return {
        ".html": "text/html; charset=utf-8",
        ".js": "application/javascript",
        ".css": "text/css",
        ".json": "application/json",
        ".wasm": "application/wasm",
        ".svg": "image/svg+xml",
        ".png": "image/png",
        ".ico": "image/x-icon",
        ".woff2": "font/woff2",
        ".woff": "font/woff",
    }.get(suffix, "application/octet-stream")


class Browser:
    """Headless Chromium over the Chrome DevTools Protocol, software WebGL for cornerstone's renderer."""

    def __init__(self, profile: Path, *, width: int = 1600, height: int = 1000) -> None:
        import websocket

        if CHROMIUM is None:
            raise RuntimeError("chromium is not installed")
        profile.mkdir(parents=True, exist_ok=True)
        self._process = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-quic", "--no-first-run", "--no-default-browser-check", "--mute-audio",
             "--hide-scrollbars", f"--user-data-dir={profile}", "--remote-debugging-port=0",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=(profile / "chromium.log").open("wb"),
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self._process.poll() is not None:
                self.close()
                raise RuntimeError(f"chromium did not start: see {profile / 'chromium.log'}")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json() if t["type"] == "page"]
        self._ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=120, suppress_origin=True)
        self._ids = count(1)
        self.console: list[str] = []
        self.call("Runtime.enable")
        self.call("Page.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                  mobile=False)

    def _event(self, message: dict[str, Any]) -> None:
        method = message.get("method")
        params = message.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(arg.get("value", arg.get("description", ""))) for arg in params.get("args", []))
            self.console.append(f"{params.get('type')}: {text[:2000]}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.console.append(f"exception: {details.get('exception', {}).get('description', details)}"[:2000])

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        ident = next(self._ids)
        self._ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads(self._ws.recv())
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return dict(message.get("result", {}))
            self._event(message)

    def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression (awaited when it is a promise); page errors raise."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise RuntimeError(details.get("exception", {}).get("description", str(details)))
        return result["result"].get("value")

    def wait_for(self, expression: str, *, timeout: float = 60.0, interval: float = 0.25) -> Any:
        """Poll a JavaScript expression until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"within {timeout} s the page never satisfied: {expression}")
            time.sleep(interval)

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'", timeout=60)

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        if getattr(self, "_ws", None) is not None:
            self._ws.close()
        self._process.terminate()
        try:
            self._process.wait(15)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


@contextmanager
def browser(profile: Path) -> Iterator[Browser]:
    b = Browser(profile)
    try:
        yield b
    finally:
        b.close()
