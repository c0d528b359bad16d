"""`serve` through its HTTP API on the tiny model: upload, edit, progress, history, continuing, cancelling,
the queue with several clients, bad uploads and requests, the token, the output filter, LoRA strengths."""

import http.client
import importlib.util
import io
import json
import struct
import threading
import time
import zlib
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

from lowvram_kontext import cli, images
from lowvram_kontext.demo import demo_image
from lowvram_kontext.errors import Cancelled
from lowvram_kontext.pipeline import KontextPipeline
from lowvram_kontext.progress import Progress
from lowvram_kontext.server.client import PageClient, PageError
from lowvram_kontext.server.gallery import DECODED_RESULTS, Gallery, session_folder
from lowvram_kontext.server.http import PageServer
from lowvram_kontext.server.jobs import EditRequest, Events, Job, JobQueue
from lowvram_kontext.tiny import TinyWeights
from lowvram_kontext.weights.model_paths import ModelPaths

from .page_server import SMALL, Recorder, client_of, png_bytes, running, serve_argv, write_lora

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def page(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> PageServer:
    with running(serve_argv(tiny_root, tmp_path_factory.mktemp("serve"))) as server:
        yield server


@pytest.fixture(scope="module")
def guarded(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> PageServer:
    """A server that wants a token and runs an output filter refusing instructions that mention "refuse"."""
    folder = tmp_path_factory.mktemp("guarded")
    check = folder / "check.py"
    check.write_text("def check(image, prompt):\n    return 'not this one' if 'refuse' in prompt else True\n")
    with running(serve_argv(tiny_root, folder, "--token", "s3cret", "--filter", f"{check}:check")) as server:
        yield server


@pytest.fixture(scope="module")
def styled(tiny_files: tuple[Path, TinyWeights], tmp_path_factory: pytest.TempPathFactory) -> PageServer:
    """A server started with one LoRA, ``papercut``, at strength 0.7."""
    root, weights = tiny_files
    folder = tmp_path_factory.mktemp("styled")
    lora = write_lora(weights, folder / "papercut.safetensors")
    with running(serve_argv(root, folder, "--lora", f"{lora}:0.7")) as server:
        yield server


def _pixels(data: bytes | Path) -> np.ndarray:
    source = data if isinstance(data, Path) else io.BytesIO(data)
    return np.asarray(Image.open(source).convert("RGB"), dtype=np.int16)


def test_edit_streams_every_step_and_writes_the_result_with_metadata(page: PageServer) -> None:
    client = client_of(page)
    recorder = Recorder(client)
    upload = client.upload(png_bytes(), "snow man.png")
    assert upload["kind"] == "upload" and (upload["width"], upload["height"]) == (32, 32)

    job = client.edit(upload["id"], "add a hat", steps=3)
    done = client.wait(job["id"])
    assert done["status"] == "done", done["error"]
    states = recorder.of(job["id"])
    assert states[0]["status"] == "queued" and states[-1]["status"] == "done"
    steps_seen = [s["step"] for s in states if s["status"] == "running"]
    assert steps_seen == sorted(steps_seen) and set(steps_seen) == {0, 1, 2, 3}  # every step, in order
    assert all(s["seconds_per_step"] > 0 for s in states if s["step"] > 0)
    stages = [s["stage"] for s in states if s["stage"]]
    assert stages.index("transformer") < stages.index("vae_decode")
    assert done["timings"]["sampling_decode"] > 0

    status, headers, data = client.request("GET", f"/api/images/{done['result']}?download=1")
    assert status == 200 and headers["Content-Type"] == "image/png"
    name = next(e["name"] for e in client.history() if e["id"] == done["result"])
    assert headers["Content-Disposition"] == f'attachment; filename="{name}"'
    with Image.open(io.BytesIO(data)) as png:
        assert png.text["prompt"] == "add a hat" and png.text["seed"] == "3" and png.text["steps"] == "3"
        assert png.text["input"] == "snow man.png" and png.size == (32, 32)
    written = page.app.gallery.folder / name
    assert written.read_bytes() == data  # served from the session's folder, where it stays
    assert not list(page.app.gallery.folder.glob(".*partial"))


def test_continuing_from_an_earlier_result_branches_and_matches_the_command_line(
    page: PageServer, tiny_root: Path, tmp_path: Path
) -> None:
    client = client_of(page)
    upload = client.upload(png_bytes(), "snowman.png")
    hat = client.wait(client.edit(upload["id"], "add a hat")["id"])
    night = client.wait(client.edit(hat["result"], "make it night")["id"])
    snow = client.wait(client.edit(hat["result"], "add snow")["id"])  # back to the first result: a branch

    history = {e["id"]: e for e in client.history()}
    assert history[night["result"]]["parent"] == history[snow["result"]]["parent"] == hat["result"]
    assert history[snow["result"]]["prompts"] == ["add a hat", "add snow"]
    snow_png = client.image(snow["result"])
    with Image.open(io.BytesIO(snow_png)) as png:
        assert png.text["prompt"] == "add snow" and json.loads(png.text["earlier prompts"]) == ["add a hat"]
    assert np.abs(_pixels(snow_png) - _pixels(client.image(night["result"]))).max() > 0

    source = tmp_path / "snowman.png"
    source.write_bytes(png_bytes())
    out = tmp_path / "chain.png"
    argv = ["edit", "--model", str(tiny_root / "diffusers"), "--image", str(source), "--out", str(out)]
    assert cli.main([*argv, "--prompt", "add a hat", "--prompt", "add snow", *SMALL, "--quiet"]) == 0
    assert np.array_equal(_pixels(snow_png), _pixels(tmp_path / "chain-2.png"))


def test_cancel_stops_a_running_edit_at_a_step_and_removes_a_waiting_one(page: PageServer) -> None:
    client = client_of(page)
    upload = client.upload(png_bytes())
    before = set(page.app.gallery.folder.glob("*.png"))
    long = client.edit(upload["id"], "a long edit", steps=500)
    for state in client.events(long["id"]):
        if state["step"] >= 1:
            break
    waiting = client.edit(upload["id"], "never runs")
    assert client.job(waiting["id"])["ahead"] == 1
    assert client.cancel(waiting["id"])["status"] == "cancelled"
    client.cancel(long["id"])

    stopped = client.wait(long["id"])
    assert stopped["status"] == "cancelled" and stopped["step"] < 500 and stopped["result"] is None
    assert client.job(waiting["id"])["step"] == 0
    assert set(page.app.gallery.folder.glob("*.png")) == before  # nothing written
    after = client.wait(client.edit(upload["id"], "after the cancel")["id"])
    assert after["status"] == "done"


def test_a_cancelled_edit_leaves_the_pipeline_as_good_as_new(tiny_root: Path) -> None:
    paths = ModelPaths.resolve(tiny_root / "diffusers")
    cancel = threading.Event()
    pipeline = KontextPipeline(paths, keep_weights=True, progress=Progress(quiet=True, cancel=cancel))
    image = demo_image(32)
    cancel.set()
    with pytest.raises(Cancelled, match="after step 1/4"):
        pipeline.edit(image, "add a hat", steps=4, seed=1, width=32, height=32)
    cancel.clear()
    again = pipeline.edit(image, "add a hat", steps=4, seed=1, width=32, height=32)
    fresh = KontextPipeline(paths).edit(image, "add a hat", steps=4, seed=1, width=32, height=32)
    assert np.array_equal(np.asarray(again), np.asarray(fresh))


def test_queue_runs_one_edit_at_a_time_for_several_clients_and_tells_positions(page: PageServer) -> None:
    first = client_of(page)
    recorder = Recorder(first)
    blocker = first.edit(first.upload(png_bytes())["id"], "keeps the queue busy", steps=40)
    for state in first.events(blocker["id"]):
        if state["status"] == "running":
            break
    finals: dict[int, dict] = {}

    def one_client(number: int) -> None:
        client = client_of(page)
        upload = client.upload(png_bytes(demo_image(32 + 16 * (number % 2))), f"client{number}.png")
        jobs = [client.edit(upload["id"], f"client {number} edit {k}") for k in range(2)]
        for job in jobs:
            finals[job["id"]] = client.wait(job["id"])

    threads = [threading.Thread(target=one_client, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(finals) == 8 and all(f["status"] == "done" for f in finals.values())
    assert len({f["result"] for f in finals.values()}) == 8
    client_jobs = sorted(finals)
    aheads = {j: {s["ahead"] for s in recorder.of(j) if s["status"] == "queued"} for j in client_jobs}
    assert all(1 in aheads[j] or min(aheads[j]) >= 1 for j in client_jobs)  # each waited behind the blocker
    assert max(max(a) for a in aheads.values()) >= 4  # and saw how many were before it
    # One at a time: a job starts running only after the previous one finished.
    running_now = None
    for event in list(recorder.events):
        if event["status"] == "running":
            assert running_now in (None, event["id"])
            running_now = event["id"]
        elif event["status"] in ("done", "failed", "cancelled") and event["id"] == running_now:
            running_now = None


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that announces ``width`` x ``height`` pixels and holds none: decoding it would allocate them."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "data, message",
    [
        (b"hello, this is text", "not an image of a kind the page takes"),
        (png_bytes()[:60], "unreadable PNG image"),
        (_png_header_only(9000, 9000), "9000x9000 pixels is too large"),
        (b"GIF89a" + b"\0" * 20, "unreadable GIF image"),
    ],
    ids=["text", "truncated", "bomb", "damaged"],
)
def test_bad_uploads_are_refused_with_a_reason(page: PageServer, data: bytes, message: str) -> None:
    with pytest.raises(PageError, match=message) as refused:
        client_of(page).upload(data, "bad.png")
    assert refused.value.status == 400


def test_oversized_or_form_uploads_are_refused_before_the_body_is_read(page: PageServer) -> None:
    host, port = page.server_address[:2]
    connection = http.client.HTTPConnection(host, port)
    connection.putrequest("POST", "/api/images")
    connection.putheader("Content-Type", "application/octet-stream")
    connection.putheader("Content-Length", str(10**9))
    connection.endheaders()  # and no body at all: the answer comes from the length alone
    response = connection.getresponse()
    assert response.status == 413 and b"limit" in response.read()
    connection.close()
    status, _, body = client_of(page).request("POST", "/api/images", png_bytes(), {"Content-Type": "text/plain"})
    assert status == 415


@pytest.mark.parametrize(
    "change, message",
    [
        ({"image": 9999}, "no image 9999"),
        ({"prompt": "  "}, "instruction is required"),
        ({"steps": 0}, "steps must be a whole number"),
        ({"steps": 2.5}, "steps must be a whole number"),
        ({"guidance": float("nan")}, "guidance must be a number"),
        ({"guidance": -1}, "guidance must be from 0"),
        ({"seed": 2**64}, "seed must be a whole number"),
        ({"width": 4096, "height": 4096}, "more pixels than this server plans for"),
        ({"width": True}, "width must be a whole number"),
        ({"loras": {"style": 1}}, "no LoRA named 'style' on this server \\(LoRAs: none"),
    ],
)
def test_bad_edit_requests_are_refused_with_a_reason(page: PageServer, change: dict, message: str) -> None:
    client = client_of(page)
    request = {"image": client.upload(png_bytes())["id"], "prompt": "add a hat", **change}
    with pytest.raises(PageError, match=message) as refused:
        client.call("POST", "/api/edits", request)
    assert refused.value.status == 400


def test_a_failed_edit_is_reported_and_the_server_goes_on(page: PageServer) -> None:
    client = client_of(page)
    upload = client.upload(png_bytes())
    failed = client.wait(client.edit(upload["id"], "too tall", width=32, height=None)["id"])
    assert failed["status"] == "done"  # the size follows the image: 32x32
    tall = client.upload(png_bytes(Image.new("RGB", (16, 4000))))
    failed = client.wait(client.edit(tall["id"], "too tall", width=1024, height=None)["id"])
    assert failed["status"] == "failed" and "more pixels than this server plans for" in failed["error"]
    assert client.wait(client.edit(upload["id"], "still serving")["id"])["status"] == "done"


def test_only_the_sessions_own_files_are_served(page: PageServer) -> None:
    client = client_of(page)
    for path in ["/api/images/9999", "/api/images/../../etc/passwd", "/static/http.py", "/static/..%2fhttp.py"]:
        assert client.request("GET", path)[0] == 404, path
    status, headers, body = client.request("GET", "/")
    assert status == 200 and b"<title>lowvram_kontext</title>" in body
    assert "script-src 'self'" in headers["Content-Security-Policy"]


def test_other_sites_and_unknown_host_names_are_refused(page: PageServer) -> None:
    client = client_of(page)
    assert client.request("GET", "/api/config", headers={"Host": "attacker.example:80"})[0] == 403
    assert client.request("GET", "/api/config", headers={"Origin": "http://attacker.example"})[0] == 403
    own = page.url.rstrip("/")
    assert client.request("GET", "/api/config", headers={"Origin": own})[0] == 200


def test_config_and_plan_tell_the_defaults_and_the_memory_plan(page: PageServer) -> None:
    client = client_of(page)
    config = client.call("GET", "/api/config")
    assert config["defaults"] == {"steps": 2, "guidance": 2.5, "seed": 3, "width": 32, "height": 32}
    assert "Non-Commercial License" in config["notice"] and Path(config["out_dir"]).is_dir()
    plan = client.call("GET", "/api/plan")
    assert plan["profile"] is None and "every component is loaded whole" in plan["text"]


def test_every_request_must_carry_the_token(guarded: PageServer) -> None:
    host, port = guarded.server_address[:2]
    base = f"http://{host}:{port}/"
    assert PageClient(base).request("GET", "/api/config")[0] == 401
    assert PageClient(base, "wrong").request("GET", "/api/history")[0] == 401
    assert PageClient(base, "wrong").request("GET", "/api/images/1")[0] == 401
    assert PageClient(base).request("GET", "/api/events")[0] == 401
    assert PageClient(base, "s3cret").request("GET", "/api/config")[0] == 200
    status, headers, _ = PageClient(base).request("GET", "/?token=s3cret")
    assert status == 200 and headers["Set-Cookie"].startswith("kontext_token=s3cret;")
    cookie = {"Cookie": "kontext_token=s3cret"}
    assert PageClient(base).request("GET", "/api/history", headers=cookie)[0] == 200


def test_the_output_filter_refuses_results_and_the_server_goes_on(guarded: PageServer) -> None:
    client = client_of(guarded)
    upload = client.upload(png_bytes())
    refused = client.wait(client.edit(upload["id"], "please refuse this")["id"])
    assert refused["status"] == "failed" and "refused by the output filter: not this one" in refused["error"]
    assert not list(guarded.app.gallery.folder.glob("*.png"))
    assert client.wait(client.edit(upload["id"], "a fine edit")["id"])["status"] == "done"


def test_listening_beyond_this_machine_needs_a_token(
    tiny_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert cli.main([*serve_argv(tiny_root, tmp_path), "--host", "0.0.0.0"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--host 0.0.0.0 listens beyond this machine: add --token" in err
    assert not (tmp_path / "out").exists()  # refused before anything was made


def test_uploads_keep_their_bytes_and_are_read_as_the_command_line_reads_them(page: PageServer) -> None:
    client = client_of(page)
    jpeg = io.BytesIO()
    demo_image(48).save(jpeg, format="JPEG")
    entry = client.upload(jpeg.getvalue(), "photo.jpg")
    assert entry["name"].endswith("-photo.jpg")
    kept = page.app.gallery.folder / "inputs" / entry["name"]
    assert kept.read_bytes() == jpeg.getvalue() == client.image(entry["id"])
    assert images.load_image(kept).size == (48, 48)


def test_each_edit_runs_at_the_lora_strengths_it_asks_for(styled: PageServer, tiny_root: Path, tmp_path: Path) -> None:
    client = client_of(styled)
    (lora,) = client.loras()
    assert lora["name"] == "papercut" and lora["strength"] == 0.7 and lora["rank"] == 4
    assert set(lora["layers"]) == {"transformer", "clip"}
    upload = client.upload(png_bytes(), "snowman.png")
    # Queued together, as from tabs with different sliders: each edit sets its strengths when it runs.
    asked = [{"papercut": 1}, {}, {"papercut": 0}]
    jobs = [client.edit(upload["id"], "add a hat", loras=loras) for loras in asked]
    assert [job["request"]["loras"] for job in jobs] == [{"papercut": 1.0}, {"papercut": 0.7}, {"papercut": 0.0}]
    results = [client.image(client.wait(job["id"])["result"]) for job in jobs]

    path = styled.app.editor.pipeline.loras.get("papercut").path
    for png, strength in zip(results, (1.0, 0.7, 0.0), strict=True):
        with Image.open(io.BytesIO(png)) as image:
            assert json.loads(image.text["loras"]) == [{"file": str(path), "strength": strength}]
    history = {entry["id"]: entry for entry in client.history()}
    assert [history[client.job(job["id"])["result"]]["settings"]["loras"] for job in jobs] == [
        {"papercut": 1.0}, {"papercut": 0.7}, {"papercut": 0.0},
    ]  # fmt: skip

    source = tmp_path / "snowman.png"
    source.write_bytes(png_bytes())
    model = ["--model", str(tiny_root / "diffusers"), "--image", str(source), "--prompt", "add a hat"]
    for name, lora_args in (("one", ["--lora", str(path)]), ("default", ["--lora", f"{path}:0.7"]), ("none", [])):
        assert cli.main(["edit", *model, "--out", str(tmp_path / f"{name}.png"), *lora_args, *SMALL, "--quiet"]) == 0
    assert np.array_equal(_pixels(results[0]), _pixels(tmp_path / "one.png"))
    assert np.array_equal(_pixels(results[1]), _pixels(tmp_path / "default.png"))
    assert np.array_equal(_pixels(results[2]), _pixels(tmp_path / "none.png"))  # strength 0: exactly no LoRA
    assert np.abs(_pixels(results[0]) - _pixels(results[2])).max() > 0


@pytest.mark.parametrize(
    "loras, message",
    [
        ({"papercut": float("nan")}, "the strength of papercut must be a number from -4 to 4"),
        ({"papercut": 4.5}, "the strength of papercut must be a number from -4 to 4"),
        ({"papercut": "1"}, "the strength of papercut must be a number"),
        ({"papercut": True}, "the strength of papercut must be a number"),
        ({"papercut": 1, "other": 1}, "no LoRA named 'other' on this server \\(LoRAs: papercut\\)"),
        ([["papercut", 1]], "loras must map LoRA names to strengths"),
    ],
)
def test_bad_lora_strengths_are_refused_with_a_reason(styled: PageServer, loras: object, message: str) -> None:
    client = client_of(styled)
    request = {"image": client.upload(png_bytes())["id"], "prompt": "add a hat", "loras": loras}
    with pytest.raises(PageError, match=message) as refused:
        client.call("POST", "/api/edits", request)
    assert refused.value.status == 400


def test_a_start_strength_beyond_the_pages_range_is_refused(
    tiny_files: tuple[Path, TinyWeights], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root, weights = tiny_files
    lora = write_lora(weights, tmp_path / "papercut.safetensors")
    assert cli.main([*serve_argv(root, tmp_path), "--lora", f"{lora}:6"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "strength 6 is beyond what the page offers (-4 to 4)" in err
    assert not (tmp_path / "out").exists()


def _gpu_check() -> ModuleType:
    where = importlib.util.spec_from_file_location("serve_gpu_check", ROOT / "tools" / "serve_gpu_check.py")
    module = importlib.util.module_from_spec(where)
    where.loader.exec_module(module)
    return module


def test_an_edits_parts_add_up_to_the_wall_time_a_client_sees(page: PageServer) -> None:
    client = client_of(page)
    upload = client.upload(png_bytes(), "snowman.png")
    sent = time.time()
    done = client.wait(client.edit(upload["id"], "paint every part of it")["id"])  # a new prompt: encoders run
    received = time.time()
    assert done["status"] == "done", done["error"]
    parts = _gpu_check().breakdown(done, sent, received)
    assert sum(parts.values()) == pytest.approx(received - sent)
    timings = done["timings"]
    for stage, seconds in timings["stages"].items():  # every stage is a part of its own
        assert parts[stage] == seconds
    assert {"read the input", "prompt cache", "prepare the image", "write the PNG"} <= set(parts)
    assert any(name.startswith("upload ") for name in parts) and any(name.startswith("park ") for name in parts)
    # What no part names is what remains between them, never time counted twice.
    assert parts["edit: not in a part"] >= 0 and parts["worker: not in a part"] >= -1e-3
    assert timings["first_step"] > 0 and timings["later_steps"] > 0


def test_the_idle_work_waits_for_a_quiet_queue() -> None:
    ran: list[object] = []
    idle, two_done = threading.Event(), threading.Event()

    def run(job: Job) -> None:
        ran.append(job.id)
        job.update(status="done")
        if len(ran) == 2:
            two_done.set()

    def on_idle() -> None:
        ran.append("idle")
        idle.set()

    request = EditRequest(1, "add a hat", seed=0, steps=1, guidance=1.0)
    patient = JobQueue(run, Events(), on_idle=on_idle, idle_seconds=3600)
    patient.start()
    first = patient.submit(request)
    second = patient.submit(request)
    assert two_done.wait(timeout=60)
    patient.stop()
    assert (first.status, second.status) == ("done", "done") and ran == [1, 2]  # one after the other, no idle work

    ran.clear()
    eager = JobQueue(run, Events(), on_idle=on_idle, idle_seconds=0)
    eager.start()
    eager.submit(request)
    assert idle.wait(timeout=60)
    eager.stop()
    assert ran == [1, "idle"]


def test_recent_results_are_kept_decoded_exactly_as_their_files_hold_them(tmp_path: Path) -> None:
    """An edit continuing from a recent result starts from the image kept in memory (no PNG to decode),
    pixel for pixel the file; older ones are read from their files again."""
    gallery = Gallery(session_folder(tmp_path))
    upload = gallery.add_upload(png_bytes(), "snowman.png")
    rng = np.random.default_rng(0)
    made, entries = [], []
    for index in range(DECODED_RESULTS + 1):
        number, path = gallery.result_path(f"edit {index}")
        made.append(Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)))
        images.save_png(made[-1], path, {"prompt": f"edit {index}"})
        entries.append(gallery.add_result(number, path, upload, f"edit {index}", made[-1], {}))
    for entry in entries:
        assert np.array_equal(np.asarray(gallery.image(entry)), np.asarray(images.load_image(entry.path)))
    assert all(gallery.image(entry) is image for entry, image in zip(entries[1:], made[1:], strict=True))
    assert gallery.image(entries[0]) is not made[0]  # beyond the kept ones: read from its file
    assert np.array_equal(np.asarray(gallery.image(upload)), np.asarray(images.load_image(upload.path)))
