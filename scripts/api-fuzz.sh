#!/usr/bin/env bash
# Fuzzes capsad's HTTP API with schemathesis, driven by its own OpenAPI
# document: every generated request (valid and invalid) must get an answer
# that is not a 5xx. Boots real VMs for the valid create requests.
#
#   scripts/api-fuzz.sh [MAX_EXAMPLES]     (default 40 per operation)
#
# Installs schemathesis from PyPI into target/api-fuzz-venv on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
MAX_EXAMPLES="${1:-${CAPSA_API_FUZZ_EXAMPLES:-40}}"
VENV="$PWD/target/api-fuzz-venv"

if [ ! -x "$VENV/bin/schemathesis" ]; then
    echo "api-fuzz: installing schemathesis into $VENV (pip install schemathesis)" >&2
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q schemathesis
fi
cargo build -q -p capsad -p capsa-vmm
BIN="${CARGO_TARGET_DIR:-target}/debug/capsad"

STATE="$(mktemp -d /tmp/capsad-fuzz.XXXXXX)"
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
# Snapshots stay under $STATE (removed at the end); pools are refused past
# validation (--max-pool-members 0): a fuzzer's pools would be running VMs.
"$BIN" --state-dir "$STATE" --snapshot-dir "$STATE/snapshots" --max-pool-members 0 \
    --listen-tcp "127.0.0.1:$PORT" 2>"$STATE/capsad.log" &
PID=$!
cleanup() {
    kill "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
    # Sandboxes the fuzzer created keep running under their monitors: end them.
    for p in $(grep -l "$STATE" /proc/[0-9]*/cmdline 2>/dev/null | cut -d/ -f3); do
        kill -9 "$p" 2>/dev/null || true
    done
    rm -rf "$STATE"
}
trap cleanup EXIT
for _ in $(seq 100); do
    [ -s "$STATE/capsad.token" ] && curl -s -o /dev/null "http://127.0.0.1:$PORT/" && break
    sleep 0.1
done
TOKEN="$(cat "$STATE/capsad.token")"

# /v1/events and console follow stream forever: not for a request/response fuzzer.
set +e
# schemathesis keeps a crash cache in its working directory: keep it under target/.
cd target
"$VENV/bin/schemathesis" run "http://127.0.0.1:$PORT/openapi.json" \
    -H "Authorization: Bearer $TOKEN" \
    --checks not_a_server_error \
    --max-examples "$MAX_EXAMPLES" \
    --exclude-path /v1/events \
    --exclude-path /v1/sandboxes/{name}/console \
    --request-timeout 180 \
    --max-time "${CAPSA_API_FUZZ_MAX_TIME:-600}" \
    --seed "${CAPSA_API_FUZZ_SEED:-1}" \
    --no-color
RC=$?
set -e
if [ $RC -ne 0 ]; then
    echo "api-fuzz: FAILED (schemathesis exit $RC); daemon log:" >&2
    grep -E "WARN|ERROR" "$STATE/capsad.log" | tail -30 >&2 || true
fi
# The daemon must still answer.
curl -sf -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$PORT/v1/health" >/dev/null \
    || { echo "api-fuzz: capsad stopped answering" >&2; exit 1; }
exit $RC
