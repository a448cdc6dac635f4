#!/usr/bin/env bash
# Clone custom nodes, each at one commit, into ComfyUI's custom_nodes/.
# Usage: install_custom_nodes.sh COMFYUI_DIR URL@COMMIT...
# Any failure (clone, unknown commit) fails the image build.
set -euo pipefail
comfyui_dir="$1"
shift
for spec in "$@"; do
  url="${spec%@*}"
  commit="${spec##*@}"
  name="$(basename "$url" .git)"
  target="$comfyui_dir/custom_nodes/$name"
  git init -q "$target"
  git -C "$target" remote add origin "$url"
  git -C "$target" fetch -q --depth 1 origin "$commit"
  git -C "$target" checkout -q --detach FETCH_HEAD
  test "$(git -C "$target" rev-parse HEAD)" = "$commit"
  echo "custom node $name at $commit"
done
