#!/usr/bin/env bash
# Run every test: Rust unit + integration tests (wasm plugins are built as real
# components first), the plugin-author path with both build paths (needs
# cargo-component: its tests fail, never skip, without it; .ci/run installs it),
# and the Modal deployment tests (Python, no Modal account needed).
# The flowhost binary is built with its default features, `simulate` included
# (the tests run `flowhost serve --simulate`); release builds leave it out.
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target add wasm32-wasip2 wasm32-wasip1 >/dev/null 2>&1 || rustup target add wasm32-wasip2 wasm32-wasip1
scripts/build-plugins.sh "${CARGO_TARGET_DIR:-target}/bundled-plugins" >/dev/null
cargo build -p flowhost --bin flowhost
cargo test --no-fail-fast
if [ -x deploy/modal/run_tests.sh ]; then
  target_dir="$(cd "${CARGO_TARGET_DIR:-target}" && pwd)"
  FLOWHOST_BIN="$target_dir/debug/flowhost" deploy/modal/run_tests.sh
fi
