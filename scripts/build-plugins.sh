#!/usr/bin/env bash
# Build the bundled endpoint plugins as WebAssembly components and install them
# into a plugin folder (default .flowhost/plugins), where `flowhost serve`
# hot-loads them. Files are named like cargo's artifacts (flux_dev.wasm), the
# same names the README's `cp target/wasm32-wasip2/release/flux_dev.wasm ...` and
# the Modal image use, so a rebuilt copy replaces the bundled one in place.
#
# --keep-changed (scripts/serve.sh passes it): a file in the folder that is not
# the bundled build this script last installed (the author copied their own
# build over it) is left alone, so restarting the service never reverts it.
set -euo pipefail
cd "$(dirname "$0")/.."
keep=0
if [ "${1:-}" = "--keep-changed" ]; then keep=1; shift; fi
out="${1:-.flowhost/plugins}"
rustup target add wasm32-wasip2 >/dev/null 2>&1 || rustup target add wasm32-wasip2
plugins=(flux-dev flux-lora flux-instantid flux-pulid workflow)
args=()
for p in "${plugins[@]}"; do args+=(-p "$p"); done
cargo build --release --target wasm32-wasip2 "${args[@]}"
target="${CARGO_TARGET_DIR:-target}"
mkdir -p "$out"
for p in "${plugins[@]}"; do
  file="${p//-/_}.wasm"
  built="$target/wasm32-wasip2/release/$file"
  dest="$out/$file"
  stamp="$out/.$file.bundled-sha256"
  # Earlier versions of this script named files flux-dev.wasm: the same route twice.
  if [ "$p.wasm" != "$file" ] && [ -e "$out/$p.wasm" ]; then
    echo "removing $out/$p.wasm (now installed as $file)"
    rm -f "$out/$p.wasm"
  fi
  if [ "$keep" = 1 ] && [ -e "$dest" ] && ! { [ -e "$stamp" ] && [ "$(sha256sum < "$dest")" = "$(cat "$stamp")" ]; }; then
    echo "keeping $dest: it is not the bundled build (yours?); delete it to get the bundled one back"
    continue
  fi
  if cmp -s "$built" "$dest"; then continue; fi
  # Publish atomically: the service watches this folder (hidden temp names are ignored).
  cp "$built" "$out/.$file.tmp" && mv "$out/.$file.tmp" "$dest"
  sha256sum < "$dest" > "$stamp"
done
echo "plugins ready in $out: ${plugins[*]}"
