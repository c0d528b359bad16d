"""The CPU-safe parts of the GPU machine's tools: cgroup set-up and reading, and the OOM demo's refusal."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


limited = tool("memory_limited_bench")

V2_STAT = "anon 104857600\nfile 524288000\nfile_mapped 209715200\nshmem 0\n"


def test_memory_stat_and_own_cgroup_are_read() -> None:
    assert limited.parse_memory_stat(V2_STAT)["file_mapped"] == 209715200
    proc = "4:memory:/jobs/a\n1:cpu:/\n0::/user.slice/me.scope\n"
    assert limited.own_cgroup(proc, 2) == "/user.slice/me.scope"
    assert limited.own_cgroup(proc, 1) == "/jobs/a"
    with pytest.raises(OSError, match="no cgroup v2 entry"):
        limited.own_cgroup("4:memory:/jobs/a\n", 2)


def fake_v2_root(root: Path) -> Path:
    """A cgroup v2 hierarchy's files as the kernel shows them (controllers, subtree control)."""
    parent = root / "user.slice"
    parent.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    (parent / "cgroup.subtree_control").write_text("cpu\n")
    return parent


def test_a_v2_child_gets_the_limit_and_the_process(tmp_path: Path) -> None:
    parent = fake_v2_root(tmp_path)
    run = limited.Run(8, "nf4-mmap", None, [sys.executable, "-c", "pass"])

    def launch(command, preexec_fn):
        group = parent / next(p.name for p in parent.iterdir() if p.is_dir())
        (group / "memory.stat").write_text(V2_STAT)
        (group / "memory.peak").write_text("734003200\n")
        (group / "memory.events").write_text("oom 0\noom_kill 0\n")
        return subprocess.Popen(command, preexec_fn=preexec_fn)

    limited.run_limited(run, tmp_path, "0::/user.slice\n", launch)
    assert run.mechanism == "cgroup v2" and run.returncode == 0 and not run.problems
    assert (parent / "cgroup.subtree_control").read_text() == "+memory"
    group = next(p for p in parent.iterdir() if p.is_dir())
    assert (group / "memory.max").read_text() == str(8 << 30)
    assert (group / "cgroup.procs").read_text().isdigit()  # the child wrote its pid before exec
    assert run.group_peak_bytes == 734003200 and run.oom_kills == 0
    assert run.file_peak_bytes == 524288000 and run.anon_peak_bytes == 104857600


def test_a_v1_memory_group_reads_its_own_names(tmp_path: Path) -> None:
    (tmp_path / "memory" / "jobs").mkdir(parents=True)
    group = limited.make_cgroup(tmp_path, "4:memory:/jobs\n", "g", 16 << 30)
    assert group.mechanism == "cgroup v1" and (group.path / "memory.limit_in_bytes").read_text() == str(16 << 30)
    (group.path / "memory.stat").write_text("rss 5\ncache 7\nmapped_file 3\n")
    (group.path / "memory.max_usage_in_bytes").write_text("12\n")
    assert group.stat()["anon"] == 5 and group.stat()["file"] == 7 and group.number("memory.peak") == 12


def test_without_a_cgroup_systemd_run_is_tried_and_failures_are_reported(tmp_path: Path) -> None:
    run = limited.Run(8, "nf4-mmap", None, [sys.executable, "-c", "pass"])
    launched: list[list[str]] = []

    def launch(command, preexec_fn):
        launched.append(command)
        process = subprocess.Popen([sys.executable, "-c", "pass"])  # stands in for a scope that never appears
        process.wait()
        return process

    limited.run_limited(run, tmp_path / "absent", "0::/\n", launch)
    assert run.mechanism is None and run.problems[0].startswith("cgroup: ")
    if launched:  # systemd-run is installed here
        assert launched[0][:2] == ["systemd-run", "--scope"] and "MemoryMax=8589934592" in launched[0]
        assert "scope's cgroup could not be found" in run.problems[1]
    else:
        assert run.problems[1] == "systemd-run: not installed"


def test_the_cache_folders_filesystem_is_found_and_the_bench_runs_the_profile_alone(tmp_path: Path) -> None:
    tmp_path = tmp_path.resolve()
    (tmp_path / "cache").mkdir()
    folder = tmp_path / "cache" / "synthetic"  # not made yet: its nearest existing parent counts
    mounts = (
        "/dev/sda1 / ext4 rw 0 0\n"
        f"tmpfs {tmp_path} tmpfs rw 0 0\n"
        f"/dev/sdb1 {tmp_path}/cache xfs rw 0 0\n"
        f"/dev/sdc1 {tmp_path}/cache-other ext4 rw 0 0\n"
    )
    assert limited.filesystem_type(folder, mounts) == "xfs"
    assert limited.filesystem_type(tmp_path / "elsewhere", mounts) == "tmpfs"
    assert limited.filesystem_type(Path("/"), mounts) == "ext4"
    assert limited.filesystem_type(folder, mounts + f"tmpfs {tmp_path}/cache tmpfs rw 0 0\n") == "tmpfs"  # mounted over

    args = limited.argparse.Namespace(vram_budget="8GiB", steps=2, compile="auto", cache_dir=None)
    command = limited.bench_command("nf4-mmap", args, tmp_path / "b.json")
    assert "--no-resident-reference" in command and "--cache-dir" not in command
    args.cache_dir = folder
    assert limited.bench_command("nf4-mmap", args, tmp_path / "b.json")[-2:] == ["--cache-dir", str(folder)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the demo runs whole and writes its committed log")
def test_the_oom_demo_needs_cuda() -> None:
    done = subprocess.run([sys.executable, str(TOOLS / "oom_retry_demo.py")], capture_output=True, text=True)
    if "CUDA" in done.stderr:
        assert done.returncode == 1 and done.stderr.count("\n") == 1
