"""A small Python client of the page's HTTP API, for scripts (and the tests): upload, edit, follow, fetch.

client = PageClient("http://127.0.0.1:8484/")           # the URL serve printed, token included
image = client.upload(Path("cat.png").read_bytes(), "cat.png")
job = client.wait(client.edit(image["id"], "Add a hat")["id"])
Path("hat.png").write_bytes(client.image(job["result"]))
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

FINISHED = ("done", "failed", "cancelled")


class PageError(Exception):
    """The server answered with an error status; ``message`` is its one line."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class PageClient:
    def __init__(self, url: str, token: str | None = None):
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.token = token if token is not None else parse_qs(parts.query).get("token", [None])[-1]

    def _connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port)

    def _headers(self, extra: dict[str, str] | None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return {**headers, **(extra or {})}

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) of one request; any status is returned, none raised."""
        connection = self._connection()
        try:
            connection.request(method, path, body=body, headers=self._headers(headers))
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def call(self, method: str, path: str, payload: Any = None) -> Any:
        """A JSON request's JSON answer; an error status raises PageError."""
        body = None if method == "GET" else json.dumps(payload if payload is not None else {}).encode()
        status, _, data = self.request(method, path, body, {"Content-Type": "application/json"} if body else None)
        return _answer(status, data)

    def upload(self, data: bytes, filename: str = "") -> dict[str, Any]:
        """Send an image (its file's bytes); the gallery entry it became."""
        headers = {"Content-Type": "application/octet-stream", "X-Filename": quote(filename)}
        status, _, body = self.request("POST", "/api/images", data, headers)
        return _answer(status, body)

    def edit(self, image: int, prompt: str, **settings: Any) -> dict[str, Any]:
        """Queue an edit of gallery image ``image``; settings: seed, steps, guidance, width, height, and
        loras (strengths by LoRA name; a LoRA left out keeps the strength `serve` started it with)."""
        return self.call("POST", "/api/edits", {"image": image, "prompt": prompt, **settings})

    def cancel(self, job: int) -> dict[str, Any]:
        return self.call("POST", f"/api/jobs/{job}/cancel")

    def job(self, job: int) -> dict[str, Any]:
        return self.call("GET", f"/api/jobs/{job}")

    def loras(self) -> list[dict[str, Any]]:
        """The server's LoRAs: name, file, strength (when an edit leaves it out), rank, layers per component."""
        return self.call("GET", "/api/loras")["loras"]

    def history(self) -> list[dict[str, Any]]:
        return self.call("GET", "/api/history")["images"]

    def image(self, number: int, download: bool = False) -> bytes:
        status, _, data = self.request("GET", f"/api/images/{number}" + ("?download=1" if download else ""))
        if status != 200:
            _answer(status, data)
        return data

    def events(self, job: int | None = None, on_open: Callable[[], None] | None = None) -> Iterator[dict[str, Any]]:
        """Job snapshots as the server sends them; for one ``job`` the stream ends when it finishes.

        ``on_open`` is called once the server listens for this stream: no later change is missed.
        """
        connection = self._connection()
        try:
            path = "/api/events" + (f"?job={job}" if job is not None else "")
            connection.request("GET", path, headers=self._headers(None))
            response = connection.getresponse()
            if response.status != 200:
                _answer(response.status, response.read())
            if on_open is not None:
                on_open()
            data: list[str] = []
            for raw in response:
                line = raw.decode().rstrip("\r\n")
                if line.startswith("data:"):
                    data.append(line[5:].strip())
                elif not line and data:
                    yield json.loads("\n".join(data))
                    data = []
        finally:
            connection.close()

    def wait(self, job: int) -> dict[str, Any]:
        """The job's final state, once it is done, failed or cancelled."""
        last = None
        for last in self.events(job):
            if last["status"] in FINISHED:
                return last
        raise PageError(0, f"the event stream of job {job} ended before the job did (last state: {last})")


def _answer(status: int, data: bytes) -> Any:
    try:
        body = json.loads(data) if data else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        body = {"error": data[:200].decode(errors="replace")}
    if status >= 400:
        raise PageError(status, body.get("error", "") if isinstance(body, dict) else str(body))
    return body
