#!/usr/bin/env bash
# Creates/refreshes the project's virtual environment. Called by the Makefile.
#  1. Debian packages needed for headless MuJoCo rendering (EGL): installed with apt-get when
#     running as root and missing, otherwise we stop and name them.
#  2. A venv at $VENV with the pinned requirements and the project (editable).
set -euo pipefail
PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
# libegl*/libgl1: headless MuJoCo rendering; libtcmalloc-minimal4: fast large CPU allocations
# (see flare_jax/runtime.py).
DEB_PACKAGES=(libegl1 libegl-mesa0 libgl1 libtcmalloc-minimal4)

missing=()
if command -v dpkg-query >/dev/null 2>&1; then
  for p in "${DEB_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
      missing+=("$p")
    fi
  done
else
  echo "setup_env: no dpkg here; make sure these (or your distro's equivalents) are installed: ${DEB_PACKAGES[*]}" >&2
fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup_env: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
  else
    echo "setup_env: missing Debian packages: ${missing[*]}" >&2
    echo "setup_env: install them with: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi

if ! command -v "$PYTHON" >/dev/null 2>&1; then
  PYTHON=python3
fi
if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)'; then
  echo "setup_env: flare_jax is pinned for CPython 3.11 (envpool 1.2.5 has no wheels for newer)," \
       "but $PYTHON is $("$PYTHON" --version 2>&1). Set PYTHON=/path/to/python3.11." >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup_env: creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -r requirements.txt -c constraints.txt
"$VENV/bin/python" -m pip install -q --no-deps -e .
echo "setup_env: $VENV ready ($("$VENV/bin/python" -c 'import jax; print("jax", jax.__version__)'))"
