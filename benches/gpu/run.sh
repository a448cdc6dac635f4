#!/usr/bin/env bash
# One end-to-end GPU run of flowhost in front of a real ComfyUI with full-size random-weight
# Flux.1-dev models, as ONE command that ends inside DEADLINE_S (default 540 s). Run from the
# root of a checkout on the GPU machine, with the carry folder prepare.sh filled beside it:
#
#   OUT=/some/dir bash benches/gpu/run.sh              (or bash .gpu/carry/harness/run.sh)
#
# Reads (sent along, git-ignored):  $CARRY/comfyui.tar.xz   ComfyUI a125cd84 source (git archive)
#                                   $CARRY/flowhost.xz      stripped release flowhost binary
#                                   $CARRY/plugins/*.wasm   flux_dev.wasm, flux_lora.wasm
#                                   $CARRY/whl/*.whl        wheels the GPU machine lacks (torchsde, trampoline, av)
#                                   $CARRY/jpeg_bench.xz    (optional) the PNG→JPEG bench binary
# Writes into $OUT (8 files at most): run.log results.json summary.md flowhost.log nvsmi.csv
#                                     warm.jpg direct.png (url mode: + comfyui.log)
# Knobs (environment):
#   PROFILE=full|tiny (model size), WORK (scratch, default /tmp/flowhost-gpu),
#   MODELS (default /dev/shm/flowhost-models when it has room, else $WORK/models),
#   DEADLINE_S (seconds this script may run, default 540), CARRY (default $ROOT/.gpu/carry),
#   PROFILES (launch profiles compared after the main phases, default "fp8,fast"; "" = none),
#   LORA (default flux-random-lora; "" skips the LoRA phase), WARM (warm pairs, default 5),
#   JPEG_BENCH=1|0 (run the PNG→JPEG bench on ComfyUI's own PNG, default 1),
#   BENCH_ARGS (extra bench.py arguments, e.g. "--mode url --extra 512x4,1024x4"),
#   BENCH=1|0 (the single-worker phases above, default 1), POOL_GPUS (e.g. "0,1" or "0,0": the
#   worker-pool phase, pool.py; default empty = skipped), POOL_ARGS (extra pool.py arguments),
#   SPEED=candidates|flowhost (issue 26's speed.py phases; default empty = skipped; set BENCH=0
#   JPEG_BENCH=0 to run it alone), SPEED_ARGS (extra speed.py arguments), IDENTITY=1 (issue 25's
#   identity routes, identity.py, run before SPEED; IDENTITY_SIZE/STEPS/WARM, default 1024/20/2;
#   IDENTITY_S caps its seconds; IDENTITY_ARGS).
set -uo pipefail
export PYTHONUNBUFFERED=1
ROOT=$(pwd)
HERE=${HERE:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
CARRY=${CARRY:-$ROOT/.gpu/carry}
WORK=${WORK:-/tmp/flowhost-gpu}
OUT=${OUT:?OUT must name the folder whose files come back}
PROFILE=${PROFILE:-full}
DEADLINE_S=${DEADLINE_S:-540}
PROFILES=${PROFILES-fp8,fast}
LORA=${LORA-flux-random-lora}
WARM=${WARM:-5}
JPEG_BENCH=${JPEG_BENCH:-1}
PY=${PY:-python3}
START=$(date +%s)
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/run.log") 2>&1
stamp() { echo "[run.sh +$(( $(date +%s) - START ))s] $*"; }

stamp "facts"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv || true
nproc; free -g; df -h /dev/shm /tmp "$ROOT" 2>/dev/null; uname -r; head -2 /etc/os-release; ldd --version | head -1
$PY -c 'import sys, importlib.metadata as m
print(sys.version.split()[0], *[f"{p}=={m.version(p)}" for p in ("torch","transformers","tokenizers","safetensors","numpy","aiohttp","pillow","sentencepiece")])'
cat "$CARRY/PROVENANCE" 2>/dev/null

stamp "unpack"
rm -rf "$WORK/ComfyUI"   # a fresh tree each call: no node packs left from an earlier call on a warm machine
# Python's lzma, not the xz binary: the GPU machine may lack xz-utils.
$PY - "$CARRY" "$WORK" <<'EOF_PY' || { stamp "unpacking failed"; exit 1; }
import lzma, os, shutil, sys, tarfile
carry, work = sys.argv[1:3]
with tarfile.open(f"{carry}/comfyui.tar.xz", "r:xz") as t:
    t.extractall(work, filter="tar")
for name in ("flowhost", "jpeg_bench"):
    if os.path.exists(f"{carry}/{name}.xz"):
        with lzma.open(f"{carry}/{name}.xz") as src, open(f"{work}/{name}", "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.chmod(f"{work}/{name}", 0o755)
EOF_PY
mkdir -p "$WORK/plugins" "$WORK/cache" "$WORK/frontend" && cp "$CARRY"/plugins/*.wasm "$WORK/plugins/"
"$WORK/flowhost" --version || true
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" "$CARRY"/whl/*.whl || { stamp "wheel install failed"; exit 1; }
export PYTHONPATH=$WORK/site

if [ -z "${MODELS:-}" ]; then
  shm_gb=$(df --output=avail -BG /dev/shm 2>/dev/null | tail -1 | tr -dc 0-9)
  if [ "${shm_gb:-0}" -ge 45 ]; then MODELS=/dev/shm/flowhost-models; else MODELS=$WORK/models; fi
fi
stamp "models in $MODELS (profile $PROFILE)"

nvidia-smi --query-gpu=timestamp,memory.used,memory.total,utilization.gpu,power.draw,clocks.sm,temperature.gpu \
  --format=csv -lms 500 > "$OUT/nvsmi.csv" 2>/dev/null &
SMI_PID=$!

t=$(date +%s)
# A machine kept warm between calls still has the models of the last call (same seed, same files).
if [ -f "$MODELS/.made-$PROFILE" ]; then
  stamp "models of profile $PROFILE already in $MODELS (an earlier call on this machine)"
else
  $PY "$HERE/make_models.py" --comfyui "$WORK/ComfyUI" --out "$MODELS" --profile "$PROFILE" --lora flux-random-lora \
    || { stamp "model generation failed"; kill "$SMI_PID"; exit 1; }
  touch "$MODELS/.made-$PROFILE"
  stamp "models written in $(( $(date +%s) - t )) s"
fi
du -sh "$MODELS"/*; free -g

rm -rf "$WORK/ComfyUI/models" && ln -s "$MODELS" "$WORK/ComfyUI/models"

left=$(( DEADLINE_S - ($(date +%s) - START) ))
jpeg_reserve=0; [ "$JPEG_BENCH" = 1 ] && [ -x "$WORK/jpeg_bench" ] && jpeg_reserve=25
budget=$(( left - 150 - jpeg_reserve ))
stamp "bench: ${left}s left, optional phases start before ${budget}s"
if [ "${BENCH:-1}" = 1 ]; then
# shellcheck disable=SC2086
timeout --signal=TERM "$(( left - 10 - jpeg_reserve ))" $PY "$HERE/bench.py" \
  --comfyui "$WORK/ComfyUI" --python "$PY" --front-end-root "$WORK/frontend" \
  --flowhost "$WORK/flowhost" --models "$MODELS" --plugins "$WORK/plugins" --cache-dir "$WORK/cache" \
  --out "$OUT" --lora-id "$LORA" --budget-s "$budget" --warm "$WARM" --profiles "$PROFILES" \
  --keep-png "$OUT/direct.png" ${BENCH_ARGS:-}
stamp "bench exit $?"
fi
if [ "${IDENTITY:-0}" = 1 ]; then
  # Issue 25: /flux-instantid and /flux-pulid executed through flowhost on full-size random
  # weights (identity.py), with the node packs and wheels prepare.sh put in $CARRY/identity.
  stamp "identity: node packs and wheels"
  mkdir -p "$WORK/ComfyUI/custom_nodes" "$WORK/faces" "$WORK/identity"
  for t in "$CARRY"/identity/*.tar.xz; do
    $PY -c 'import sys, tarfile; tarfile.open(sys.argv[1], "r:xz").extractall(sys.argv[2], filter="tar")' "$t" "$WORK/ComfyUI/custom_nodes"
  done
  # Into the same folder as the wheels ComfyUI already starts with (a second PYTHONPATH folder
  # left the packs' `import insightface.app` unresolved inside ComfyUI on the first GPU run).
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" "$CARRY"/identity/whl/*.whl \
    || { stamp "identity wheel install failed"; exit 1; }
  # insightface's wheel carries data files (the .data/data scheme); pip --target --upgrade moves
  # them over the package, leaving insightface/ with data/ and thirdparty/ only (a namespace
  # package: `import insightface.app` fails). Unpacked by hand, the package is whole.
  for w in "$CARRY"/identity/whl/insightface-*.whl; do $PY -m zipfile -e "$w" "$WORK/site"; done
  rm -rf "$WORK"/site/insightface-*.data
  export PYTHONPATH=$WORK/site
  (cd "$WORK/ComfyUI" && HOME=$(mktemp -d) $PY -c 'import sys; print("sys.path", sys.path[:4]); import insightface, insightface.app, insightface.utils.download; print("insightface from", insightface.__file__, list(getattr(insightface, "__path__", [])))') \
    || stamp "insightface does not import from the ComfyUI folder"
  $PY -c 'import importlib.metadata as m
for p in ("insightface","facexlib","onnxruntime","opencv-python-headless","timm","torchvision","scikit-image","albumentations","ftfy"):
    try: print(p, m.version(p))
    except Exception as e: print(p, "MISSING", e)
import insightface, facexlib, ftfy, filterpy' || { stamp "identity imports failed"; exit 1; }
  t=$(date +%s)
  $PY "$HERE/make_identity_models.py" --comfyui "$WORK/ComfyUI" --out "$MODELS" --profile "$PROFILE" --images "$WORK/faces" \
    > "$WORK/identity/models.json" || { stamp "identity model generation failed"; tail -30 "$WORK/identity/models.json"; exit 1; }
  stamp "identity models written in $(( $(date +%s) - t )) s"; du -sh "$MODELS"/*; free -g
  left=$(( DEADLINE_S - ($(date +%s) - START) ))
  cap=$(( left - 15 )); [ -n "${IDENTITY_S:-}" ] && [ "$IDENTITY_S" -lt "$cap" ] && cap=$IDENTITY_S
  stamp "identity.py: ${left}s left, ${cap}s for it"
  timeout --signal=TERM "$cap" $PY "$HERE/identity.py" --flowhost "$WORK/flowhost" --comfyui "$WORK/ComfyUI" \
    --python "$PY" --models "$MODELS" --plugins "$WORK/plugins" --images "$WORK/faces" --out "$WORK/identity" \
    --size "${IDENTITY_SIZE:-1024}" --steps "${IDENTITY_STEPS:-20}" --warm "${IDENTITY_WARM:-2}" --startup-timeout 300 \
    --comfyui-arg=--front-end-root --comfyui-arg="$WORK/frontend" ${IDENTITY_ARGS:-}
  stamp "identity exit $?"
  # $OUT brings back 8 files at most: the JPEGs stay in $WORK/identity (identity.json has their sizes)
  cp "$WORK/identity/identity.json" "$OUT/" 2>/dev/null
  echo "identity models:"; cat "$WORK/identity/models.json"
  tail -c 4000000 "$WORK/identity/flowhost.log" > "$OUT/flowhost-identity.log" 2>/dev/null
  rm -rf "$WORK/ComfyUI/custom_nodes/ComfyUI_InstantID" "$WORK/ComfyUI/custom_nodes/ComfyUI_PuLID_Flux_ll"
fi
if [ -n "${SPEED:-}" ]; then
  # Issue 26 (speed.py): SPEED=candidates — the one-step op-class profile, then default and the
  # speed candidates through two ComfyUIs, interleaved; SPEED=flowhost — flowhost with
  # --comfyui-profile speed against default: cold start with the compile cache cold and warm,
  # first ÷ warm, interleaved per-image time, LoRA interleave. A comma list runs each in turn;
  # SPEED_FIRST_S caps the first one's seconds. SPEED_ARGS adds speed.py options.
  n=0
  for phase in ${SPEED//,/ }; do
    n=$((n + 1))
    left=$(( DEADLINE_S - ($(date +%s) - START) ))
    cap=$(( left - 20 ))
    if [ "$n" = 1 ] && [ -n "${SPEED_FIRST_S:-}" ] && [ "$SPEED_FIRST_S" -lt "$cap" ]; then cap=$SPEED_FIRST_S; fi
    stamp "speed.py $phase: ${left}s left, deadline ${cap}s"
    pick=()
    picked_from=$OUT/speed.json; [ -s "$picked_from" ] || picked_from=$WORK/speed-candidates.json
    if [ "$phase" = flowhost ] && [ "${SPEED_PICK:-0}" = 1 ] && [ -s "$picked_from" ]; then
      # SPEED_PICK=1: the `speed` profile's EasyCache threshold from the candidates just measured
      # (stage 0, ComfyUI's defaults + EasyCache T at the served shape): the lowest T that reaches
      # 1.8x images per hour against default, else the fastest T.
      t=$($PY - "$picked_from" <<'EOF_PY'
import json, re, sys
S = json.load(open(sys.argv[1])).get("candidates", {}).get("summary", {})
rows = [(float(m.group(1)) / 100, v) for k, v in S.items() if (m := re.match(r"s0:default_ec(\d+)@1024x20$", k)) and v.get("vs_default")]
ok = sorted(t for t, v in rows if v["vs_default"] >= 1.8)
print(ok[0] if ok else (max(rows, key=lambda r: r[1]["vs_default"])[0] if rows else ""))
EOF_PY
)
      [ -n "$t" ] && pick=(--fh-profiles "speed=speed+--speed-step-cache=$t") && stamp "speed profile picked: EasyCache $t"
    fi
    # shellcheck disable=SC2086
    timeout --signal=TERM "$(( cap + 15 ))" $PY "$HERE/speed.py" "$phase" "${pick[@]}" \
      --comfyui "$WORK/ComfyUI" --python "$PY" --front-end-root "$WORK/frontend" --log-dir "$OUT" \
      --out-json "$OUT/speed.json" --deadline-s "$cap" --flowhost "$WORK/flowhost" \
      --models "$MODELS" --plugins "$WORK/plugins" --work "$WORK" --lora-id "${LORA:-flux-random-lora}" \
      --inductor-cache "$WORK/compile-cache/inductor" --triton-cache "$WORK/compile-cache/triton" ${SPEED_ARGS:-}
    stamp "speed.py $phase exit $?"
    # kept on the machine: a later call's SPEED_PICK reads it when this call's $OUT has none
    [ "$phase" = candidates ] && cp "$OUT/speed.json" "$WORK/speed-candidates.json" 2>/dev/null
  done
fi
if [ -n "${POOL_GPUS:-}" ]; then
  # The worker pool (issues 13, 16): one supervised ComfyUI per --gpus entry, an interleave over
  # several LoRA sets under affinity and FIFO dispatch (pool.py; POOL_ARGS for more options).
  left=$(( DEADLINE_S - ($(date +%s) - START) ))
  stamp "pool: --gpus $POOL_GPUS, ${left}s left"
  # shellcheck disable=SC2086
  timeout --signal=TERM "$(( left - 10 ))" $PY "$HERE/pool.py" \
    --comfyui "$WORK/ComfyUI" --python "$PY" --front-end-root "$WORK/frontend" \
    --flowhost "$WORK/flowhost" --models "$MODELS" --plugins "$WORK/plugins" --cache-dir "$WORK/cache" \
    --out "$OUT" --gpus "$POOL_GPUS" --lora-id "${LORA:-flux-random-lora}" --budget-s "$(( left - 200 ))" ${POOL_ARGS:-}
  stamp "pool exit $?"
fi

kill "$SMI_PID" 2>/dev/null
if [ "$JPEG_BENCH" = 1 ] && [ -x "$WORK/jpeg_bench" ] && [ -f "$OUT/direct.png" ]; then
  stamp "PNG→JPEG bench on the PNG ComfyUI wrote (SaveImage, compress_level 4) and the same pixels at compress_level 1 (SaveImageWebsocket)"
  $PY - "$OUT/direct.png" "$WORK/ws-level1.png" <<'EOF_PY'
import io, sys, time
from PIL import Image
src, dst = sys.argv[1:3]
img = Image.open(src); img.load()
img.save(dst, compress_level=1)
# Pillow (libjpeg-turbo) as the reference for "a faster codec": decode + encode, q90 4:2:0.
data = open(src, "rb").read()
ts = []
for _ in range(23):
    t = time.perf_counter()
    im = Image.open(io.BytesIO(data)); im.load()
    out = io.BytesIO(); im.save(out, format="JPEG", quality=90, subsampling=2)
    ts.append(time.perf_counter() - t)
ts = sorted(ts[3:])
print(f"| Pillow {Image.__version__} (libjpeg-turbo, zlib) PNG → JPEG, for reference | 1 | {ts[len(ts)//2]*1e3:.2f} | {ts[int(len(ts)*0.9)]*1e3:.2f} | {ts[0]*1e3:.2f} | {len(out.getvalue())/1024:.0f} |")
EOF_PY
  JPEG_BENCH_THREADS=${JPEG_BENCH_THREADS:-1,2,4,8} timeout 60 "$WORK/jpeg_bench" "$OUT/direct.png" "$WORK/ws-level1.png" || stamp "jpeg_bench failed"
fi
if [ -f "$OUT/results.json" ]; then
  $PY "$HERE/summarize.py" "$OUT" > "$OUT/summary.md" 2>&1 || stamp "summarize failed"
  cat "$OUT/summary.md"
fi
stamp "done"
