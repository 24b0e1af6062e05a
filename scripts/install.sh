#!/usr/bin/env bash
# Set up dreamer_tf on a fresh Debian/Ubuntu machine: the system libraries headless MuJoCo
# rendering needs (EGL via Mesa), then the package with its test extras in ./.venv.
# Idempotent: a second run only checks. Usage: bash scripts/install.sh [--gpu]
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi
PKGS="libegl1 libgl1 libgl1-mesa-dri libglu1-mesa libosmesa6"
missing=""
for p in $PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  echo "installing system packages:$missing"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing python3-venv >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
EXTRAS="dev"
if [ "${1:-}" = "--gpu" ]; then EXTRAS="dev,gpu"; fi
.venv/bin/python -m pip install -q -e ".[${EXTRAS}]"
.venv/bin/python -c "import dreamer_tf, tensorflow, tensorflow_probability, dm_control, mujoco" \
  || { echo "install check failed" >&2; exit 1; }
echo "dreamer_tf installed in $(pwd)/.venv"
