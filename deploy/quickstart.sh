#!/usr/bin/env bash
# Quickstart on a fresh Debian 12 machine, as root: install what corral needs,
# build it, start corrald with a busybox image imported (no registry needed),
# and run a pod whose container prints a line, through corrald's CRI socket.
#
# Everything lives in its own paths (/run/corral-quickstart,
# /var/lib/corral-quickstart, the CNI bridge corral0 on 10.88.0.0/16), so it
# does not touch an installed corrald. corrald is stopped on the way out; the
# pod is removed by the client before that.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends \
  runc busybox-static containernetworking-plugins iptables ca-certificates protobuf-compiler

cargo build --release -p corral-cri -p corral-shim --bins
cargo build --release -p corral-e2e --example cri_pod --example busybox_image
bin=$repo/target/release

state=/run/corral-quickstart
root=/var/lib/corral-quickstart
work=$(mktemp -d)
cat >"$work/config.yaml" <<EOF
socket: $state/corral.sock
root: $root
state: $state
cni:
  conf_dir: $repo/deploy/cni
EOF

"$bin/examples/busybox_image" "$work/busybox.tar"
"$bin/corrald" --config "$work/config.yaml" image import "$work/busybox.tar"

"$bin/corrald" --config "$work/config.yaml" 2>"$work/corrald.log" &
corrald=$!
stop() {
  kill -TERM "$corrald" 2>/dev/null || true
  wait "$corrald" 2>/dev/null || true
  rm -rf "$work"
}
trap stop EXIT

for _ in $(seq 100); do
  [ -S "$state/corral.sock" ] && break
  if ! kill -0 "$corrald" 2>/dev/null; then
    cat "$work/corrald.log" >&2
    exit 1
  fi
  sleep 0.1
done

if ! "$bin/examples/cri_pod" "$state/corral.sock" docker.io/library/busybox:latest; then
  cat "$work/corrald.log" >&2
  exit 1
fi
