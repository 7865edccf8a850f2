#!/usr/bin/env bash
# Smoke test of Stratus on a kind cluster, for machines with Docker (and the kind.yml workflow):
#   1. a kind cluster: a control plane and one worker labelled as a hypervisor (stratus.io/hypervisor=true), with
#      /dev/kvm and /dev/net/tun of the host mounted into it when the host has them
#   2. the images (npm run images: OCI archives, no registry) loaded into the nodes with kind load image-archive
#   3. helm install of charts/stratus, operator and agent rolled out
#   4. examples/ applied (the Server's user-data also prints STRATUS-GUEST-READY on the serial console)
#   5. waits for the server ACTIVE and STRATUS-GUEST-READY in its console log on the worker, then cleans up
# Usage: e2e/kind/run.sh            (from anywhere; needs docker, kind, helm, kubectl, Node 24 and npm install done)
#        e2e/kind/run.sh --print-kind-config   prints the kind cluster config and exits
# Env:   KIND_CLUSTER (stratus-e2e), KEEP_CLUSTER=1 (leave the cluster up), IMAGES_DIR (.images/kind),
#        ACTIVE_TIMEOUT (20m), READY_TIMEOUT_SECONDS (900), IMAGES_IN_DOCKER=1 (build the images in a Debian 12
#        container even on a Debian host), BUILDER_IMAGE, BUILDER_PACKAGES
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"

cluster=${KIND_CLUSTER:-stratus-e2e}
images_dir=${IMAGES_DIR:-$root/.images/kind}
active_timeout=${ACTIVE_TIMEOUT:-20m}
ready_timeout=${READY_TIMEOUT_SECONDS:-900}
namespace=stratus-system
worker="$cluster-worker"
state_dir=/var/lib/stratus # the chart's agent.stateDir
builder_image=${BUILDER_IMAGE:-debian:bookworm}
# What npm run images needs from Debian: mmdebstrap for the root filesystems, gcc and libc6-dev for the static pause
# (scripts/setup.sh installs them on a Debian host).
builder_packages=${BUILDER_PACKAGES:-ca-certificates mmdebstrap gcc libc6-dev}

# The kind cluster: a control plane and one worker labelled as a hypervisor, with the host's /dev/kvm and
# /dev/net/tun when it has them.
kind_config() {
  local mounts=() dev
  printf 'kind: Cluster\napiVersion: kind.x-k8s.io/v1alpha4\nnodes:\n'
  printf '  - role: control-plane\n'
  printf '  - role: worker\n    labels:\n      stratus.io/hypervisor: "true"\n'
  for dev in /dev/kvm /dev/net/tun; do
    if [[ -e $dev ]]; then mounts+=("$dev"); fi
  done
  if ((${#mounts[@]} > 0)); then
    printf '    extraMounts:\n'
    for dev in "${mounts[@]}"; do
      printf '      - hostPath: %s\n        containerPath: %s\n' "$dev" "$dev"
    done
  fi
}

if [[ ${1:-} == --print-kind-config ]]; then
  kind_config
  exit 0
fi

work=$(mktemp -d)
export KUBECONFIG="$work/kubeconfig"

log() { printf '[kind] %s\n' "$*"; }
die() {
  printf '[kind] ERROR: %s\n' "$*" >&2
  exit 1
}

diagnostics() {
  log "diagnostics"
  kubectl get nodes -o wide || true
  kubectl -n "$namespace" get pods -o wide || true
  kubectl get stratus -A -o wide || true
  kubectl -n demo describe server demo-vm || true
  kubectl -n "$namespace" logs deploy/stratus-operator --tail=200 || true
  kubectl -n "$namespace" logs ds/stratus-agent --tail=200 || true
}

cleanup() {
  local rc=$?
  if ((rc != 0)); then diagnostics; fi
  if [[ ${KEEP_CLUSTER:-} == 1 ]]; then
    log "KEEP_CLUSTER=1: cluster $cluster left up (kind delete cluster --name $cluster)"
  else
    kind delete cluster --name "$cluster" || true
  fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT

for tool in docker kind helm kubectl node npm; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool not found on PATH"
done
[[ -d node_modules ]] || die "node_modules missing: run npm install first"
export PATH="$root/node_modules/.bin:$PATH"

tag=$(sed -n 's/^appVersion:[[:space:]]*"\{0,1\}\([^"]*\)"\{0,1\}[[:space:]]*$/\1/p' charts/stratus/Chart.yaml)
[[ -n $tag ]] || die "no appVersion in charts/stratus/Chart.yaml"

# ---- 1. the cluster ----
kind_config >"$work/kind.yaml"
log "creating kind cluster $cluster"
cat "$work/kind.yaml"
kind create cluster --name "$cluster" --config "$work/kind.yaml" --kubeconfig "$KUBECONFIG" --wait 5m

# ---- 2. images ----
# The images are assembled from Debian packages: on a Debian host by npm run images itself, elsewhere (Ubuntu CI
# runners, other distributions) by the same command inside a Debian 12 container with the repository mounted.
log "building the images (tag $tag) into $images_dir"
if [[ -f /etc/debian_version ]] && grep -qs '^ID=debian' /etc/os-release && [[ ${IMAGES_IN_DOCKER:-} != 1 ]]; then
  npm run images -- --out "$images_dir" --tag "$tag"
else
  log "not a Debian host: building inside $builder_image"
  # --privileged: mmdebstrap --mode=root mounts /proc and /dev in the root filesystems it builds.
  docker run --rm --privileged -v "$root:$root" -w "$root" -e DEBIAN_FRONTEND=noninteractive "$builder_image" bash -c '
    set -euo pipefail
    apt-get update -q
    apt-get install -y -q --no-install-recommends $0
    node_modules/.bin/node containers/build.ts --out "$1" --tag "$2"
    chown -R "$3" "$1"' "$builder_packages" "$images_dir" "$tag" "$(id -u):$(id -g)"
fi
for image in stratus-operator stratus-agent; do
  archive="$images_dir/$image-$tag.oci.tar"
  [[ -f $archive ]] || die "$archive was not built"
  log "kind load image-archive $archive"
  kind load image-archive "$archive" --name "$cluster"
done

# ---- 3. the chart ----
log "helm install stratus charts/stratus"
helm install stratus charts/stratus \
  --namespace "$namespace" --create-namespace \
  --values e2e/kind/values.yaml \
  --set image.tag="$tag" \
  --wait --timeout 10m
kubectl -n "$namespace" rollout status deploy/stratus-operator --timeout 5m
kubectl -n "$namespace" rollout status ds/stratus-agent --timeout 5m

# ---- 4. examples/ ----
log "applying examples/"
kubectl create namespace demo # the demo Project adopts it
for f in examples/*.yaml; do
  if [[ $f == examples/07-server.yaml ]]; then
    # The user-data also prints the READY marker on the serial console (ttyS0), as the test guest image does.
    awk '{ print } /echo "hello from/ { sub(/echo.*/, ""); print $0 "echo \"STRATUS-GUEST-READY hostname=$(hostname)\" > /dev/ttyS0" }' \
      "$f" >"$work/07-server.yaml"
    kubectl apply -f "$work/07-server.yaml"
  else
    kubectl apply -f "$f"
  fi
done

# ---- 5. the server ----
log "waiting for demo-vm ACTIVE (timeout $active_timeout)"
kubectl -n demo wait server/demo-vm --for=jsonpath='{.status.status}'=ACTIVE --timeout "$active_timeout"
uid=$(kubectl -n demo get server demo-vm -o jsonpath='{.metadata.uid}')
node=$(kubectl -n demo get server demo-vm -o jsonpath='{.status.node}')
[[ $node == "$worker" ]] || die "demo-vm runs on '$node', expected $worker"
console="$state_dir/guests/$uid/console.log"
log "waiting for STRATUS-GUEST-READY in $worker:$console (timeout ${ready_timeout}s)"
deadline=$((SECONDS + ready_timeout))
until docker exec "$worker" grep -q STRATUS-GUEST-READY "$console" 2>/dev/null; do
  ((SECONDS < deadline)) || {
    docker exec "$worker" tail -n 50 "$console" || true
    die "no STRATUS-GUEST-READY on the console of demo-vm within ${ready_timeout}s"
  }
  sleep 5
done
docker exec "$worker" grep STRATUS-GUEST-READY "$console"
kubectl get stratus -A
log "ok: demo-vm ACTIVE on $worker and its console printed STRATUS-GUEST-READY"
