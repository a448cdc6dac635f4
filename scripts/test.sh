#!/usr/bin/env bash
# Run every test: Rust unit + integration tests (wasm plugins are built as real
# components first), the cargo-component author path when cargo-component is
# installed, the Modal deployment tests (Python, no Modal account needed), and the
# official Comfy API v2 Python SDK (comfy-sdk 0.5.0) driving `flowhost serve --simulate`.
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target add wasm32-wasip2 wasm32-wasip1 >/dev/null 2>&1 || rustup target add wasm32-wasip2 wasm32-wasip1
scripts/build-plugins.sh "${CARGO_TARGET_DIR:-target}/bundled-plugins" >/dev/null
cargo build -p flowhost --bin flowhost
cargo test --no-fail-fast
# The Comfy API v2 through the official SDK. $COMFY_SDK_PYTHON is a Python with
# comfy-sdk==0.5.0 (.ci/run makes one); a missing SDK fails here, it never skips.
target_abs="$(cd "${CARGO_TARGET_DIR:-target}" && pwd)"
"${COMFY_SDK_PYTHON:-python3}" tests/sdk/comfy_sdk_e2e.py "$target_abs/debug/flowhost" "$target_abs/bundled-plugins"
if [ -x deploy/modal/run_tests.sh ]; then
  target_dir="$(cd "${CARGO_TARGET_DIR:-target}" && pwd)"
  FLOWHOST_BIN="$target_dir/debug/flowhost" deploy/modal/run_tests.sh
fi
