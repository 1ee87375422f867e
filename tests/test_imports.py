"""The core must import without Qt, napari or (for the light modules) torch."""

import subprocess
import sys

import pytest

LIGHT = ["napari_cpgcn", "napari_cpgcn.classes", "napari_cpgcn.io", "napari_cpgcn.io.hpa",
         "napari_cpgcn.io.tables", "napari_cpgcn.cli", "napari_cpgcn.training.events"]
OPTIONAL_LIGHT = ["napari_cpgcn.synth", "napari_cpgcn.segmentation", "napari_cpgcn.evaluation.matching",
                  "napari_cpgcn.io.rle", "napari_cpgcn.layers", "napari_cpgcn._reader"]
CORE_NO_QT = ["napari_cpgcn.models", "napari_cpgcn.training", "napari_cpgcn.pipeline",
              "napari_cpgcn.batch", "napari_cpgcn.evaluation"]


def _imported(module: str) -> set[str]:
    code = (
        f"import importlib, sys; importlib.import_module({module!r}); "
        "print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def _exists(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.parametrize("module", LIGHT + OPTIONAL_LIGHT)
def test_light_modules_import_no_qt_no_torch(module):
    if not _exists(module):
        pytest.skip(f"{module} not present")
    mods = _imported(module)
    for heavy in ("qtpy", "PyQt6", "PyQt5", "napari", "torch", "magicgui"):
        assert heavy not in mods, f"importing {module} imported {heavy}"


@pytest.mark.parametrize("module", CORE_NO_QT)
def test_core_imports_no_qt(module):
    if not _exists(module):
        pytest.skip(f"{module} not present")
    mods = _imported(module)
    for heavy in ("qtpy", "PyQt6", "PyQt5", "napari", "magicgui"):
        assert heavy not in mods, f"importing {module} imported {heavy}"
