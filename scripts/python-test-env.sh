#!/usr/bin/env bash
# Create (if missing) the virtualenv the end-to-end tests run Python in and install the
# pinned packages of tests/python-requirements.txt into it. Prints the interpreter's path.
# Usage: scripts/python-test-env.sh [VENV_DIR]   (default: $CARGO_TARGET_DIR or target, /venv-tests)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
target="${CARGO_TARGET_DIR:-$repo/target}"
mkdir -p "$target"
venv="${1:-$(cd "$target" && pwd)/venv-tests}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" >&2
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$repo/tests/python-requirements.txt" >&2
echo "$venv/bin/python"
