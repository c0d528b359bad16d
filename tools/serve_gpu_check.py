"""Does the page add anything to an edit? `serve` on full-size synthetic weights at an emulated 8 GiB card,
three edits in a row through the HTTP API, each continuing from the previous result.

For each edit it records the wall time a client sees (from sending the request to the event saying
the result is written) against the edit's own sampling + decode time (the pipeline's stage times,
as `bench --session` compares them), and where all of it went, in order ("parts"): the request,
the queue, reading the input, each stage, each move of weights between host and device, the
waits for the device, the PNG write, the event's delivery; "unaccounted" is what none of them
names. The first and later sampling steps are given apart: uploads that run beside the first step
show there. The second and third edits are the acceptance: at most 1.05x. The
default prompts follow `bench --session`: the second edit has a new instruction, the third repeats
it (served from the prompt cache).

    python tools/serve_gpu_check.py --json bench/results/serve-8gb.json        # on the GPU machine
    python tools/serve_gpu_check.py --small --device cpu --steps 2 --size 64   # anywhere, tiny model

The synthetic weights are written once, where `bench --synthetic` keeps them.
"""

from __future__ import annotations

import argparse
import io
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lowvram_kontext.demo import demo_image
from lowvram_kontext.paths import cache_dir
from lowvram_kontext.planner import load_profiles
from lowvram_kontext.server.client import PageClient
from lowvram_kontext.synthetic import synthetic_model

ACCEPTED_RATIO = 1.05
PROMPTS = ("Add a red hat to the snowman", "Make it a snowy night", "Make it a snowy night")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="nf4-stream")
    parser.add_argument("--vram-budget", default="8GiB")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--size", type=int, default=1024, help="output width and height")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--small", action="store_true", help="the tiny model instead of the full-size one")
    parser.add_argument("--prompts", nargs=3, default=PROMPTS, metavar="PROMPT")
    parser.add_argument("--cache-dir", type=Path, default=cache_dir() / "synthetic")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    profile = load_profiles()[args.profile]
    paths = synthetic_model(
        args.cache_dir, profile.transformer.format, profile.t5.format, args.small,
        on_write=lambda path: print(f"writing synthetic weights {path} (once)", file=sys.stderr, flush=True),
    )  # fmt: skip
    files = ["--transformer", paths.transformer, "--t5", paths.t5, "--clip", paths.clip, "--vae", paths.vae]
    with tempfile.TemporaryDirectory() as out_dir:
        command = [
            sys.executable, "-m", "lowvram_kontext", "serve", *map(str, files), "--tokenizers", str(paths.tokenizers),
            "--port", "0", "--out-dir", out_dir, "--steps", str(args.steps), "--device", args.device,
            "--width", str(args.size), "--height", str(args.size),
        ]  # fmt: skip
        if args.device != "cpu":
            command += ["--vram-budget", args.vram_budget, "--profile", args.profile]
        log = Path(out_dir) / "serve.log"
        with log.open("w") as stderr:
            server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True)
            try:
                url = server.stdout.readline().strip()
                if not url.startswith("http"):
                    server.wait()
                    print(log.read_text(), file=sys.stderr)
                    return 1
                edits = run_edits(PageClient(url), args.prompts, args.size)
            finally:
                server.send_signal(signal.SIGINT)
                server.wait()
        config = {k: str(v) for k, v in vars(args).items()}
        server_log = log.read_text().splitlines()
    report = {"settings": config, "edits": edits, "accepted_ratio": ACCEPTED_RATIO, "serve_log_tail": server_log[-40:]}
    later = edits[1:]
    report["accepted"] = all(e["ratio"] is not None and e["ratio"] <= ACCEPTED_RATIO for e in later)
    for number, edit in enumerate(edits, 1):
        ratio = f"{edit['ratio']:.3f}x" if edit["ratio"] is not None else "-"
        print(
            f"edit {number}: {edit['wall_s']:.2f} s wall = {ratio} its sampling + decode "
            f"({edit['sampling_decode_s']:.2f} s); text encoders {'ran' if edit['text_encoders_ran'] else 'skipped'}"
        )
        steps = edit["first_step_s"], edit["later_steps_s"]
        if None not in steps:
            print(f"  steps: first {steps[0]:.3f} s, later ones {steps[1]:.3f} s (median)")
        for name, seconds in edit["parts_s"].items():
            print(f"  {seconds:8.3f} s  {name}")
    print("accepted" if report["accepted"] else f"NOT accepted: a later edit above {ACCEPTED_RATIO}x")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["accepted"] else 1


def run_edits(client: PageClient, prompts: list[str], size: int) -> list[dict]:
    """Upload the demo picture, then one edit per prompt, each from the previous result; their timings."""
    picture = io.BytesIO()
    demo_image(size).save(picture, format="PNG")
    image = client.upload(picture.getvalue(), "snowman.png")["id"]
    edits = []
    for prompt in prompts:
        sent = time.time()  # the server's timestamps are time.time() too: one clock on one machine
        job = client.edit(image, prompt, width=size, height=size)
        final = client.wait(job["id"])
        received = time.time()
        if final["status"] != "done":
            raise SystemExit(f"edit {prompt!r} {final['status']}: {final['error'] or final['message']}")
        t = final["timings"]
        sampling_decode = t["sampling_decode"]
        wall = received - sent
        edits.append(
            {
                "prompt": prompt,
                "wall_s": wall,
                "server_edit_s": t["edit"],
                "write_s": t["write"],
                "page_overhead_s": wall - t["edit"] - t["write"],
                "sampling_decode_s": sampling_decode,
                "ratio": wall / sampling_decode if sampling_decode > 0 else None,
                "stage_s": t["stages"],
                "text_encoders_ran": "t5" in t["stages"],
                "first_step_s": t["first_step"],
                "later_steps_s": t["later_steps"],
                "parts_s": breakdown(final, sent, received),
            }
        )
        image = final["result"]
    return edits


def breakdown(final: dict, sent: float, received: float) -> dict[str, float]:
    """Where the wall time of one edit went, in order; the parts add up to ``received - sent``."""
    worker = final["finished_at"] - final["started_at"]
    parts = {"send the request": final["queued_at"] - sent, "queue": final["started_at"] - final["queued_at"]}
    parts.update(final["timings"]["parts"])
    parts["worker: not in a part"] = worker - sum(final["timings"]["parts"].values())
    parts["deliver the event"] = received - final["finished_at"]
    return parts


if __name__ == "__main__":
    raise SystemExit(main())
