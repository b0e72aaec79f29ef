#!/usr/bin/env bash
# Outside tools some tests use as independent checkers; tests that need one skip, saying so, without it.
#   Chromium (headless) loads the ws:// stream's page; the Khronos glTF validator checks exported .glb files.
# Best effort: a tool that cannot be installed here is reported, not fatal.
set -uo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium (Debian) for the web page test"
    (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) >/dev/null 2>&1 \
      || echo "could not install chromium: the web page test will skip"
  else
    echo "no chromium, and no root to install it: the web page test will skip"
  fi
fi
if [ ! -d tests/node_modules/gltf-validator ]; then
  if command -v npm >/dev/null 2>&1; then
    echo "installing the Khronos glTF validator (npm) for the export test"
    npm install --prefix tests --no-save --no-package-lock --no-audit --no-fund gltf-validator@2.0.0-dev.3.10 \
      >/dev/null 2>&1 || echo "could not install gltf-validator: the validator test will skip"
  else
    echo "no npm: the glTF validator test will skip"
  fi
fi
exit 0
