#!/usr/bin/env bash
# Fuzz the HTTP API with schemathesis (PyPI) against /openapi.json of a fresh
# `flowhost serve --simulate` with the bundled plugins. Fails unless every answer
# is below 500 (and conforms to the document's statuses and content types).
#
#   scripts/fuzz-api.sh                 # 300 examples per operation, seed 1
#   FUZZ_EXAMPLES=2000 FUZZ_SEED=7 scripts/fuzz-api.sh
#   FUZZ_SPEC=v2 scripts/fuzz-api.sh    # the vendored Comfy API v2 contract itself
#                                       # (host/api/comfy-api-v2.yaml) against /api/v2
#
# Needs python3; installs schemathesis==4.32.5 with pip if `st` is missing.
# Not part of scripts/test.sh: it runs for minutes and its inputs are random.
set -euo pipefail
cd "$(dirname "$0")/.."
examples="${FUZZ_EXAMPLES:-300}"
seed="${FUZZ_SEED:-1}"
port="${FUZZ_PORT:-18765}"
if ! command -v st >/dev/null 2>&1; then
  python3 -m pip install --quiet 'schemathesis==4.32.5'
fi
target="${CARGO_TARGET_DIR:-target}"
scripts/build-plugins.sh "$target/fuzz-plugins" >/dev/null
cargo build -p flowhost --bin flowhost
work="$(mktemp -d)"
"$target/debug/flowhost" serve --simulate --listen "127.0.0.1:$port" \
  --plugins "$target/fuzz-plugins" --cache-dir "$work/cache" --state-dir "$work/state" >"$work/serve.log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 1 120); do
  if curl -fsS "http://127.0.0.1:$port/health" 2>/dev/null | grep -q '"status":"ready"'; then break; fi
  sleep 0.5
done
curl -fsS "http://127.0.0.1:$port/health" | grep -q '"status":"ready"' || { echo "flowhost never became ready"; cat "$work/serve.log"; exit 1; }
# not_a_server_error: zero 5xx. The conformance checks catch undocumented statuses
# and content types. Plugins legitimately answer 503 when at capacity: none here
# (one request at a time).
# FUZZ_SPEC=v2: the vendored contract (its paths carry /api/v2; --url is the service root),
# so flowhost is held to Comfy's document, not to its own description of it.
if [ "${FUZZ_SPEC:-openapi}" = v2 ]; then
  schema=(host/api/comfy-api-v2.yaml --url "http://127.0.0.1:$port")
else
  schema=("http://127.0.0.1:$port/openapi.json")
fi
st run "${schema[@]}" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
  --max-examples "$examples" --seed "$seed" --workers 1 \
  --request-timeout 60 --suppress-health-check all
