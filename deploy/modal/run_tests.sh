#!/usr/bin/env bash
# Offline tests of the Modal deployment (no Modal account needed).
# Creates the virtualenv if missing, installs pinned modal + pytest, runs pytest.
# Set FLOWHOST_BIN to a built flowhost to also check the serve flags against `serve --help`.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
# Kept under the (git-ignored) cargo target dir so a fresh clone builds its own.
venv="${FLOWHOST_MODAL_VENV:-${CARGO_TARGET_DIR:-$repo/target}/venv-modal}"
# The tests read Function settings that modal keeps privately: pin the version they were written against.
modal_version="1.6.4"
pytest_version="9.2.0"

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('modal') != '$modal_version' or m.version('pytest') != '$pytest_version')" 2>/dev/null; then
  "$venv/bin/pip" install --quiet "modal==$modal_version" "pytest==$pytest_version"
fi
# The tests run from this folder: a FLOWHOST_BIN relative to where the script was started
# (`FLOWHOST_BIN=target/debug/flowhost deploy/modal/run_tests.sh`) must still name the binary.
if [ -n "${FLOWHOST_BIN:-}" ]; then
  FLOWHOST_BIN="$(realpath "$FLOWHOST_BIN")"
  export FLOWHOST_BIN
fi
cd "$here"
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@" test_app.py
