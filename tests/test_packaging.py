"""Every install route carries the whole product: the package list names every package, the profiles
ship inside the wheel, and an installed wheel plans and runs the demo from another folder."""

import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
BUILD_OUTPUTS = ("build", "dist", "*.egg-info", ".venv", ".git", "__pycache__", ".pytest_cache")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_package_list_names_every_package_and_the_profiles() -> None:
    setuptools = _pyproject()["tool"]["setuptools"]
    in_tree = {
        ".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "lowvram_kontext").rglob("__init__.py")
    }
    assert set(setuptools["packages"]) == in_tree | {"lowvram_kontext.profiles"}
    assert setuptools["package-dir"] == {"lowvram_kontext.profiles": "profiles"}
    assert setuptools["package-data"]["lowvram_kontext.profiles"] == ["*.toml"]
    assert list((ROOT / "profiles").glob("*.toml")), "the profiles folder is empty"


@pytest.mark.slow
def test_an_installed_wheel_plans_and_runs_the_demo_from_another_folder(tmp_path: Path) -> None:
    """Built without build isolation and installed without an index (no network); the new environment
    reaches this interpreter's packages (torch...) through a path file, which adds their folder but
    runs none of its own path files, so this checkout's editable install stays out of sight."""
    # From a copy without build outputs, as a fresh clone is: a stale build/ folder would ship its files.
    source = shutil.copytree(ROOT, tmp_path / "source", ignore=shutil.ignore_patterns(*BUILD_OUTPUTS))
    dist = tmp_path / "dist"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(source)]
    subprocess.run(build, check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = dist.glob("lowvram_kontext-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    profiles = sorted(p.name for p in (ROOT / "profiles").glob("*.toml"))
    assert sorted(n.removeprefix("lowvram_kontext/profiles/") for n in names if "/profiles/" in n) == profiles

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    (Path(purelib) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)]
    # Nothing of this checkout on the path ($PYTHONPATH would make pip find it "already installed").
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LOWVRAM_KONTEXT_CACHE": str(tmp_path / "cache")}
    subprocess.run(install, check=True, capture_output=True, env=env)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(python), "-m", "lowvram_kontext", *argv], capture_output=True, text=True,
                              cwd=elsewhere, env=env)  # fmt: skip

    where = subprocess.run([str(python), "-c", "import lowvram_kontext; print(lowvram_kontext.__file__)"],
                           capture_output=True, text=True, cwd=elsewhere, env=env)  # fmt: skip
    assert where.returncode == 0, where.stderr
    assert where.stdout.startswith(str(env_dir)), where.stdout  # the installed copy, not this checkout
    planned = run("plan", "--vram-budget", "8gb")
    assert planned.returncode == 0, planned.stderr
    assert planned.stdout.startswith("VRAM budget 8.00 GiB (8589934592 bytes)")
    demo = run("edit", "--demo", "--steps", "2", "--quiet")
    assert demo.returncode == 0, demo.stderr
    assert (elsewhere / "demo-edited.png").is_file()
