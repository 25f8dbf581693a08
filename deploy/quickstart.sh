#!/usr/bin/env bash
# Quickstart on a fresh Debian 12 machine, as root: install what corral needs,
# build it, and run a pod (a sandbox and one container) through corral's shim.
set -euo pipefail
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends runc busybox-static ca-certificates protobuf-compiler

cargo build --release --workspace --bins
CORRAL_BIN_DIR="$PWD/target/release" cargo run --release -q -p corral-e2e --example pod
