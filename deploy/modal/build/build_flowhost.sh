#!/usr/bin/env bash
# Build the flowhost binary and the bundled plugins from the repository copied into the image.
# Usage: build_flowhost.sh SRC_DIR RUST_TOOLCHAIN BUNDLED_PLUGINS_DIR PLUGIN_PACKAGE...
# Any failure fails the image build.
set -euo pipefail
src="$1" toolchain="$2" plugins_out="$3"
shift 3

if ! command -v rustup >/dev/null 2>&1; then
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
    | sh -s -- -y --profile minimal --default-toolchain "$toolchain"
fi
export PATH="$HOME/.cargo/bin:$PATH"
rustup toolchain install "$toolchain" --profile minimal --target wasm32-wasip2
rustup default "$toolchain"

cd "$src"
export CARGO_TARGET_DIR="$src/target"
# No `simulate` feature: the ComfyUI test double is not part of the production binary.
cargo build --release --locked --no-default-features -p flowhost
install -m 0755 target/release/flowhost /usr/local/bin/flowhost

packages=()
for package in "$@"; do packages+=(-p "$package"); done
cargo build --release --locked --target wasm32-wasip2 "${packages[@]}"
mkdir -p "$plugins_out"
for package in "$@"; do
  install -m 0644 "target/wasm32-wasip2/release/${package//-/_}.wasm" "$plugins_out/"
done
ls -l "$plugins_out"

# Keep the image small: the build tree is not needed at run time.
rm -rf "$src/target" "$HOME/.cargo/registry"
test -x /usr/local/bin/flowhost
