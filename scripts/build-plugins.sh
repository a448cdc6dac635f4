#!/usr/bin/env bash
# Build the bundled endpoint plugins as WebAssembly components and copy them
# into a plugin folder (default .flowhost/plugins), where `flowhost serve`
# hot-loads them.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.flowhost/plugins}"
rustup target add wasm32-wasip2 >/dev/null 2>&1 || rustup target add wasm32-wasip2
plugins=(flux-dev flux-lora flux-instantid workflow)
args=()
for p in "${plugins[@]}"; do args+=(-p "$p"); done
cargo build --release --target wasm32-wasip2 "${args[@]}"
target="${CARGO_TARGET_DIR:-target}"
mkdir -p "$out"
for p in "${plugins[@]}"; do
  f="$target/wasm32-wasip2/release/${p//-/_}.wasm"
  # Publish atomically: the service watches this folder.
  cp "$f" "$out/.$p.wasm.tmp" && mv "$out/.$p.wasm.tmp" "$out/$p.wasm"
done
echo "plugins ready in $out: ${plugins[*]}"
