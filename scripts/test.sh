#!/usr/bin/env bash
# Run every test: Rust unit + integration tests (wasm plugins are built as real
# components first), the plugin-author path with both build paths (needs
# cargo-component: its tests fail, never skip, without it; .ci/run installs it),
# the official SDKs as test clients (comfy-sdk 0.5.0 and @comfyorg/sdk 0.1.9 driving
# `flowhost serve --simulate` through the Comfy API v2; the standardwebhooks
# verifier checking every webhook delivery), and the Modal deployment tests
# (Python, no Modal account needed), and the page at GET / in headless Chromium.
# The flowhost binary is built with its default features, `simulate` included
# (the tests run `flowhost serve --simulate`); release builds leave it out.
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target add wasm32-wasip2 wasm32-wasip1 >/dev/null 2>&1 || rustup target add wasm32-wasip2 wasm32-wasip1
scripts/build-plugins.sh "${CARGO_TARGET_DIR:-target}/bundled-plugins" >/dev/null
cargo build -p flowhost --bin flowhost
# One virtualenv with the pinned Python packages the tests drive (tests/python-requirements.txt);
# a missing package fails the tests that need it, never skips them.
FLOWHOST_TEST_PYTHON="$(scripts/python-test-env.sh)"
export FLOWHOST_TEST_PYTHON
cargo test --no-fail-fast
target_abs="$(cd "${CARGO_TARGET_DIR:-target}" && pwd)"
# The Comfy API v2 through the official SDK, unchanged (COMFY_BASE_URL pointing at flowhost).
"$FLOWHOST_TEST_PYTHON" tests/sdk/comfy_sdk_e2e.py "$target_abs/debug/flowhost" "$target_abs/bundled-plugins"
# And through the official TypeScript SDK, unchanged (@comfyorg/sdk pinned in tests/sdk-ts,
# installed by .ci/run or `npm ci --prefix tests/sdk-ts`); a missing SDK or node fails here.
node tests/sdk-ts/e2e.mjs "$target_abs/debug/flowhost" "$target_abs/bundled-plugins"
# The page at GET / in headless Chromium (Debian's chromium + chromium-driver; a missing one fails).
cargo build --quiet --release --target wasm32-wasip2 -p fixture-hostile
"$FLOWHOST_TEST_PYTHON" tests/page/page_e2e.py "$target_abs/debug/flowhost" "$target_abs/bundled-plugins" "$target_abs/wasm32-wasip2/release/fixture_hostile.wasm"
if [ -x deploy/modal/run_tests.sh ]; then
  FLOWHOST_BIN="$target_abs/debug/flowhost" deploy/modal/run_tests.sh
fi
