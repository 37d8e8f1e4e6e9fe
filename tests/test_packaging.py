"""The wheel ships the Hydra configs of ``conf/`` as ``mcl.conf``, and ``mcl-train`` composes from the installed
copy outside the checkout."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_every_config_and_composes_from_them_outside_the_checkout(tmp_path):
    source = tmp_path / "source"  # a copy, so the build leaves nothing behind in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "conf"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", source], check=True)
    (wheel,) = (tmp_path / "dist").glob("mcl-*.whl")
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if name.startswith("mcl/conf/")}
    expected = {f"mcl/conf/{path.relative_to(ROOT / 'conf')}" for path in (ROOT / "conf").rglob("*.yaml")}
    assert expected <= shipped and "mcl/conf/train.yaml" in shipped and len(expected) > 40
    subprocess.run([*pip, "install", "--no-deps", "--target", tmp_path / "site", wheel], check=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # Only the installed copy of mcl is importable: the wheel's folder first, no checkout on the path.
    env = {"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    printed = subprocess.run(
        [sys.executable, "-m", "mcl.train", "--cfg", "job", "preset=official", "levels=2"],
        cwd=elsewhere, env=env, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    assert "levels: 2" in printed and "_target_: mcl.methods.MCL" in printed and "montage_counts: official" in printed
    located = subprocess.run(
        [sys.executable, "-c", "import mcl.configs as c; print(c.CONFIG_DIR)"],
        cwd=elsewhere, env=env, check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    assert Path(located) == tmp_path / "site" / "mcl" / "conf"
