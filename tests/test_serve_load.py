"""`serve --demo` as a user starts it, under load: 5 clients, 20 edits, every result delivered, memory flat
after the queue drains, and Ctrl-C stopping it cleanly."""

import io
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
from PIL import Image

from lowvram_kontext.demo import demo_image
from lowvram_kontext.server.client import PageClient

from .page_server import png_bytes

CLIENTS = 5
EDITS_PER_CLIENT = 4
# What the process may grow by over the 20 edits once warm (measured: under 1 MiB). A leak of the
# edits' tensors, images or per-job state on this ~400 MiB process would pass it.
RSS_SLACK = 16 * 2**20


def _round(url: str, edits: int) -> list[dict]:
    """Every client uploads its own picture, then chains ``edits`` edits, each from its previous result."""
    results: list[list[dict]] = [[] for _ in range(CLIENTS)]

    def client_work(number: int) -> None:
        client = PageClient(url)
        image = client.upload(png_bytes(demo_image(32 + 16 * number)), f"client{number}.png")["id"]
        for k in range(edits):
            final = client.wait(client.edit(image, f"client {number} edit {k}")["id"])
            results[number].append(final)
            if final["status"] == "done":
                image = final["result"]
                Image.open(io.BytesIO(client.image(image))).verify()

    threads = [threading.Thread(target=client_work, args=(n,)) for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [r for per_client in results for r in per_client]


@pytest.mark.slow
def test_five_clients_twenty_edits_every_result_delivered_memory_flat(tmp_path: Path) -> None:
    argv = ["serve", "--demo", "--port", "0", "--out-dir", str(tmp_path), "--quiet"]
    small = ["--width", "32", "--height", "32", "--steps", "2", "--device", "cpu"]
    server = subprocess.Popen(
        [sys.executable, "-m", "lowvram_kontext", *argv, *small],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = server.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), server.stderr.read()
        process = psutil.Process(server.pid)
        warm = _round(url, 1)  # loads the model; every later round does the same work on it
        assert all(r["status"] == "done" for r in warm)
        settled = process.memory_info().rss

        finals = _round(url, EDITS_PER_CLIENT)
        assert len(finals) == CLIENTS * EDITS_PER_CLIENT == 20
        assert all(r["status"] == "done" for r in finals), [r["error"] for r in finals]
        history = PageClient(url).history()
        assert sum(e["kind"] == "result" for e in history) == 25
        assert process.memory_info().rss - settled < RSS_SLACK

        server.send_signal(signal.SIGINT)  # Ctrl-C
        assert server.wait() == 0
        err = server.stderr.read()
        assert err.rstrip().endswith("stopped") and "Traceback" not in err
        folder = next(p for p in tmp_path.iterdir() if p.is_dir())
        assert len(list(folder.glob("*.png"))) == 25 and not list(folder.rglob(".*partial"))
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
