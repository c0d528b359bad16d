"""The page's HTTP server (standard library only): the static page, a JSON API, and Server-Sent Events.

    GET  /                       the page                 GET  /api/config    defaults, device, notice
    GET  /api/history            every image, oldest first GET  /api/plan      the memory plan, as text
    POST /api/images             upload (raw image bytes)  GET  /api/images/N  an image (?download=1)
    POST /api/edits              queue an edit (JSON)      GET  /api/jobs/N    a job's state
    POST /api/jobs/N/cancel      cancel it                 GET  /api/events    every job change (?job=N: one)
    GET  /api/loras              the LoRAs of `serve --lora`, each with its strength there

Safety: with a token every request must carry it (``Authorization: Bearer``, ``?token=`` or the
cookie the page gets on its first load); without one (localhost only) the Host header must name
this machine, which stops other sites reaching the server through a rebound DNS name. Requests
from another origin are refused, and POST bodies must have a type a cross-site form cannot send.
"""

from __future__ import annotations

import hmac
import json
import math
import queue
import re
import socket
from dataclasses import dataclass, field
from http import HTTPStatus
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from ..commands.plan import explain
from ..errors import KontextError
from .editing import PageEditor
from .gallery import MAX_UPLOAD_BYTES, Gallery
from .jobs import FINISHED, EditRequest, JobQueue

STATIC = Path(__file__).parent / "static"
STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)
MAX_JSON_BYTES = 64 * 1024
MAX_PROMPT_CHARS = 10_000
MAX_STEPS = 500
MAX_GUIDANCE = 100.0
MAX_SEED = 2**64 - 1
MAX_LORA_STRENGTH = 4.0  # an edit's LoRA strengths are from -4 to 4
# Content types a page of another site may POST without asking first (a "simple" request): refused.
SIMPLE_TYPES = {"text/plain", "multipart/form-data", "application/x-www-form-urlencoded", ""}
KEEPALIVE_SECONDS = 15
TOKEN_COOKIE = "kontext_token"
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


class HttpError(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class PageApp:
    """What the request handlers work with."""

    gallery: Gallery
    jobs: JobQueue
    editor: PageEditor
    token: str | None = None
    info: dict[str, Any] = field(default_factory=dict)  # shown by the page: model, device, notice
    static: dict[str, Path] = field(default_factory=lambda: {p.name: p for p in STATIC.iterdir() if p.is_file()})


class PageServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, port: int, app: PageApp):
        self.app = app
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), PageHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in str(host) else host}:{port}/"


def _int_field(body: dict[str, Any], name: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"{name} must be a whole number from {low} to {high}")
    return value


def _lora_strengths(body: dict[str, Any], defaults: dict[str, float]) -> dict[str, float]:
    """The strength of every LoRA for one edit: those ``body["loras"]`` names (by LoRA name), the others as
    `serve` started with them."""
    given = body.get("loras", {})
    if not isinstance(given, dict):
        raise HttpError(HTTPStatus.BAD_REQUEST, 'loras must map LoRA names to strengths, e.g. {"style": 0.8}')
    for name, value in given.items():
        if name not in defaults:
            known = ", ".join(defaults) or "none: start serve with --lora FILE[:STRENGTH]"
            raise HttpError(HTTPStatus.BAD_REQUEST, f"loras: no LoRA named {name!r} on this server (LoRAs: {known})")
        number = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
        if not number or abs(value) > MAX_LORA_STRENGTH:
            raise HttpError(
                HTTPStatus.BAD_REQUEST,
                f"loras: the strength of {name} must be a number from {-MAX_LORA_STRENGTH:g} "
                f"to {MAX_LORA_STRENGTH:g} (0: off)",
            )
    return {name: float(given.get(name, default)) for name, default in defaults.items()}


def edit_request(body: Any, app: PageApp) -> EditRequest:
    """An edit's request from its JSON body, every field checked; a missing setting takes the server's default."""
    if not isinstance(body, dict):
        raise HttpError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
    d = app.editor.defaults
    image = _int_field(body, "image", None, 1, 2**62)
    if image is None or app.gallery.get(image) is None:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"image: no image {image} in this session")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise HttpError(HTTPStatus.BAD_REQUEST, "prompt: the edit instruction is required")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"prompt: at most {MAX_PROMPT_CHARS} characters")
    guidance = body.get("guidance", d.guidance)
    if isinstance(guidance, bool) or not isinstance(guidance, int | float) or not math.isfinite(guidance):
        raise HttpError(HTTPStatus.BAD_REQUEST, "guidance must be a number")
    if not 0 <= guidance <= MAX_GUIDANCE:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"guidance must be from 0 to {MAX_GUIDANCE:g}")
    side = int(math.isqrt(d.max_pixels * 16))  # the longest side of any sensible aspect ratio
    width = _int_field(body, "width", d.width, 16, side)
    height = _int_field(body, "height", d.height, 16, side)
    if width is not None and height is not None and width * height > d.max_pixels:
        raise HttpError(
            HTTPStatus.BAD_REQUEST, f"{width}x{height} is more pixels than this server plans for ({d.max_pixels})"
        )
    return EditRequest(
        image=image,
        prompt=prompt.strip(),
        seed=_int_field(body, "seed", d.seed, 0, MAX_SEED),  # type: ignore[arg-type]
        steps=_int_field(body, "steps", d.steps, 1, MAX_STEPS),  # type: ignore[arg-type]
        guidance=float(guidance),
        width=width,
        height=height,
        loras=_lora_strengths(body, d.loras),
    )


class PageHandler(BaseHTTPRequestHandler):
    server: PageServer
    server_version = "lowvram_kontext"

    def log_message(self, format: str, *args: Any) -> None:
        """Requests are not logged: the console keeps the edits' progress readable."""

    def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    @property
    def app(self) -> PageApp:
        return self.server.app

    def _handle(self, method: str) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            self._check_access(query)
            self._route(method, url.path, query)
        except HttpError as exc:
            self._json(exc.status, {"error": exc.message})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away
        except Exception as exc:  # a bug of ours: one line to the client, the server goes on
            message = f"unexpected {type(exc).__name__}: {exc}".splitlines()[0]
            try:
                self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": message})
            except OSError:
                pass

    # --- access ---------------------------------------------------------------------------------

    def _check_access(self, query: dict[str, str]) -> None:
        host = self.headers.get("Host", "")
        origin = self.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc != host:
            raise HttpError(HTTPStatus.FORBIDDEN, "requests from other sites are refused")
        token = self.app.token
        if token is None:
            name = urlsplit(f"//{host}").hostname or ""
            if name not in LOOPBACK_NAMES | {str(self.server.server_address[0])}:
                raise HttpError(HTTPStatus.FORBIDDEN, f"unknown host {host!r}: open the page as {self.server.url}")
            return
        if not any(hmac.compare_digest(given.encode(), token.encode()) for given in self._tokens_given(query)):
            raise HttpError(HTTPStatus.UNAUTHORIZED, "a valid token is required (the URL serve printed has it)")

    def _tokens_given(self, query: dict[str, str]) -> list[str]:
        given = []
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            given.append(auth.removeprefix("Bearer ").strip())
        if "token" in query:
            given.append(query["token"])
        cookie = SimpleCookie(self.headers.get("Cookie", ""))
        if TOKEN_COOKIE in cookie:
            given.append(cookie[TOKEN_COOKIE].value)
        return given

    # --- routes ---------------------------------------------------------------------------------

    def _route(self, method: str, path: str, query: dict[str, str]) -> None:
        app = self.app
        if method == "GET":
            if path in ("/", "/index.html"):
                return self._static("index.html", set_cookie="token" in query)
            if m := re.fullmatch(r"/static/([\w.-]+)", path):
                return self._static(m.group(1))
            if path == "/api/config":
                return self._json(HTTPStatus.OK, self._config())
            if path == "/api/plan":
                return self._json(HTTPStatus.OK, self._plan())
            if path == "/api/loras":
                return self._json(HTTPStatus.OK, self._loras())
            if path == "/api/history":
                return self._json(HTTPStatus.OK, {"images": app.gallery.history()})
            if path == "/api/events":
                return self._events(int(query["job"]) if query.get("job", "").isdigit() else None)
            if m := re.fullmatch(r"/api/images/(\d+)", path):
                return self._image(int(m.group(1)), download=query.get("download") == "1")
            if m := re.fullmatch(r"/api/jobs/(\d+)", path):
                return self._json(HTTPStatus.OK, self._job(int(m.group(1))).snapshot())
        elif method == "POST":
            if path == "/api/images":
                return self._upload()
            if path == "/api/edits":
                job = app.jobs.submit(edit_request(self._json_body(), app))
                return self._json(HTTPStatus.ACCEPTED, job.snapshot())
            if m := re.fullmatch(r"/api/jobs/(\d+)/cancel", path):
                self._json_body()
                job = self._job(int(m.group(1)))
                app.jobs.cancel(job)
                return self._json(HTTPStatus.OK, job.snapshot())
        raise HttpError(HTTPStatus.NOT_FOUND, f"no {method} {path}")

    def _job(self, number: int) -> Any:
        job = self.app.jobs.get(number)
        if job is None:
            raise HttpError(HTTPStatus.NOT_FOUND, f"no job {number}")
        return job

    def _config(self) -> dict[str, Any]:
        d = self.app.editor.defaults
        defaults = {"steps": d.steps, "guidance": d.guidance, "seed": d.seed, "width": d.width, "height": d.height}
        return {
            **self.app.info,
            "defaults": defaults,
            "max_pixels": d.max_pixels,
            "grid": self.app.editor.pipeline.vae_grid,
            "max_upload_bytes": MAX_UPLOAD_BYTES,
            "out_dir": str(self.app.gallery.folder),
        }

    def _loras(self) -> dict[str, Any]:
        """The LoRAs an edit may weigh, by name, each with its strength when the edit leaves it out."""
        defaults = self.app.editor.defaults.loras
        loras = [
            {
                "name": lora.name,
                "file": lora.path.name,
                "strength": defaults[lora.name],
                "rank": lora.rank,
                "layers": {component: len(layers) for component, layers in lora.updates.items()},
            }
            for lora in self.app.editor.pipeline.loras
        ]
        return {"loras": loras, "max_strength": MAX_LORA_STRENGTH}

    def _plan(self) -> dict[str, Any]:
        pipeline = self.app.editor.pipeline
        chosen = pipeline.plan
        if chosen is None:
            text = f"No memory plan: on the {pipeline.device.type.upper()} every component is loaded whole."
        else:
            text = explain(chosen)
        return {"profile": chosen.profile.name if chosen else None, "text": text, "on_device": pipeline.on_device}

    def _image(self, number: int, download: bool) -> None:
        entry = self.app.gallery.get(number)
        # Only files the gallery wrote, inside its own folder, are ever read.
        if entry is None or not entry.path.resolve().is_relative_to(self.app.gallery.folder):
            raise HttpError(HTTPStatus.NOT_FOUND, f"no image {number}")
        headers = {"Cache-Control": "private, max-age=31536000, immutable"}  # a number never changes its image
        if download:
            headers["Content-Disposition"] = f'attachment; filename="{entry.path.name}"'
        self._send(HTTPStatus.OK, entry.path.read_bytes(), entry.media_type, headers)

    def _upload(self) -> None:
        length = self._body_length(MAX_UPLOAD_BYTES)
        filename = unquote(self.headers.get("X-Filename", ""))[:200]
        try:
            entry = self.app.gallery.add_upload(self.rfile.read(length), filename)
        except KontextError as exc:
            raise HttpError(HTTPStatus.BAD_REQUEST, str(exc)) from None
        self._json(HTTPStatus.CREATED, entry.to_dict())

    # --- bodies and responses -------------------------------------------------------------------

    def _body_length(self, limit: int) -> int:
        """The announced body length, checked before any of it is read; refuses form-like content types."""
        kind = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if kind in SIMPLE_TYPES:
            self.close_connection = True
            raise HttpError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"content type {kind or 'none'} is not accepted")
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            raise HttpError(HTTPStatus.LENGTH_REQUIRED, "the request must say its length (Content-Length)")
        if int(length) > limit:
            self.close_connection = True  # the body is left unread
            raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"{length} bytes is more than the limit of {limit}")
        return int(length)

    def _json_body(self) -> Any:
        raw = self.rfile.read(self._body_length(MAX_JSON_BYTES))
        try:
            return json.loads(raw or b"{}")
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise HttpError(HTTPStatus.BAD_REQUEST, "the body is not valid JSON") from None

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        for name, value in {"Cache-Control": "no-store", **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: HTTPStatus, payload: Any) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _static(self, name: str, set_cookie: bool = False) -> None:
        path = self.app.static.get(name)
        if path is None or path.suffix not in STATIC_TYPES:
            raise HttpError(HTTPStatus.NOT_FOUND, f"no file {name}")
        headers = {"Content-Security-Policy": PAGE_POLICY}
        if set_cookie and self.app.token is not None:  # the token was checked: later requests carry the cookie
            headers["Set-Cookie"] = f"{TOKEN_COOKIE}={self.app.token}; HttpOnly; SameSite=Strict; Path=/"
        self._send(HTTPStatus.OK, path.read_bytes(), STATIC_TYPES[path.suffix], headers)

    def _events(self, job_number: int | None) -> None:
        """Server-Sent Events: job snapshots as they change; with ``job_number`` only that job's, until it ends."""
        events = self.app.jobs.events
        listener = events.listen()  # before the first snapshots, so that no change falls between
        try:
            if job_number is not None:
                current = [self._job(job_number)]
            else:
                current = self.app.jobs.active()
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            for job in current:
                self._event({"type": "job", "job": job.snapshot()})
            if job_number is not None and current[0].finished:
                return
            while True:
                try:
                    event = listener.get(timeout=KEEPALIVE_SECONDS)
                except queue.Empty:
                    self.wfile.write(b": keep-alive\n\n")
                    self.wfile.flush()
                    continue
                if event is None:
                    return
                if job_number is not None and event["job"]["id"] != job_number:
                    continue
                self._event(event)
                if job_number is not None and event["job"]["status"] in FINISHED:
                    return
        finally:
            events.forget(listener)

    def _event(self, event: dict[str, Any]) -> None:
        self.wfile.write(f"event: {event['type']}\ndata: {json.dumps(event['job'])}\n\n".encode())
        self.wfile.flush()
