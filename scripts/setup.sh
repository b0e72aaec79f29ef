#!/usr/bin/env bash
# Creates .venv and installs capture with its test tools; fast when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
stamp=.venv/.installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch first and pinned: the CPU build lies in pip's find-links here; an unpinned
# torch would pull a newer CUDA build of several gigabytes.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
# a second OpenCV wheel (headless or plain) shares cv2/ with mediapipe's
# opencv-contrib-python and breaks it: remove it and restore contrib's files
if .venv/bin/python -m pip show -q opencv-python-headless opencv-python >/dev/null 2>&1; then
  .venv/bin/python -m pip uninstall -q -y opencv-python-headless opencv-python
  .venv/bin/python -m pip install -q --force-reinstall --no-deps "opencv-contrib-python<4.12"
fi
echo "$want" > "$stamp"
