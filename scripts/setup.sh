#!/usr/bin/env bash
# Set up everything napari-cpgcn needs on a fresh Debian machine with Python >= 3.10:
# the system libraries that Qt/napari need under a virtual X server (Xvfb), a virtualenv in
# .venv, and the package with its GUI, cellpose, distributed and test extras.
# Idempotent: a second run only checks that the environment is complete.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
# The venv is ~7 GB (torch is a CUDA build); do not keep a second copy of the downloads in ~/.cache.
export PIP_NO_CACHE_DIR=1

APT_PKGS="xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-image0 libxcb-render-util0 \
libxcb-xinerama0 libxcb-xkb1 libxcb-shape0 libxcb-cursor0 libxkbcommon-x11-0 libgl1 libegl1 \
libfontconfig1 libdbus-1-3"
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  missing=""
  for p in $APT_PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    echo "[setup] apt-get install$missing"
    (apt-get install -y -q $missing >/dev/null 2>&1) || {
      apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $missing >/dev/null
    }
  fi
elif ! command -v Xvfb >/dev/null 2>&1; then
  echo "[setup] warning: Xvfb not found and cannot apt-get it (not root?); GUI tests will be skipped" >&2
fi

stamp="$VENV/.napari-cpgcn-setup"
want=$(cat pyproject.toml scripts/constraints.txt | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import napari_cpgcn, torch, napari" 2>/dev/null; then
  echo "[setup] environment in $VENV is up to date"
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first and pinned, so pip takes the local wheels instead of resolving a newer CUDA build.
"$VENV/bin/python" -m pip install -q -c scripts/constraints.txt torch torchvision
"$VENV/bin/python" -m pip install -q -c scripts/constraints.txt -e ".[all,test]"
echo "$want" > "$stamp"
echo "[setup] ready: $VENV ($("$VENV/bin/python" -c 'import torch, napari; print("torch", torch.__version__, "napari", napari.__version__)'))"
