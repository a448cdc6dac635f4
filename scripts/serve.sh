#!/usr/bin/env bash
# Run flowhost on http://127.0.0.1:8000 with the bundled plugins. Without a
# ComfyUI flag it runs against the embedded ComfyUI test double (`--simulate`:
# no GPU, synthetic images). Extra arguments go to `flowhost serve`, e.g.
# `--comfyui-url http://127.0.0.1:8188 --models /path/to/models` for a real ComfyUI.
#
# The binary is left at ${CARGO_TARGET_DIR:-target}/debug/flowhost (the README's
# plugin walk-through puts that folder on PATH). Plugins you copied into
# .flowhost/plugins over the bundled ones are kept across restarts. Open
# http://127.0.0.1:8000/ in a browser for the page that tries every endpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x "${CARGO_TARGET_DIR:-target}/debug/flowhost" ]; then
  echo "serve.sh: first build of flowhost and its plugins: about 9 minutes on 2 cores (later runs take seconds); cargo's progress follows." >&2
fi
# Show cargo's progress even when the output is not a terminal (piped into tee, a CI log).
if [ ! -t 2 ] && [ -z "${CARGO_TERM_PROGRESS_WHEN:-}" ]; then
  export CARGO_TERM_PROGRESS_WHEN=always CARGO_TERM_PROGRESS_WIDTH=100
fi
scripts/build-plugins.sh --keep-changed .flowhost/plugins
cargo build -p flowhost --bin flowhost
backend=(--simulate)
if [ -n "${FLOWHOST_COMFYUI_URL:-}${FLOWHOST_COMFYUI_DIR:-}" ]; then backend=(); fi
for arg in "$@"; do
  case "$arg" in --comfyui-url* | --comfyui-dir* | --simulate) backend=() ;; esac
done
exec "${CARGO_TARGET_DIR:-target}/debug/flowhost" serve --plugins .flowhost/plugins "${backend[@]}" "$@"
