#!/usr/bin/env bash
# Fuzz the running hub's HTTP API from its own OpenAPI document with
# Schemathesis: no 5xx, and every status, content type and body must be the
# documented ones. Exits non-zero on any failure, or if the hub panics or
# dies under it.
#
# The hub and the fuzzer run in a private network namespace with only
# loopback: the fuzzer registers VMs with arbitrary `sna_url`s and starts
# backups of them, and the hub must not reach out to whatever address it
# makes up (nor resolve names). The hub's data directory is a temporary
# one, removed on exit; backups it starts die with it.
#
# Knobs: API_FUZZ_EXAMPLES (test cases per operation and phase, default 40),
# API_FUZZ_SEED (reproduce a run; default random, printed by Schemathesis).
set -euo pipefail
self=$(readlink -f "$0")
cd "$(dirname "$self")/.."

ST_VERSION=4.32.5
target_dir=${CARGO_TARGET_DIR:-$PWD/target}
venv=$target_dir/api-fuzz-venv
examples=${API_FUZZ_EXAMPLES:-40}

if [ -z "${API_FUZZ_IN_NETNS:-}" ]; then
  # Outside the namespace: the steps that need the registries.
  if ! "$venv/bin/schemathesis" --version 2>/dev/null | grep -qF "$ST_VERSION"; then
    echo "api-fuzz: installing schemathesis $ST_VERSION into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "schemathesis==$ST_VERSION"
  fi
  cargo build -q -p hub-daemon --bin hub-daemon
  if ! command -v unshare >/dev/null || ! unshare -n true 2>/dev/null; then
    echo "api-fuzz: cannot create a network namespace (unshare -n; needs root)" >&2
    exit 1
  fi
  exec unshare -n env API_FUZZ_IN_NETNS=1 "$self" "$@"
fi

ip link set lo up
bin=$target_dir/debug/hub-daemon
work=$(mktemp -d)
hub_pid=
cleanup() {
  if [ -n "$hub_pid" ] && kill -0 "$hub_pid" 2>/dev/null; then
    kill "$hub_pid" 2>/dev/null || true
    wait "$hub_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# Port 0 everywhere: the hub announces its API address on stdout.
RUST_LOG=${RUST_LOG:-warn} "$bin" serve \
  --listen 127.0.0.1:0 --data-dir "$work/data" \
  --nbd-ports 0 --nbd-shared-port 0 --idle-timeout 60 \
  >"$work/hub.out" 2>"$work/hub.log" &
hub_pid=$!

# Start-up takes well under a second; 30 s means it is stuck.
url=
for _ in $(seq 300); do
  if grep -q '^ready$' "$work/hub.out" 2>/dev/null; then
    url=$(sed -n 's/^api \(http[s]*:\/\/.*\)$/\1/p' "$work/hub.out")
    break
  fi
  if ! kill -0 "$hub_pid" 2>/dev/null; then
    break
  fi
  sleep 0.1
done
if [ -z "$url" ]; then
  echo "api-fuzz: the hub did not start" >&2
  cat "$work/hub.out" "$work/hub.log" >&2
  exit 1
fi
echo "api-fuzz: hub at $url (pid $hub_pid)"

# Seed real data: without it almost every operation on a backup is a 404
# and the fuzzer never reaches the state machine. A VM, a policy, one
# completed backup and one left running (no appliance: the hub only
# exports), whose names the fuzzer then draws from half of the time.
api() { # METHOD PATH [BODY]
  curl -sS --fail-with-body -X "$1" -H 'Content-Type: application/json' \
    ${3:+--data "$3"} "$url$2"
}
backup_id() { sed -n 's/.*"backup_id":"\([^"]*\)".*/\1/p'; }
api PUT /api/v1/vms/fuzz-vm \
  '{"vm_context_id":"vm-1","disks":[{"disk_id":0,"size_bytes":1048576},{"disk_id":1,"size_bytes":2097152,"unit_number":1}]}' >/dev/null
api PUT /api/v1/policies/fuzz-policy '{"keep_last":1}' >/dev/null
done_id=$(api POST /api/v1/backups \
  '{"vm_name":"fuzz-vm","backup_type":"full","repository_id":"default","policy_id":"fuzz-policy"}' | backup_id)
api POST "/api/v1/backups/$done_id/complete" '{"disks":[{"disk_id":0,"change_id":"c0"},{"disk_id":1,"change_id":"c1"}]}' >/dev/null
running_id=$(api POST /api/v1/backups \
  '{"vm_name":"fuzz-vm","backup_type":"incremental","repository_id":"default","policy_id":"fuzz-policy"}' | backup_id)
if [ -z "$done_id" ] || [ -z "$running_id" ]; then
  echo "api-fuzz: seeding the hub failed" >&2
  exit 1
fi
cat >"$work/schemathesis.toml" <<TOML
[dictionaries.ids]
values = ["$done_id", "$running_id", "default", "fuzz-policy"]
[dictionaries.vms]
values = ["fuzz-vm"]
[dictionaries.repos]
values = ["default"]

[parameters]
"path.id" = { dictionary = "ids", probability = 0.5 }
"path.vm_name" = { dictionary = "vms", probability = 0.5 }
"body.vm_name" = { dictionary = "vms", probability = 0.5 }
"query.vm_name" = { dictionary = "vms", probability = 0.5 }
"body.repository_id" = { dictionary = "repos", probability = 0.5 }
TOML
echo "api-fuzz: seeded completed backup $done_id, running backup $running_id"

seed_args=()
[ -n "${API_FUZZ_SEED:-}" ] && seed_args=(--seed "$API_FUZZ_SEED")

# One worker: with several, Hypothesis parses lambdas' source from
# threads at once, which this Python (3.11.7) can break with "AST
# constructor recursion depth mismatch" (a CPython bug, fixed in 3.11.8).
# From the scratch directory: Schemathesis keeps a cache in the current
# directory.
rc=0
cd "$work"
"$venv/bin/schemathesis" --config-file "$work/schemathesis.toml" \
  run "$url/api/v1/openapi.json" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
  --max-examples "$examples" \
  --workers 1 \
  --request-timeout 20 \
  --generation-database none \
  --no-color \
  "${seed_args[@]}" 2>&1 | tee "$work/schemathesis.out" || rc=$?

if ! kill -0 "$hub_pid" 2>/dev/null; then
  echo "api-fuzz: the hub died during the run" >&2
  rc=1
fi
if grep -q 'panicked' "$work/hub.log"; then
  echo "api-fuzz: the hub panicked:" >&2
  grep -A5 'panicked' "$work/hub.log" >&2
  rc=1
fi
if [ "$rc" -ne 0 ]; then
  echo "api-fuzz: FAILED (hub log below)" >&2
  tail -n 50 "$work/hub.log" >&2
fi
# A plain closing line for CI's log reader ("N passed, N failed"), from
# Schemathesis's "Test cases: N generated, N passed[, N failed]".
cases=$(grep -E '^ +[0-9]+ generated' "$work/schemathesis.out" | tail -n 1)
passed=$(grep -oE '[0-9]+ passed' <<<"$cases" | grep -oE '[0-9]+' || echo 0)
failed=$(grep -oE '[0-9]+ failed' <<<"$cases" | grep -oE '[0-9]+' || echo 0)
if [ "$rc" -ne 0 ] && [ "$failed" -eq 0 ]; then
  failed=1
fi
echo "api-fuzz: $passed passed, $failed failed"
exit "$rc"
