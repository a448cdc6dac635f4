#!/usr/bin/env bash
# The README's "Write a plugin" short version (the README embeds this file
# between its markers; tests/tests/all/author_path.rs checks they match and runs it
# with both build paths). Needs `scripts/serve.sh` running in another terminal.
#   BUILD=wasip2 (default): cargo build --target wasm32-wasip2
#   BUILD=component:        cargo component build (cargo install cargo-component@0.21.1 --locked)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
target="$(mkdir -p "${CARGO_TARGET_DIR:-$repo/target}" && cd "${CARGO_TARGET_DIR:-$repo/target}" && pwd)"
export PATH="$target/debug:$PATH" CARGO_TARGET_DIR="$target"  # `flowhost` (built by scripts/serve.sh) on PATH
url="${FLOWHOST_URL:-http://127.0.0.1:8000}" plugins="${FLOWHOST_PLUGINS:-$repo/.flowhost/plugins}"
name="${PLUGIN_NAME:-sdxl-turbo}" dir="${PLUGIN_DIR:-$(mktemp -d)/sdxl-turbo}"
build() {
  if [ "${BUILD:-wasip2}" = component ]; then
    cargo component build --release && wasm="$target/wasm32-wasip1/release/${name//-/_}.wasm"
  else
    cargo build --release --target wasm32-wasip2 && wasm="$target/wasm32-wasip2/release/${name//-/_}.wasm"
  fi
}
served_version() {  # the version serving the route, from a dry run
  curl -s -X POST "$url/$name?dry_run=true" -H 'content-type: application/json' -d '{"prompt": "a cat"}' \
    | python3 -c 'import json,sys; print(json.load(sys.stdin).get("plugin", {}).get("version", ""))' 2>/dev/null || true
}
wait_for_version() { for _ in $(seq 100); do [ "$(served_version)" = "$1" ] && return; sleep 0.3; done; echo "never served $1" >&2; exit 1; }

flowhost new "$name" --path "$dir" && cd "$dir"         # a plugin crate: src/lib.rs, Cargo.toml
cargo test                                               # its unit tests, natively, with FakeHost
build                                                    # the component
flowhost check-plugin "$wasm" --request '{"prompt": "a cat"}'   # manifest + the built job
cp "$wasm" "$plugins/" && wait_for_version 0.1.0        # hot-loaded by the running service
curl -sf -X POST "$url/$name" -H 'content-type: application/json' \
     -d '{"prompt": "a cat", "width": 512, "height": 512, "steps": 4}' -o cat.jpg -D -
sed -i.bak 's/^version = "0.1.0"/version = "0.1.1"/' Cargo.toml   # change it ...
build && cp "$wasm" "$plugins/" && wait_for_version 0.1.1         # ... and the new build serves
echo "served $url/$name: $dir/cat.jpg, then version 0.1.1 hot-reloaded"
