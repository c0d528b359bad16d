"""`serve`: a local web page for editing step by step, on one pipeline loaded and planned once."""

from __future__ import annotations

import argparse
import ipaddress
import secrets
import sys
import threading
import webbrowser
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

from .. import __version__, demo, workflow
from ..errors import KontextError
from ..lora import LoraSpec
from ..sampling import PREFERRED_RESOLUTIONS
from ..server.editing import Defaults, JobProgress, PageEditor
from ..server.gallery import Gallery, session_folder
from ..server.http import MAX_LORA_STRENGTH, PageApp, PageServer
from ..server.jobs import Events, JobQueue
from .edit import compute_device, open_pipeline, start, use_demo
from .options import add_edit_options

DEFAULT_PORT = 8484
DEFAULT_OUT_DIR = Path("kontext-outputs")


def register(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve",
        help="a web page on this machine for editing step by step, the model kept loaded between edits",
        description="Loads the model once and serves a page: upload, instruct, edit, continue from any result.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free)")
    serve.add_argument(
        "--token",
        nargs="?",
        const="",
        help="a secret every request must carry; required to listen beyond this machine (no value: make one)",
    )
    serve.add_argument("--open", action="store_true", help="open the page in the web browser")
    serve.add_argument(
        "--out-dir",
        type=Path,
        default=DEFAULT_OUT_DIR,
        help=f"where each run's uploads and results go, in a folder of their own (default: ./{DEFAULT_OUT_DIR})",
    )
    serve.add_argument("--demo", action="store_true", help="run on a tiny built-in model with RANDOM weights")
    add_edit_options(serve)
    serve.set_defaults(run=run)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _token(args: argparse.Namespace) -> str | None:
    """The token requests must carry: the one given, a new one for a bare --token, else none (localhost only)."""
    if args.token is None:
        if not _is_loopback(args.host):
            raise KontextError(
                f"--host {args.host} listens beyond this machine: add --token SECRET (or a bare --token to make one)"
            )
        return None
    return args.token or secrets.token_urlsafe(18)


def planned_size(args: argparse.Namespace) -> tuple[int, int]:
    """The output size the memory plan is made for: the largest an edit may ask for.

    Kontext's trained resolutions (about a megapixel each), or --width/--height when larger.
    """
    width, height = max(PREFERRED_RESOLUTIONS, key=lambda wh: wh[0] * wh[1])
    asked = (args.width or args.height, args.height or args.width)
    if asked[0] is not None and asked[0] * asked[1] > width * height:
        return asked[0], asked[1]
    return width, height


@contextmanager
def page_server(args: argparse.Namespace) -> Iterator[PageServer]:
    """The server of ``serve``'s options, its pipeline loaded and planned and its queue running; when the
    block ends, the running edit stops at its next step and everything is closed and freed."""
    if not 0 <= args.port <= 65535:
        raise KontextError(f"--port must be from 0 to 65535 (got {args.port})")
    token = _token(args)
    for spec in map(LoraSpec.parse, args.lora):
        if abs(spec.strength) > MAX_LORA_STRENGTH:
            raise KontextError(
                f"--lora {spec.path}: strength {spec.strength:g} is beyond what the page offers "
                f"({-MAX_LORA_STRENGTH:g} to {MAX_LORA_STRENGTH:g})"
            )
    device = compute_device(args)
    progress = JobProgress(quiet=args.quiet, device=device, verbose=args.verbose)
    output_filter = start(args, progress)
    if args.demo:
        use_demo(args, progress)
    gallery = Gallery(session_folder(args.out_dir))
    width, height = planned_size(args)
    plan_args = argparse.Namespace(**{**vars(args), "width": width, "height": height})
    pipeline = open_pipeline(plan_args, Image.new("RGB", (width, height)), progress, device, several=True)
    try:
        loras = {lora.name: lora.strength for lora in pipeline.loras}
        defaults = Defaults(args.steps, args.guidance, args.seed, args.width, args.height, width * height, loras)
        editor = PageEditor(pipeline, progress, gallery, defaults, output_filter)
        jobs = JobQueue(editor.run, Events(), on_idle=editor.settle)
        info = {
            "version": __version__,
            "model": str(args.model or args.transformer),
            "device": str(device),
            "dtype": str(pipeline.dtype).removeprefix("torch."),
            "demo": bool(args.demo),
            "demo_notice": demo.NOTICE if args.demo else None,
            "notice": workflow.NOTICE,
            "filter": args.filter,
        }
        try:
            server = PageServer(args.host, args.port, PageApp(gallery, jobs, editor, token, info))
        except OSError as exc:
            raise KontextError(f"cannot listen on {args.host}:{args.port} ({exc.strerror or exc})") from None
        jobs.start()
        try:
            yield server
        finally:
            jobs.stop()
            jobs.events.close()
            server.server_close()
    finally:
        pipeline.release()


def run(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C."""
    with page_server(args) as server:
        token = server.app.token
        url = server.url + (f"?token={token}" if token else "")
        print(url, flush=True)
        print(f"results go to {server.app.gallery.folder}; Ctrl-C stops", file=sys.stderr, flush=True)
        if args.open:
            threading.Thread(target=webbrowser.open, args=(url,), daemon=True).start()
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            running = any(job.status == "running" for job in server.app.jobs.active())
            print("stopping" + (": the running edit ends at its next step" if running else ""), file=sys.stderr)
    print("stopped", file=sys.stderr, flush=True)
    return 0
