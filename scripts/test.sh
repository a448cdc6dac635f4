#!/usr/bin/env bash
# Run every test: Rust unit + integration tests (wasm plugins are built as real
# components first), the cargo-component author path when cargo-component is
# installed, and the Modal deployment tests (Python, no Modal account needed).
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target add wasm32-wasip2 wasm32-wasip1 >/dev/null 2>&1 || rustup target add wasm32-wasip2 wasm32-wasip1
scripts/build-plugins.sh "${CARGO_TARGET_DIR:-target}/bundled-plugins" >/dev/null
cargo build -p flowhost --bin flowhost
# The official Python packages some tests drive (e.g. the Standard Webhooks verifier).
FLOWHOST_TEST_PYTHON="$(scripts/python-test-env.sh)"
export FLOWHOST_TEST_PYTHON
cargo test --no-fail-fast
if [ -x deploy/modal/run_tests.sh ]; then
  target_dir="$(cd "${CARGO_TARGET_DIR:-target}" && pwd)"
  FLOWHOST_BIN="$target_dir/debug/flowhost" deploy/modal/run_tests.sh
fi
