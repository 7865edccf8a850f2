#!/usr/bin/env bash
# Prepares a Debian 12 machine for Stratus development and tests (npm run setup). Safe to re-run.
#  1. Debian packages (as root; skipped with a message otherwise), the stratus-qemu system user
#  2. Go >= 1.24 present (builds etcd, kube-apiserver, kube-controller-manager)
#  3. npm install (locked versions) when node_modules is missing
#  4. build/cache the control-plane binaries and extract kubectl + helm (npm run cluster -- build)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Debian packages the project needs. Extend this list (qemu-system-x86, qemu-utils, nftables, ...) as features land.
APT_PACKAGES=(busybox ca-certificates ceph-common ceph-mgr ceph-mon ceph-osd conntrack containerd containernetworking-plugins dnsmasq-base dosfstools ethtool fdisk gcc genisoimage iproute2 iptables iputils-ping libc6-dev lua5.4 mmdebstrap mtools nftables openssh-client openssl openvswitch-switch qemu-block-extra qemu-system-x86 qemu-utils runc shellcheck syslinux syslinux-common umoci unzip)

MIN_GO_MAJOR=1
MIN_GO_MINOR=24

log() { printf '[setup] %s\n' "$*"; }
die() {
  printf '[setup] ERROR: %s\n' "$*" >&2
  exit 1
}

# ---- 1. Debian packages ----
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$pkg")
  fi
done
if ((${#missing[@]} == 0)); then
  log "Debian packages already installed: ${APT_PACKAGES[*]}"
elif ! command -v apt-get >/dev/null 2>&1; then
  log "apt-get not found (not Debian?): install these yourself: ${missing[*]}"
elif [[ $(id -u) -ne 0 ]]; then
  log "not root: skipping apt-get. Run as root or: sudo apt-get install -y ${missing[*]}"
else
  export DEBIAN_FRONTEND=noninteractive
  if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
    log "apt-get update (no package lists yet)"
    apt-get update -q
    updated=1
  fi
  log "apt-get install ${missing[*]}"
  if ! apt-get install -y -q --no-install-recommends "${missing[@]}"; then
    [[ -n ${updated:-} ]] && die "apt-get install ${missing[*]} failed"
    log "install failed with the current package lists: apt-get update and retry"
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
fi

# ---- 1b. the unprivileged user guests' QEMU drops to (node agent --qemu-user, default stratus-qemu) ----
if [[ $(id -u) -eq 0 ]] && ! getent passwd stratus-qemu >/dev/null; then
  log "creating system user stratus-qemu (QEMU runs as it: node agent --qemu-user)"
  useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin stratus-qemu
fi

# ---- 2. Go ----
if ! command -v go >/dev/null 2>&1 && [[ -x /usr/local/go/bin/go ]]; then
  export PATH="/usr/local/go/bin:$PATH"
fi
if ! command -v go >/dev/null 2>&1; then
  die "go not found: install Go >= ${MIN_GO_MAJOR}.${MIN_GO_MINOR} (https://go.dev/dl), e.g. into /usr/local/go, and put /usr/local/go/bin on PATH"
fi
go_version=$(go env GOVERSION)
if [[ $go_version =~ ^go([0-9]+)\.([0-9]+) ]]; then
  major=${BASH_REMATCH[1]}
  minor=${BASH_REMATCH[2]}
  if ((major < MIN_GO_MAJOR || (major == MIN_GO_MAJOR && minor < MIN_GO_MINOR))); then
    die "$go_version is too old: install Go >= ${MIN_GO_MAJOR}.${MIN_GO_MINOR} (https://go.dev/dl)"
  fi
fi
log "Go: $go_version ($(command -v go))"

# ---- 3. npm dependencies ----
if [[ ! -d node_modules ]]; then
  command -v npm >/dev/null 2>&1 || die "npm not found: install Node.js (any recent version; Node 24 comes from npm install)"
  # npm ci refuses this lock file: npm 11 leaves other platforms' optional packages (biome's
  # per-platform binaries) out of it and then counts them as missing. npm install honours the lock.
  log "npm install (locked versions)"
  npm install --no-audit --no-fund
else
  log "node_modules present (run npm install yourself after changing package-lock.json)"
fi
node=node_modules/.bin/node
[[ -x $node ]] || node=node
log "Node: $("$node" --version) ($node)"

# ---- 4. control-plane binaries, kubectl, helm ----
log "control-plane binaries (cached in \${STRATUS_CACHE_DIR:-\$HOME/.cache/stratus}; a cold build takes several minutes)"
"$node" e2e/controlplane/cli.ts build

log "done. Next: npm run cluster -- up"
