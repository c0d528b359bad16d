"""Running `serve` inside the test process, and following its event stream; shared by the page's tests."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from lowvram_kontext import cli
from lowvram_kontext.commands.serve import page_server
from lowvram_kontext.demo import demo_image
from lowvram_kontext.server.client import FINISHED, PageClient
from lowvram_kontext.server.http import PageServer
from lowvram_kontext.tiny import TinyWeights
from lowvram_kontext.weights.safetensors_file import save_safetensors

from .test_lora import kohya

# Tiny edits: 32x32 pixels, two steps, on the CPU in float32.
SMALL = ["--width", "32", "--height", "32", "--steps", "2", "--seed", "3", "--device", "cpu", "--dtype", "float32"]


def serve_argv(tiny_root: Path, folder: Path, *extra: str) -> list[str]:
    """`serve` on the tiny model, with its outputs and prompt cache under ``folder``."""
    model = ["--model", str(tiny_root / "diffusers")]
    where = ["--out-dir", str(folder / "out"), "--prompt-cache", str(folder / "prompts"), "--port", "0", "--quiet"]
    return ["serve", *model, *where, *SMALL, *extra]


@contextmanager
def running(argv: list[str]) -> Iterator[PageServer]:
    """The server of ``argv`` answering on a thread; stopped and freed when the block ends."""
    with page_server(cli.build_parser().parse_args(argv)) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield server
        finally:
            server.shutdown()
            thread.join()


def write_lora(weights: TinyWeights, path: Path) -> Path:
    """A kohya LoRA of the tiny model (CLIP and the transformer's blocks) at ``path``; named by its stem."""
    save_safetensors(kohya(weights.clip_config, torch.Generator().manual_seed(5)), path)
    return path


def client_of(server: PageServer) -> PageClient:
    return PageClient(server.url, server.app.token)


def png_bytes(image: Image.Image | None = None) -> bytes:
    buffer = io.BytesIO()
    (image or demo_image(32)).save(buffer, format="PNG")
    return buffer.getvalue()


class Recorder:
    """Every event of the server's stream, in order, gathered on a thread from before the first request."""

    def __init__(self, client: PageClient):
        self.events: list[dict[str, Any]] = []
        self._arrived = threading.Condition()
        opened = threading.Event()
        thread = threading.Thread(target=self._read, args=(client, opened.set), daemon=True)
        thread.start()
        opened.wait()

    def _read(self, client: PageClient, on_open: Any) -> None:
        for event in client.events(on_open=on_open):
            with self._arrived:
                self.events.append(event)
                self._arrived.notify_all()

    def of(self, job: int) -> list[dict[str, Any]]:
        """The states of ``job`` seen, waiting until the last one (finished) has arrived."""
        with self._arrived:
            self._arrived.wait_for(lambda: any(e["id"] == job and e["status"] in FINISHED for e in self.events))
            return [e for e in self.events if e["id"] == job]
