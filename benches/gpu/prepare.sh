#!/usr/bin/env bash
# Fill the git-ignored carry folder that run.sh reads on the GPU machine. Run where the network
# is (pip for three wheels), from anywhere:
#
#   bash benches/gpu/prepare.sh                       # carry folder .gpu/carry in this checkout
#   DEST=/work/main bash benches/gpu/prepare.sh       # ... in another checkout (the one the device tool sends)
#
# Builds (unless SKIP_BUILD=1) from THIS checkout: a release `flowhost` (stripped), the plugins
# (scripts/build-plugins.sh) and, if BUILD_JPEG_BENCH=1, the jpeg_bench binary. Takes the ComfyUI
# source from a git mirror (COMFY_GIT_DIR) and downloads the wheels the GPU machine lacks.
# Copies this harness into the carry folder too, so a checkout without benches/gpu can run it
# (`bash .gpu/carry/harness/run.sh`). Nothing here is committed; DEST/.git/info/exclude gets /.gpu/.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
DEST=${DEST:-$REPO}
COMFY_GIT_DIR=${COMFY_GIT_DIR:-/work/.mirror/Comfy-Org+ComfyUI/repo}
COMFY_COMMIT=${COMFY_COMMIT:-a125cd84b054a57729b5eecab930ca9408719832}   # v0.3.64
TARGET=${CARGO_TARGET_DIR:-$REPO/target}
C=$DEST/.gpu/carry
exclude=$(git -C "$DEST" rev-parse --git-path info/exclude)
case $exclude in /*) ;; *) exclude=$DEST/$exclude ;; esac
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >> "$exclude"
rm -rf "$C" && mkdir -p "$C/plugins" "$C/whl" "$C/harness"

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  # The service as deployed: no test-only features (a `simulate` cargo feature, if one exists, stays off).
  if sed -n '/^\[features\]/,/^\[/p' "$REPO/host/Cargo.toml" | grep -q '^default *=.*simulate'; then
    echo "host's default features include simulate: building with --no-default-features" >&2
    (cd "$REPO" && cargo build --release --locked -p flowhost --bin flowhost --no-default-features)
  else
    (cd "$REPO" && cargo build --release --locked -p flowhost --bin flowhost)
  fi
  (cd "$REPO" && bash scripts/build-plugins.sh "$TARGET/gpu-plugins")
  if [ "${BUILD_JPEG_BENCH:-0}" = 1 ]; then
    (cd "$REPO" && cargo build --release --locked -p flowhost-benches --bin jpeg_bench)
  fi
fi
strip -o "$DEST/.gpu/flowhost" "$TARGET/release/flowhost"
xz -T0 -9 -c "$DEST/.gpu/flowhost" > "$C/flowhost.xz"
rm -f "$DEST/.gpu/flowhost"
jpeg_bench=${JPEG_BENCH_BIN:-$TARGET/release/jpeg_bench}
if [ -x "$jpeg_bench" ]; then
  strip -o "$DEST/.gpu/jpeg_bench" "$jpeg_bench" && xz -T0 -9 -c "$DEST/.gpu/jpeg_bench" > "$C/jpeg_bench.xz" && rm -f "$DEST/.gpu/jpeg_bench"
fi
cp "$TARGET"/wasm32-wasip2/release/{flux_dev,flux_lora,flux_instantid,flux_pulid}.wasm "$C/plugins/"
cp "$HERE"/{run.sh,bench.py,pool.py,speed.py,make_models.py,summarize.py,make_identity_models.py,identity.py,validate_identity_graphs.py} "$C/harness/"

# ComfyUI source. The mirror lacks one blob (comfy/text_encoders/llama_tokenizer/tokenizer.json,
# read only by Llama-based text encoders), so `git archive COMMIT` fails: archive a tree without it.
# Kept in .gpu/cache (not sent) so a second prepare reuses it and the wheels.
cache=$DEST/.gpu/cache
mkdir -p "$cache/whl"
if [ ! -s "$cache/comfyui-$COMFY_COMMIT.tar.xz" ]; then
  index=$(mktemp -u)
  GIT_DIR=$COMFY_GIT_DIR GIT_INDEX_FILE=$index git read-tree "$COMFY_COMMIT"
  GIT_DIR=$COMFY_GIT_DIR GIT_INDEX_FILE=$index git rm -q --cached --ignore-unmatch comfy/text_encoders/llama_tokenizer/tokenizer.json
  tree=$(GIT_DIR=$COMFY_GIT_DIR GIT_INDEX_FILE=$index git write-tree)
  rm -f "$index"
  GIT_DIR=$COMFY_GIT_DIR git archive --prefix=ComfyUI/ "$tree" | xz -T0 -9 > "$cache/comfyui-$COMFY_COMMIT.tar.xz.part"
  mv "$cache/comfyui-$COMFY_COMMIT.tar.xz.part" "$cache/comfyui-$COMFY_COMMIT.tar.xz"
fi
cp "$cache/comfyui-$COMFY_COMMIT.tar.xz" "$C/comfyui.tar.xz"

# What the GPU machine lacks for ComfyUI to start and run the Flux graph (av: comfy_api imports
# it at startup; torchsde: the samplers). The rest of requirements.txt is not needed for this graph.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$cache/whl" torchsde==0.2.6 trampoline==0.1.2 av==19.0.2
cp "$cache"/whl/*.whl "$C/whl/"

# The identity routes (issue #25, run.sh IDENTITY=1): the two node packs at the lock's commits
# (source only: their example pictures stay behind) and the Python packages the GPU image lacks,
# as cp312 wheels. insightface 0.7.3 is published as source only, so its wheel is built here with
# a Python 3.12 (IDENTITY_PY, default: pyenv's 3.12); the rest are pure Python or abi3.
if [ "${IDENTITY:-1}" = 1 ]; then
  mkdir -p "$C/identity/whl"
  lock=$REPO/deploy/identity.lock.json
  for name in ComfyUI_InstantID ComfyUI_PuLID_Flux_ll; do
    commit=$(python3 -c "import json,sys; print(next(n['commit'] for n in json.load(open(sys.argv[1]))['custom_nodes'] if n['name']==sys.argv[2]))" "$lock" "$name")
    owner=$(python3 -c "import json,sys; print(next(n['repo'] for n in json.load(open(sys.argv[1]))['custom_nodes'] if n['name']==sys.argv[2]).split('/')[-2])" "$lock" "$name")
    GIT_DIR=${MIRRORS:-/work/.mirror}/$owner+$name/repo git archive --prefix="$name/" "$commit" -- . ':!examples' ':!*.png' ':!*.jpg' \
      | xz -T0 -9 > "$C/identity/$name.tar.xz"
  done
  if [ ! -s "$cache/idwhl/.done" ]; then
    idpy=${IDENTITY_PY:-$(ls -d /root/.pyenv/versions/3.12.*/bin/python 2>/dev/null | tail -1)}
    rm -rf "$cache/idwhl" "$cache/idvenv" && mkdir -p "$cache/idwhl"
    "$idpy" -m venv "$cache/idvenv" && "$cache/idvenv/bin/pip" -q install cython numpy setuptools wheel
    "$cache/idvenv/bin/pip" -q wheel --no-deps --no-build-isolation -w "$cache/idwhl" insightface==0.7.3 filterpy==1.4.5
    "$cache/idvenv/bin/pip" -q download --no-deps -d "$cache/idwhl" facexlib==0.3.0 ftfy==6.3.1 wcwidth==0.9.5 easydict==1.14 \
      prettytable==3.19.0 albumentations==1.3.1 qudida==0.0.4
    touch "$cache/idwhl/.done"
  fi
  cp "$cache"/idwhl/*.whl "$C/identity/whl/"
fi

{
  echo "flowhost commit: $(git -C "$REPO" rev-parse HEAD)$(git -C "$REPO" diff --quiet HEAD -- . ':!benches/gpu' || echo ' (+ uncommitted changes)')"
  echo "ComfyUI commit: $COMFY_COMMIT"
  echo "prepared: $(date -u +%Y-%m-%dT%H:%MZ)"
} > "$C/PROVENANCE"
cat "$C/PROVENANCE"
du -sh "$C"
