"""`factory serve`: the live dashboard page and a read-only JSON API over a workspace.

    GET /                       the page (factory/static/), which polls the routes below
    GET /api/status             .factory/status.json (the idle status when no run has started)
    GET /api/training           .factory/training-status.json
    GET /api/training/history   .factory/training-history.jsonl as an array, one point per step
    GET /api/metrics/<phase>    metrics/<phase's metrics>.json, e.g. /api/metrics/finetune
                                (and /api/metrics/compare: metrics/comparison.json)
    GET /api/gates              every metrics/gates/*.json, in pipeline order
    GET /report                 metrics/report.html

The standard library's ThreadingHTTPServer rather than a framework: the server answers a
fixed set of GET routes with files the runner has already written, so a framework would add
a dependency and start-up time and nothing the routes need. No request names a file: each
route maps to one known output, a phase name is looked up in the pipeline, and the page's
assets are read into memory at start, so no path can reach anything else. The JSON is the
files' bytes as written (atomically, so never torn); every response says `no-store`.
Errors are JSON too: {"error": message, "status": code}.

The API serves prompts, references and predictions. On a loopback address only requests
addressed to it are answered (the Host check, against DNS rebinding). Any other address
(`--host 0.0.0.0`) reaches the network, so every request must carry the server's token
(given with --token, or generated at start and printed in the URL): as `?token=` (the
printed URL; the page then keeps it in a same-site cookie), a `factory_token` cookie, or an
`Authorization: Bearer` header.
"""

from __future__ import annotations

import errno
import hmac
import ipaddress
import secrets
import socket
import socketserver
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, quote, unquote, urlsplit

import orjson

from factory.errors import FactoryError
from factory.gates import in_pipeline_order
from factory.status import idle_status, read_training_history, runner_alive
from factory.workspace import Workspace

STATIC_DIR = Path(__file__).resolve().parent / "static"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
# The page loads nothing from anywhere but this server; the browser enforces it.
PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
# The report is one self-contained file: inline styles, images as data: URIs, no scripts.
REPORT_POLICY = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'"
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
TOKEN_COOKIE = "factory_token"


class ApiError(Exception):
    def __init__(self, status: HTTPStatus, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class DashboardServer(ThreadingHTTPServer):
    daemon_threads = True  # a poller's open connection must not keep Ctrl-C from stopping the server

    def __init__(self, ws: Workspace, host: str, port: int, token: str | None = None):
        import phases

        self.token = token

        self.ws = ws
        self.phase_metrics = {p.name: p.metrics for p in phases.PIPELINE + phases.ON_REQUEST}
        self.phase_summaries = {p.name: p.summary for p in phases.PIPELINE + phases.ON_REQUEST}
        self.pipeline = [p.name for p in phases.PIPELINE]
        self.assets = {path.name: (path.read_bytes(), CONTENT_TYPES[path.suffix])
                       for path in sorted(STATIC_DIR.iterdir()) if path.suffix in CONTENT_TYPES}
        self.loopback = _is_loopback(host)
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), DashboardHandler)

    def server_bind(self) -> None:
        # HTTPServer's own server_bind asks DNS for the host's full name, which can hang for
        # seconds on a machine without a resolver; the name is only used in CGI variables.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    @property
    def url_with_token(self) -> str:
        return self.url + (f"?token={quote(self.token)}" if self.token else "")

    # --- the routes' content ---------------------------------------------------------

    def status(self) -> tuple[bytes, dict[str, str]]:
        body = self._file(self.ws.status_file, absent=None)
        if body is None:
            return orjson.dumps(idle_status(self.pipeline, self.phase_summaries)), {"X-Factory-Run-Alive": "false"}
        alive = runner_alive(orjson.loads(body))
        return body, {"X-Factory-Run-Alive": "true" if alive else "false"}

    def training(self) -> bytes:
        return self._file(self.ws.training_status_file, absent="no training has started in this workspace yet")

    def training_history(self) -> bytes:
        self._workspace_exists()
        return orjson.dumps(read_training_history(self.ws))

    def metrics(self, phase: str) -> bytes:
        if phase not in self.phase_metrics:
            raise ApiError(HTTPStatus.NOT_FOUND, f"no phase named {phase!r}; phases: {', '.join(self.phase_metrics)}")
        path = self.ws.metrics_file(self.phase_metrics[phase])
        return self._file(path, absent=f"{self.ws.rel(path)} does not exist yet: the {phase} phase has not succeeded here")

    def gates(self) -> bytes:
        self._workspace_exists()
        results = [orjson.loads(self._file(path, absent="")) for path in self.ws.gate_results_dir.glob("*.json")]
        return orjson.dumps(in_pipeline_order(results, list(self.phase_metrics)))

    def report(self) -> bytes:
        path = self.ws.metrics_dir / "report.html"
        return self._file(path, absent="no report yet: it is written after evaluate (or run `factory report`)", json=False)

    def _file(self, path: Path, absent: str | None, json: bool = True) -> bytes | None:
        self._workspace_exists()
        try:
            body = path.read_bytes()
        except FileNotFoundError:
            if absent is None:
                return None
            raise ApiError(HTTPStatus.NOT_FOUND, absent) from None
        if json:
            try:
                orjson.loads(body)
            except orjson.JSONDecodeError:
                # The runner writes atomically, so this is a file damaged by hand or a disk problem.
                raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, f"{self.ws.rel(path)} is not valid JSON",
                               {"Retry-After": "1"}) from None
        return body

    def _workspace_exists(self) -> None:
        if not self.ws.root.is_dir():
            raise ApiError(HTTPStatus.NOT_FOUND, f"the workspace {self.ws.root} does not exist")


class DashboardHandler(BaseHTTPRequestHandler):
    server: DashboardServer
    protocol_version = "HTTP/1.1"  # keep-alive: the page polls every second
    disable_nagle_algorithm = True  # headers and body are separate writes: without this, keep-alive waits 40 ms
    server_version = "factory"

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _not_allowed(self) -> None:
        self._error(ApiError(HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command} is not allowed: the API is read-only",
                             {"Allow": "GET, HEAD"}), send_body=True)

    do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _not_allowed

    def _answer(self, send_body: bool) -> None:
        try:
            self._check_host()
            cookie = self._check_token()
            body, content_type, headers = self._route(unquote(urlsplit(self.path).path))
            if cookie:
                headers = {**headers, "Set-Cookie": cookie}
        except ApiError as e:
            self._error(e, send_body)
        except Exception as e:  # a bug: answer in JSON and keep serving
            self.log_error("internal error on %s: %r", self.path, e)
            self._error(ApiError(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {type(e).__name__}: {e}"), send_body)
        else:
            self._send(HTTPStatus.OK, body, content_type, headers, send_body)

    def _route(self, path: str) -> tuple[bytes, str, dict[str, str]]:
        json_type = "application/json"
        server = self.server
        routes: dict[str, Callable[[], bytes]] = {
            "/api/training": server.training,
            "/api/training/history": server.training_history,
            "/api/gates": server.gates,
        }
        if path == "/api/status":
            body, headers = server.status()
            return body, json_type, headers
        if path in routes:
            return routes[path](), json_type, {}
        if path.startswith("/api/metrics/"):
            return server.metrics(path.removeprefix("/api/metrics/")), json_type, {}
        if path == "/report":
            return server.report(), CONTENT_TYPES[".html"], {"Content-Security-Policy": REPORT_POLICY}
        asset = "index.html" if path == "/" else path.removeprefix("/static/") if path.startswith("/static/") else None
        if asset in server.assets:
            body, content_type = server.assets[asset]
            return body, content_type, {"Content-Security-Policy": PAGE_POLICY}
        raise ApiError(HTTPStatus.NOT_FOUND, f"no such route: {path}")

    def _check_host(self) -> None:
        """On a loopback address, answer only requests addressed to it: a web page elsewhere
        cannot read the API through a DNS name that resolves to 127.0.0.1 (DNS rebinding)."""
        host = self.headers.get("Host")
        if not self.server.loopback or host is None:
            return
        name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:].split("]", 1)[0]
        if name.lower() not in LOOPBACK_NAMES:
            raise ApiError(HTTPStatus.FORBIDDEN, f"Host {host!r} is not this server; use {self.server.url}")

    def _check_token(self) -> str | None:
        """When the server has a token, every request must carry it; a valid `?token=` gets it
        back as a cookie (returned, for Set-Cookie), so the page's own requests carry it."""
        token = self.server.token
        if token is None:
            return None
        from_query = parse_qs(urlsplit(self.path).query).get("token", [None])[0]
        from_header = self.headers.get("Authorization", "")
        from_header = from_header[7:].strip() if from_header[:7].lower() == "bearer " else None
        try:
            from_cookie = SimpleCookie(self.headers.get("Cookie", "")).get(TOKEN_COOKIE)
        except CookieError:
            from_cookie = None
        for given in (from_query, from_header, from_cookie.value if from_cookie else None):
            if given is not None and hmac.compare_digest(given.encode(), token.encode()):
                if given is from_query:
                    return f"{TOKEN_COOKIE}={quote(token)}; Path=/; HttpOnly; SameSite=Strict"
                return None
        raise ApiError(HTTPStatus.UNAUTHORIZED, "this server needs its token: open the URL `factory serve` printed "
                       "(it ends in ?token=...), or send `Authorization: Bearer TOKEN`", {"WWW-Authenticate": "Bearer"})

    def _error(self, error: ApiError, send_body: bool) -> None:
        body = orjson.dumps({"error": error.message, "status": int(error.status)})
        self._send(error.status, body, "application/json", error.headers, send_body)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, headers: dict[str, str], send_body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type if "charset" in content_type else f"{content_type}; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_request(self, code="-", size="-") -> None:
        """Quiet: the page polls every second. Errors still go to log_error."""


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(ws: Workspace, host: str, port: int, announce: Callable[[str], None], token: str | None = None) -> None:
    """Serve until Ctrl-C. `announce` gets the URL (with the token, if any) once the socket is
    listening (port 0 picks one). A non-loopback address always gets a token: `token`, or a
    new random one."""
    if token is None and not _is_loopback(host):
        token = secrets.token_urlsafe(24)
    try:
        server = DashboardServer(ws, host, port, token)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise FactoryError(f"port {port} on {host} is in use; pick another with --port (0 picks a free one)") from None
        raise FactoryError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    with server:
        announce(server.url_with_token)
        try:
            server.serve_forever(poll_interval=0.2)
        except KeyboardInterrupt:
            pass
