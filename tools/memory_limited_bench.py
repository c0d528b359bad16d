"""Run the benchmark's whole edit inside a real host-memory limit and record what the process used.

For each limit (8, 16 and 32 GiB by default) the bench runs in a child process confined by a
memory cgroup: a cgroup v2 child of this process's cgroup (``memory.max``, swap off), else a cgroup
v1 memory group (``memory.limit_in_bytes``), else a ``systemd-run --scope -p MemoryMax=`` scope.
The kernel reclaims page cache inside the limit and kills the process when anonymous memory does
not fit, so a completed run proves the profile fits the host size. While it runs, the group's
``memory.stat`` is sampled: the peaks of anonymous memory (the process's own) and of page cache
(file pages: the mmap tier's weights, files read), with the group's own peak and OOM kills after.
Everything goes to one JSON file, next to each run's bench JSON. The bench runs the profile alone
(no resident reference row before it: that would only add its own memory to the run).

    PYTHONPATH=. python tools/memory_limited_bench.py --vram-budget 8GiB --out bench/results/memory-limited

The cache folder (``--cache-dir``: the synthetic weights, and the mmap tier's block files) should be
on a disk: on tmpfs the block files are shared memory, which the kernel cannot drop without swap.
The tool records the folder's filesystem type and says so when it is tmpfs.

Profiles by limit (``--profiles 8=nf4-mmap,16=nf4-stream-lowram,32=nf4-stream``) are those the planner
picks for such hosts. Creating cgroups needs root or a delegated cgroup; when no mechanism works the
tool says which were tried and why they failed, and exits 1.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lowvram_kontext.paths import cache_dir

GIB = 1 << 30
CGROUP_ROOT = Path("/sys/fs/cgroup")
DEFAULT_PROFILES = {8: "nf4-mmap", 16: "nf4-stream-lowram", 32: "nf4-stream"}
SAMPLE_INTERVAL_S = 0.2


def parse_memory_stat(text: str) -> dict[str, int]:
    """``memory.stat`` as a dict (v1 and v2 both write "name value" lines)."""
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[name] = int(value)
    return out


def own_cgroup(proc_cgroup: str, version: int) -> str:
    """This process's cgroup path from ``/proc/self/cgroup``: the v2 line ("0::/path"), or v1 memory's."""
    for line in proc_cgroup.splitlines():
        number, controllers, path = line.split(":", 2)
        if (version == 2 and number == "0" and controllers == "") or (
            version == 1 and "memory" in controllers.split(",")
        ):
            return path
    raise OSError(f"no cgroup v{version} entry in /proc/self/cgroup")


@dataclass
class Group:
    """A memory cgroup the bench runs in: where its files are, and how it was made."""

    mechanism: str
    path: Path
    version: int

    def read(self, name: str) -> str:
        v1 = {"memory.peak": "memory.max_usage_in_bytes", "memory.current": "memory.usage_in_bytes"}
        file = v1.get(name, name) if self.version == 1 else name
        try:
            return (self.path / file).read_text()
        except OSError:
            return ""

    def number(self, name: str) -> int | None:
        text = self.read(name).strip()
        return int(text) if text.isdigit() else None

    def stat(self) -> dict[str, int]:
        stat = parse_memory_stat(self.read("memory.stat"))
        if self.version == 1:  # v1 names the same figures differently
            stat.setdefault("anon", stat.get("rss", 0))
            stat.setdefault("file", stat.get("cache", 0))
            stat.setdefault("file_mapped", stat.get("mapped_file", 0))
        return stat

    def oom_kills(self) -> int | None:
        if self.version == 1:
            return parse_memory_stat(self.read("memory.oom_control")).get("oom_kill")
        return parse_memory_stat(self.read("memory.events")).get("oom_kill")


def enable_memory_controller(parent: Path) -> None:
    """Let ``parent``'s children have memory limits. cgroup v2 refuses that (EBUSY) while ``parent``
    itself holds processes (its root excepted), so they move first into a leaf child of their own."""
    try:
        (parent / "cgroup.subtree_control").write_text("+memory")
        return
    except OSError as error:
        if error.errno != errno.EBUSY:
            raise
    leaf = parent / "lowvram-kontext-others"
    leaf.mkdir(exist_ok=True)
    for pid in (parent / "cgroup.procs").read_text().split():
        try:
            (leaf / "cgroup.procs").write_text(pid)
        except OSError:
            pass  # a process that ended meanwhile, or a kernel thread that cannot move
    (parent / "cgroup.subtree_control").write_text("+memory")


def make_cgroup(root: Path, proc_cgroup: str, name: str, limit: int) -> Group:
    """A fresh child cgroup ``name`` limited to ``limit`` bytes (v2 if the root is unified, else v1 memory)."""
    if (root / "cgroup.controllers").exists():
        parent = root / own_cgroup(proc_cgroup, 2).lstrip("/")
        if "memory" not in (parent / "cgroup.subtree_control").read_text().split():
            enable_memory_controller(parent)
        group = Group("cgroup v2", parent / name, 2)
        group.path.mkdir(exist_ok=True)
        (group.path / "memory.max").write_text(str(limit))
        if (group.path / "memory.swap.max").exists():
            (group.path / "memory.swap.max").write_text("0")
        return group
    parent = root / "memory" / own_cgroup(proc_cgroup, 1).lstrip("/")
    group = Group("cgroup v1", parent / name, 1)
    group.path.mkdir(exist_ok=True)
    (group.path / "memory.limit_in_bytes").write_text(str(limit))
    if (group.path / "memory.memsw.limit_in_bytes").exists():
        (group.path / "memory.memsw.limit_in_bytes").write_text(str(limit))
    return group


def systemd_scope_command(limit: int, command: list[str]) -> list[str]:
    return ["systemd-run", "--scope", "--quiet", "-p", f"MemoryMax={limit}", "-p", "MemorySwapMax=0", "--", *command]


@dataclass
class Run:
    limit_gib: int
    profile: str
    mechanism: str | None
    command: list[str]
    returncode: int | None = None
    seconds: float | None = None
    group_peak_bytes: int | None = None  # the cgroup's own peak: anonymous memory and page cache
    anon_peak_bytes: int | None = None
    file_peak_bytes: int | None = None  # page cache charged to the group
    file_mapped_peak_bytes: int | None = None
    oom_kills: int | None = None
    cache_dir: str | None = None  # the bench's cache folder: synthetic weights, the mmap tier's block files
    cache_filesystem: str | None = None  # its filesystem type ("tmpfs": block files cannot be dropped)
    bench: dict = field(default_factory=dict)  # the bench row: completed, error, host_ram_peak_bytes, s/step
    problems: list[str] = field(default_factory=list)

    @property
    def within_limit(self) -> bool | None:
        rss = self.bench.get("host_ram_peak_bytes")
        return None if rss is None else bool(self.bench.get("completed")) and rss <= self.limit_gib * GIB


def sample(group: Group, run: Run, done: threading.Event) -> None:
    """Peaks of the group's anonymous, file and mapped-file bytes until ``done``."""
    while not done.is_set():
        stat = group.stat()
        for key, name in (("anon", "anon_peak_bytes"), ("file", "file_peak_bytes")) + (
            ("file_mapped", "file_mapped_peak_bytes"),
        ):
            if key in stat:
                setattr(run, name, max(getattr(run, name) or 0, stat[key]))
        done.wait(SAMPLE_INTERVAL_S)


def run_limited(
    run: Run, root: Path, proc_cgroup: str, launch: Callable[..., subprocess.Popen] = subprocess.Popen
) -> None:
    """Run ``run.command`` inside a memory limit, filling ``run``; ``run.problems`` says what did not work."""
    limit = run.limit_gib * GIB
    group = None
    try:
        group = make_cgroup(root, proc_cgroup, f"lowvram-kontext-{run.limit_gib}gib-{os.getpid()}", limit)
    except (OSError, ValueError) as error:
        run.problems.append(f"cgroup: {error}")
    command = run.command
    if group is None:
        if shutil.which("systemd-run") is None:
            run.problems.append("systemd-run: not installed")
            return
        command = systemd_scope_command(limit, command)
    started = time.perf_counter()
    procs = None if group is None else group.path / "cgroup.procs"
    # The child joins the group before it execs, so everything it allocates is charged there.
    process = launch(command, preexec_fn=(lambda: procs.write_text(str(os.getpid()))) if procs else None)
    if group is None:  # the scope's cgroup is known once systemd-run has moved the process
        group = scope_group(process.pid, root)
        if group is None:
            process.wait()
            run.problems.append("systemd-run: the scope's cgroup could not be found (no systemd, or not allowed)")
            run.returncode = process.returncode
            return
    run.mechanism = group.mechanism
    done = threading.Event()
    sampler = threading.Thread(target=sample, args=(group, run, done), daemon=True)
    sampler.start()
    run.returncode = process.wait()
    done.set()
    sampler.join()
    run.seconds = time.perf_counter() - started
    run.group_peak_bytes = group.number("memory.peak")
    run.oom_kills = group.oom_kills()
    if group.mechanism != "systemd-run scope":
        try:
            group.path.rmdir()
        except OSError:
            pass  # still busy: the kernel removes nothing; left for the next run's fresh name


def scope_group(pid: int, root: Path) -> Group | None:
    """The cgroup v2 scope systemd-run put ``pid`` in, waited for briefly."""
    for _ in range(50):
        try:
            text = Path(f"/proc/{pid}/cgroup").read_text()
        except OSError:
            return None
        path = own_cgroup(text, 2)
        if path.endswith(".scope"):
            return Group("systemd-run scope", root / path.lstrip("/"), 2)
        time.sleep(0.1)
    return None


def bench_command(profile: str, args: argparse.Namespace, out: Path) -> list[str]:
    """The bench run of ``profile`` alone (no resident reference before it), in ``args.cache_dir`` if given."""
    cache = [] if args.cache_dir is None else ["--cache-dir", str(args.cache_dir)]
    return [
        sys.executable, "-m", "lowvram_kontext", "bench", "--synthetic", "--profiles", profile,
        "--no-resident-reference", "--vram-budget", args.vram_budget, "--steps", str(args.steps), "--warmup", "1",
        "--compile", args.compile, "--json", str(out), *cache,
    ]  # fmt: skip


def filesystem_type(path: Path, mounts: str) -> str | None:
    """The type of the filesystem holding ``path`` (or its nearest existing parent), from the text of
    ``/proc/mounts``: the last mount on the longest mount point that contains it."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    where = str(path.resolve())
    longest, kind = -1, None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = where == point or where.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= longest:
            longest, kind = len(point), fields[2]
    return kind


def read_bench_row(path: Path) -> dict:
    """The asked profile's row of a bench JSON file (the last: a resident twin may come first)."""
    try:
        rows = json.loads(path.read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return {}
    row = rows[-1] if rows else {}
    keys = ("profile", "completed", "error", "host_ram_peak_bytes", "seconds_per_step", "dequant_route", "dtype")
    return {k: row.get(k) for k in keys}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limits", default="8,16,32", help="host memory limits in GiB (default 8,16,32)")
    parser.add_argument(
        "--profiles",
        help="LIMIT=PROFILE pairs (default: 8=nf4-mmap,16=nf4-stream-lowram,32=nf4-stream)",
    )
    parser.add_argument("--vram-budget", default="8GiB")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("bench/results/memory-limited"))
    parser.add_argument(
        "--cache-dir",
        type=Path,
        help="the bench's cache folder: its synthetic weights and the mmap tier's block files; put it on a disk, "
        "not tmpfs (default: the bench's own, the cache folder's synthetic/)",
    )
    parser.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="the bench's --compile; off leaves out the compiler's working set and worker processes (default auto)",
    )
    args = parser.parse_args(argv)
    profiles = dict(DEFAULT_PROFILES)
    for pair in (args.profiles or "").split(","):
        if pair.strip():
            limit, _, name = pair.partition("=")
            profiles[int(limit)] = name.strip()
    args.out.mkdir(parents=True, exist_ok=True)
    proc_cgroup = Path("/proc/self/cgroup").read_text()
    cache = args.cache_dir if args.cache_dir is not None else cache_dir() / "synthetic"
    try:
        filesystem = filesystem_type(cache, Path("/proc/mounts").read_text())
    except OSError:
        filesystem = None
    print(f"cache folder {cache}: {filesystem or 'filesystem unknown'}", file=sys.stderr)
    if filesystem == "tmpfs":
        print(
            "warning: the cache folder is on tmpfs: the mmap tier's block files there are shared memory, which "
            "the kernel cannot drop without swap; pass --cache-dir on a disk",
            file=sys.stderr,
        )
    runs = []
    for limit in (int(x) for x in args.limits.split(",")):
        profile = profiles.get(limit, DEFAULT_PROFILES[32])
        bench_json = args.out / f"bench-{limit}gib-{profile}.json"
        command = bench_command(profile, args, bench_json)
        run = Run(limit, profile, None, command, cache_dir=str(cache), cache_filesystem=filesystem)
        print(f"{limit} GiB: {profile} ...", file=sys.stderr, flush=True)
        run_limited(run, CGROUP_ROOT, proc_cgroup)
        run.bench = read_bench_row(bench_json)
        runs.append(run)
        if run.mechanism is None:
            print(f"error: no memory limit could be set up: {'; '.join(run.problems)}", file=sys.stderr)
            return 1
        print(
            f"{limit} GiB ({run.mechanism}): {profile} returned {run.returncode}, process RSS peak "
            f"{(run.bench.get('host_ram_peak_bytes') or 0) / GIB:.2f} GiB, group peak "
            f"{(run.group_peak_bytes or 0) / GIB:.2f} GiB (page cache up to {(run.file_peak_bytes or 0) / GIB:.2f}),"
            f" OOM kills {run.oom_kills}",
            file=sys.stderr,
        )
    summary = args.out / "memory-limited.json"
    summary.write_text(json.dumps([{**asdict(r), "within_limit": r.within_limit} for r in runs], indent=2) + "\n")
    print(f"written {summary}", file=sys.stderr)
    return 0 if all(r.within_limit for r in runs) else 2


if __name__ == "__main__":
    sys.exit(main())
