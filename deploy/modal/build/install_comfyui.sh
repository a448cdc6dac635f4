#!/usr/bin/env bash
# Install ComfyUI at one commit, with its Python dependencies and a pinned torch.
# Usage: install_comfyui.sh COMFYUI_COMMIT TORCH_VERSION COMFYUI_DIR MODELS_DIR
# Any failure fails the image build.
set -euo pipefail
commit="$1" torch_version="$2" comfyui_dir="$3" models_dir="$4"

git init -q "$comfyui_dir"
git -C "$comfyui_dir" remote add origin https://github.com/comfyanonymous/ComfyUI.git
git -C "$comfyui_dir" fetch -q --depth 1 origin "$commit"
git -C "$comfyui_dir" checkout -q --detach FETCH_HEAD
test "$(git -C "$comfyui_dir" rev-parse HEAD)" = "$commit"

# torch first, pinned; torchvision/torchaudio resolve to the builds matching it.
pip install --no-cache-dir "torch==${torch_version}" torchvision torchaudio
pip install --no-cache-dir -r "$comfyui_dir/requirements.txt" "torch==${torch_version}"

# ComfyUI reads every model folder (and the InstantID node its insightface/ folder) under
# models/: point it at the models volume.
rm -rf "$comfyui_dir/models"
ln -s "$models_dir" "$comfyui_dir/models"
echo "ComfyUI $(git -C "$comfyui_dir" describe --tags --always) installed in $comfyui_dir"
