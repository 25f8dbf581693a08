#!/usr/bin/env bash
# Installs corral onto a Debian node, as root: the runtime packages corrald
# needs, corrald and containerd-shim-corral-v2 (built first if this checkout
# has no release build), the systemd unit, the default config and the CNI
# bridge network, then starts corrald. Safe to run again: it changes only
# what differs, never overwrites /etc/corral/config.yaml, and adds the bridge
# network only to a node that has no CNI configuration.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: deploy/install.sh [--prefix DIR] [--no-start]

  --prefix DIR  install the binaries into DIR/bin (default /usr/local)
  --no-start    enable corrald under systemd, but neither start nor restart it

environment:
  CORRAL_BIN_DIR  where the built binaries are (default: the release build,
                  target/release or $CARGO_TARGET_DIR/release; built if absent)
  DESTDIR         stage every file under this directory instead of /, and
                  leave systemd alone (packaging, tests)
EOF
}

prefix=/usr/local
start=yes
while [[ $# -gt 0 ]]; do
    case $1 in
        --prefix)
            [[ $# -ge 2 ]] || { usage >&2; exit 2; }
            prefix=$2
            shift 2
            ;;
        --prefix=*)
            prefix=${1#--prefix=}
            shift
            ;;
        --no-start)
            start=no
            shift
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            echo "install.sh: unknown argument: $1" >&2
            usage >&2
            exit 2
            ;;
    esac
done
if [[ $prefix != /* ]]; then
    echo "install.sh: --prefix must be an absolute path, not $prefix" >&2
    exit 2
fi
prefix=${prefix%/}
if [[ $(id -u) -ne 0 ]]; then
    echo "install.sh: run as root" >&2
    exit 1
fi

repo=$(cd "$(dirname "$0")/.." && pwd)
deploy=$repo/deploy
bin_src=${CORRAL_BIN_DIR:-${CARGO_TARGET_DIR:-$repo/target}/release}
destdir=${DESTDIR:-}
destdir=${destdir%/}
# Paths as the running node sees them; files go to $destdir$path.
bindir=$prefix/bin
unit=/etc/systemd/system/corrald.service
config=/etc/corral/config.yaml
cni_dir=/etc/cni/net.d
# Set when a binary or the unit changed: a running corrald is restarted to
# pick them up, and its pods keep running (the unit's KillMode=process).
changed=no

main() {
    # runc runs the containers; the CNI plugins and iptables give pods their
    # network; ca-certificates lets image pulls verify registries.
    need_packages runc containernetworking-plugins iptables ca-certificates

    build_if_missing
    local bin
    for bin in corrald containerd-shim-corral-v2; do
        if put "$bin_src/$bin" "$bindir/$bin" 0755; then changed=yes; fi
    done

    if put_text "$(unit_text)" "$unit" 0644; then changed=yes; fi

    if [[ -e $destdir$config ]]; then
        say "kept: $config (the shipped default is $deploy/config.yaml)"
    else
        put "$deploy/config.yaml" "$config" 0644 || true
    fi

    local existing
    existing=$(cni_config_in "$destdir$cni_dir")
    if [[ -n $existing ]]; then
        say "kept the node's CNI configuration: $existing"
    else
        put "$deploy/cni/10-corral-bridge.conflist" "$cni_dir/10-corral-bridge.conflist" 0644 || true
    fi

    start_corrald
    say "kubelet and crictl: unix:///run/corral/corral.sock (the socket key of $config)"
}

say() { printf 'install.sh: %s\n' "$*"; }

# Installs those of the Debian packages "$@" that are missing.
need_packages() {
    local missing=() pkg
    for pkg in "$@"; do
        if ! dpkg-query -W -f '${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed'; then
            missing+=("$pkg")
        fi
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        say "packages present: $*"
        return
    fi
    say "installing packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
}

build_if_missing() {
    if [[ -x $bin_src/corrald && -x $bin_src/containerd-shim-corral-v2 ]]; then
        return
    fi
    if [[ -n ${CORRAL_BIN_DIR:-} ]]; then
        echo "install.sh: CORRAL_BIN_DIR=$CORRAL_BIN_DIR lacks corrald or containerd-shim-corral-v2" >&2
        exit 1
    fi
    if ! command -v cargo >/dev/null; then
        echo "install.sh: no release build in $bin_src and no cargo to build one (https://rustup.rs)" >&2
        exit 1
    fi
    # protoc: the CRI bindings are generated at build time.
    need_packages protobuf-compiler
    say "building corrald and containerd-shim-corral-v2 into $bin_src"
    (cd "$repo" && cargo build --release -p corral-cri -p corral-shim)
}

# put SRC DST MODE: installs SRC as $destdir/DST unless it already holds the
# same bytes; returns 1 then. Through a rename, never by writing into DST:
# running shims execute the installed binary, and writing into it fails
# (ETXTBSY) or changes code under them.
put() {
    local src=$1 dst=$destdir$2 mode=$3
    if [[ -f $dst ]] && cmp -s "$src" "$dst"; then
        say "up to date: $dst"
        return 1
    fi
    install -d -m 0755 "$(dirname "$dst")"
    install -m "$mode" "$src" "$dst.new.$$"
    mv -f "$dst.new.$$" "$dst"
    say "installed: $dst"
}

# put_text TEXT DST MODE: put, for generated content.
put_text() {
    local tmp status=0
    tmp=$(mktemp)
    printf '%s\n' "$1" >"$tmp"
    put "$tmp" "$2" "$3" || status=$?
    rm -f "$tmp"
    return "$status"
}

# The unit, naming the installed binary. systemd's default PATH holds
# /usr/local/bin but not any other prefix, and corrald finds shims in PATH.
unit_text() {
    if [[ $bindir == /usr/local/bin ]]; then
        cat "$deploy/corrald.service"
        return
    fi
    sed -e "s|/usr/local/bin/corrald|$bindir/corrald|" \
        -e "/^\[Service\]\$/a Environment=PATH=$bindir:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        "$deploy/corrald.service"
}

# A file libcni would load from DIR (*.conflist, *.conf, *.json), if any:
# one there means the node's network belongs to someone else, such as a CNI
# add-on (flannel, calico).
cni_config_in() {
    local file
    for file in "$1"/*.conflist "$1"/*.conf "$1"/*.json; do
        if [[ -f $file ]]; then
            printf '%s\n' "$file"
            return 0
        fi
    done
    return 0
}

start_corrald() {
    if [[ -n $destdir ]]; then
        say "staged under $destdir; systemd left alone"
        return
    fi
    # systemd's own test for being the init system (sd_booted).
    if [[ ! -d /run/systemd/system ]]; then
        say "systemd is not running here; start corrald by hand:"
        printf '    modprobe overlay; modprobe br_netfilter\n'
        printf '    nohup %s --config %s >>/var/log/corrald.log 2>&1 &\n' "$bindir/corrald" "$config"
        return
    fi
    systemctl daemon-reload
    if [[ $start == no ]]; then
        systemctl enable corrald
        say "enabled corrald; start it with: systemctl start corrald"
    elif [[ $changed == yes ]] && systemctl is-active --quiet corrald; then
        systemctl enable corrald
        systemctl restart corrald
        say "restarted corrald on the new files; its pods kept running"
    else
        systemctl enable --now corrald
        say "corrald is running: systemctl status corrald"
    fi
}

main
