"""What a user installs: the wheel and the sdist carry the napari manifest as a real file, equal
to the repository's napari.yaml, and every module the manifest names exists."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
MANIFEST = (REPO / "napari.yaml").read_bytes()


def test_the_two_manifest_copies_are_identical_real_files():
    pkg = REPO / "src" / "napari_cpgcn" / "napari.yaml"
    assert not pkg.is_symlink() and not (REPO / "napari.yaml").is_symlink()
    assert pkg.read_bytes() == MANIFEST


def test_every_python_name_of_the_manifest_resolves():
    import importlib

    for cmd in yaml.safe_load(MANIFEST)["contributions"]["commands"]:
        module, attr = cmd["python_name"].split(":")
        assert hasattr(importlib.import_module(module), attr), cmd["python_name"]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    code = ("import sys; from setuptools import build_meta as b; "
            f"b.build_sdist({str(out)!r}); b.build_wheel({str(out)!r})")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_wheel_carries_the_manifest(built):
    (wheel,) = built.glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        info = z.getinfo("napari_cpgcn/napari.yaml")
        assert (info.external_attr >> 28) != 0o12  # not a symlink
        assert z.read(info) == MANIFEST
        entry_points = next(n for n in z.namelist() if n.endswith("entry_points.txt"))
        assert "napari_cpgcn:napari.yaml" in z.read(entry_points).decode()
        assert any(n.startswith("napari_cpgcn/data/") for n in z.namelist())


def test_sdist_carries_the_manifest(built):
    (sdist,) = built.glob("*.tar.gz")
    with tarfile.open(sdist) as t:
        members = {m.name.split("/", 1)[1]: m for m in t.getmembers() if "/" in m.name}
        for name in ("napari.yaml", "src/napari_cpgcn/napari.yaml"):
            assert members[name].isfile(), name
            assert t.extractfile(members[name]).read() == MANIFEST
