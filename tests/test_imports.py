"""The core must import without Qt or napari, and the light modules without torch.

Every module of the package outside ``napari_cpgcn._napari`` is core; the list is found by walking
the package, so a new module is checked without being added here. A module that cannot be
imported fails the test (no skips: a missing dependency is a bug in pyproject.toml).
"""

import pkgutil
import subprocess
import sys

import pytest

import napari_cpgcn

#: Modules that must not even import torch (listing a folder, reading images and tables, the CLI's
#: argument parsing, the reader and the layer builders of the napari side).
LIGHT = ["napari_cpgcn", "napari_cpgcn.classes", "napari_cpgcn.events", "napari_cpgcn.io",
         "napari_cpgcn.io.hpa", "napari_cpgcn.io.tables", "napari_cpgcn.io.atomic", "napari_cpgcn.io.masks",
         "napari_cpgcn.io.rle", "napari_cpgcn.io.celltable", "napari_cpgcn.cli", "napari_cpgcn.synth",
         "napari_cpgcn.segmentation", "napari_cpgcn.evaluation.matching", "napari_cpgcn._napari.layers",
         "napari_cpgcn._napari.reader", "napari_cpgcn.batch", "napari_cpgcn.pipeline",
         "napari_cpgcn.profiles.variation", "napari_cpgcn.profiles.embeddings", "napari_cpgcn.profiles.view"]
#: Optional extras (their own dependencies, imported only when used).
EXTRAS = {"napari_cpgcn.batch.dask"}
CORE = sorted(m.name for m in pkgutil.walk_packages(napari_cpgcn.__path__, "napari_cpgcn.")
              if not m.name.startswith("napari_cpgcn._napari") and m.name not in EXTRAS
              and not m.name.endswith("__main__"))  # `python -m` entry points run the CLI
QT = ("qtpy", "PyQt6", "PyQt5", "PySide2", "PySide6", "napari", "magicgui", "superqt", "vispy")


def _imported(module: str) -> set[str]:
    code = (
        f"import importlib, sys; importlib.import_module({module!r}); "
        "print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, f"importing {module} failed:\n{out.stderr[-2000:]}"
    return set(out.stdout.split())


def test_the_walk_finds_the_core():
    assert "napari_cpgcn.pipeline.predictor" in CORE and "napari_cpgcn.training.engine" in CORE
    assert len(CORE) > 40


@pytest.mark.parametrize("module", LIGHT)
def test_light_modules_import_no_qt_no_torch(module):
    mods = _imported(module)
    for heavy in (*QT, "torch"):
        assert heavy not in mods, f"importing {module} imported {heavy}"


def test_core_modules_import_no_qt():
    # one interpreter per module would take a minute; a module that pulls Qt in is named below
    code = (
        "import importlib, sys\n"
        f"qt = {QT!r}\n"
        f"for m in {CORE!r}:\n"
        "    before = set(sys.modules)\n"
        "    importlib.import_module(m)\n"
        "    new = {n.split('.')[0] for n in set(sys.modules) - before}\n"
        "    bad = sorted(new & set(qt))\n"
        "    if bad:\n"
        "        print(m, 'imported', bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout == "", out.stdout
