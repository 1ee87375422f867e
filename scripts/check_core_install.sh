#!/usr/bin/env bash
# The core-only install check (CI runs it): a fresh virtualenv with `pip install .` -- no extras,
# so no napari, no Qt binding, no Dask, no cellpose -- must import every core module and run the
# CLI end to end: --help, synth, segment, a tiny train and predict.
#
# torch and torchvision (with their own dependencies, ~5 GB of CUDA libraries) are linked from the
# main virtualenv instead of being installed a second time: they are declared dependencies that
# pip then finds installed; everything else comes from pyproject.toml as a user's `pip install`
# would resolve it.
#
# Usage: bash scripts/check_core_install.sh [MAIN_VENV] [WORK_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
MAIN=${1:-.venv}
WORK=${2:-$(mktemp -d -t napari-cpgcn-core.XXXXXX)}
export PIP_NO_CACHE_DIR=1
PY=${PYTHON:-python3}
CORE="$WORK/venv"
echo "[core] fresh venv in $CORE"
"$PY" -m venv "$CORE"
SITE=$("$CORE/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$MAIN/bin/python" scripts/link_torch.py "$SITE"
"$CORE/bin/python" -m pip install -q --upgrade pip
"$CORE/bin/python" -m pip install -q -c scripts/constraints.txt .
echo "[core] installed: $("$CORE/bin/python" -m pip list 2>/dev/null | wc -l) distributions"
"$CORE/bin/python" - <<'EOF'
import importlib, importlib.util, pkgutil, sys
import napari_cpgcn
for gui in ("napari", "PyQt6", "PyQt5", "PySide6", "PySide2", "dask", "cellpose"):
    assert importlib.util.find_spec(gui) is None, f"{gui} is installed in the core-only venv"
mods = [m.name for m in pkgutil.walk_packages(napari_cpgcn.__path__, "napari_cpgcn.")
        if not m.name.startswith("napari_cpgcn._napari") and m.name != "napari_cpgcn.batch.dask"
        and not m.name.endswith("__main__")]  # `python -m` entry points run the CLI
for m in mods:
    importlib.import_module(m)
print(f"[core] imported {len(mods)} core modules; no Qt binding: {'PyQt6' not in sys.modules}")
EOF
CLI="$CORE/bin/napari-cpgcn"
cd "$WORK"
"$CLI" --help > /dev/null
"$CLI" synth data --n-images 6 --size 64 --seed 1 -q
"$CLI" segment data/images --out masks -q
"$CLI" train data/images --labels data/train.csv --out run --preset tiny --image-size 64 --epochs 1 \
  --device cpu -q
"$CLI" predict data/images --model run --out pred --threads 1 -q
test "$(wc -l < pred/cells.csv)" -gt 1
echo "[core] --help, synth, segment, train, predict: OK ($(($(wc -l < pred/cells.csv) - 1)) cells predicted)"
rm -rf "$WORK"
