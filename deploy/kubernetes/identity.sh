#!/usr/bin/env bash
# The mesh's identity material as Kubernetes objects: run once before `kubectl apply -k`, and
# again (with the longer --services list) whenever a service joins. Existing files in --dir are
# kept, so the CA and the tokens already handed out stay the same.
#
#   deploy/kubernetes/identity.sh                          # the demo: artist, song, image
#   deploy/kubernetes/identity.sh --services artist,song,image,lyrics --app-namespace sidemesh
#   deploy/kubernetes/identity.sh --print > secrets.yaml   # to review, seal or commit elsewhere
#
# It runs `sidemesh identity init` on this machine (the CA key is made here and enters the
# cluster only as the Secret the control plane mounts), then creates or updates:
#
#   in --namespace (the control plane's):
#     Secret    sidemesh-ca-key        ca.pem, ca-key.pem    the control plane's --ca-dir
#     Secret    sidemesh-join-tokens   one key per service   the control plane's --join-tokens
#   in --app-namespace (the meshed pods'):
#     ConfigMap sidemesh-ca            ca.pem                every sidecar's trust bundle
#     Secret    sidemesh-join-<svc>    token                 that service's sidecars only
#
# --dir defaults to ~/.local/state/sidemesh/identity-<namespace>, outside any work tree so the
# CA key is never committed by accident. Keep it safe -- whoever holds ca-key.pem can mint any
# identity of the mesh -- and keep it: adding a service later needs the same CA.
set -euo pipefail

namespace=sidemesh
app_namespace=
services=artist,song,image
dir=
print=0
sidemesh=${SIDEMESH:-sidemesh}
kubectl=${KUBECTL:-kubectl}

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --namespace) namespace=$2; shift 2 ;;
    --app-namespace) app_namespace=$2; shift 2 ;;
    --services) services=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    --print) print=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "identity.sh: unknown argument $1 (--help)" >&2; exit 2 ;;
  esac
done
app_namespace=${app_namespace:-$namespace}
dir=${dir:-${XDG_STATE_HOME:-$HOME/.local/state}/sidemesh/identity-$namespace}

# `sidemesh identity init` prints what it made; keep stdout for the objects under --print
"$sidemesh" identity init --ca-dir "$dir/ca" --services "$services" >&2

# client-side rendering only: the same objects whether they are printed or applied
render() { "$kubectl" create --dry-run=client -o yaml "$@"; }
objects() {
  render secret generic sidemesh-ca-key -n "$namespace" \
    --from-file=ca.pem="$dir/ca/ca.pem" --from-file=ca-key.pem="$dir/ca/ca-key.pem"
  echo ---
  local tokens=()
  local service
  IFS=, read -r -a names <<< "$services"
  for service in "${names[@]}"; do
    tokens+=(--from-file="$service=$dir/ca/tokens/$service")
  done
  render secret generic sidemesh-join-tokens -n "$namespace" "${tokens[@]}"
  echo ---
  render configmap sidemesh-ca -n "$app_namespace" --from-file=ca.pem="$dir/ca/ca.pem"
  for service in "${names[@]}"; do
    echo ---
    render secret generic "sidemesh-join-$service" -n "$app_namespace" \
      --from-file=token="$dir/ca/tokens/$service"
  done
}

if [ "$print" = 1 ]; then
  objects
else
  objects | "$kubectl" apply -f -
fi
