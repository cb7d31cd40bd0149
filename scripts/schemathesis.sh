#!/usr/bin/env bash
# Property-based API tests of the signaling and control-plane APIs: starts a
# `floe dev` on free loopback ports, then runs schemathesis (PyPI, installed
# once into a cache folder outside the repository) against each one's
# /v1/openapi.json: without credentials, with the dev tenant's API key, and
# (control plane) with the admin token. Fails on any 5xx and on any answer
# the document does not describe (status, content type, schema).
# Bounded: a fixed number of examples per operation, and a time limit.
# Usage: scripts/schemathesis.sh FLOE_BINARY
set -euo pipefail
floe="${1:?usage: $0 FLOE_BINARY}"
tools="${FLOE_TOOLS_DIR:-$HOME/.cache/floe/tools}"
examples="${SCHEMATHESIS_EXAMPLES:-40}"
venv="$tools/schemathesis-venv"
version="4.32.5"

if ! "$venv/bin/schemathesis" --version 2>/dev/null | grep -q "$version"; then
  echo "installing schemathesis $version (PyPI) into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$version"
fi

work="$(mktemp -d -t floe-schemathesis.XXXXXX)"
dev_pid=""
cleanup() {
  if [ -n "$dev_pid" ] && kill -0 "$dev_pid" 2>/dev/null; then
    kill "$dev_pid" 2>/dev/null || true
    wait "$dev_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

FLOE_LOG=warn "$floe" dev --data-dir "$work/data" --signal-port 0 --control-port 0 \
  --turn-port 0 --turn-http-port 0 >"$work/dev.out" 2>"$work/dev.err" &
dev_pid=$!
for _ in $(seq 300); do
  [ -s "$work/data/endpoints.json" ] && break
  kill -0 "$dev_pid" 2>/dev/null || { cat "$work/dev.err" >&2; exit 1; }
  sleep 0.1
done
[ -s "$work/data/endpoints.json" ] || { echo "floe dev did not start" >&2; exit 1; }
field() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$work/data/endpoints.json" "$1"; }
signal="$(field signal_url)"
control="$(field control_url)"
admin="$(field admin_token)"
basic="$(printf '%s:%s' "$(field api_key_id)" "$(field api_key_secret)" | base64 -w0)"

run() { # api-name, base URL, label, extra args…
  local api="$1" base="$2" label="$3"; shift 3
  echo "schemathesis: $api API, $label ($examples examples per operation)"
  # From the work folder: schemathesis keeps a cache in the current one.
  (cd "$work" && timeout 300 "$venv/bin/schemathesis" run "$base/v1/openapi.json" \
    --url "$base" \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
    --phases examples,coverage,fuzzing \
    --max-examples "$examples" \
    --workers 1 \
    --seed 1 \
    --no-color \
    "$@")
}
run signal "$signal" "no credentials"
run signal "$signal" "the dev tenant's API key" --header "Authorization: Basic $basic"
# The control plane last: with the admin token it may change the dev tenant.
run control-plane "$control" "no credentials"
run control-plane "$control" "the dev tenant's API key" --header "Authorization: Basic $basic"
run control-plane "$control" "the admin token" --header "Authorization: Bearer $admin"
