#!/usr/bin/env bash
# Builds, once per machine, the Kubernetes control plane the tests start on 127.0.0.1
# (tests/kube_apiserver.rs, tests/node_e2e.rs): kube-apiserver, kube-controller-manager,
# kube-scheduler and kubelet compiled from Debian bookworm's `kubernetes` source package,
# etcd and kubectl extracted from Debian's .debs. Everything goes to a cache outside the clone, keyed by the pinned versions below:
#
#   $ZMESH_KUBE_CACHE (default /var/cache/zmesh)/kubernetes-<version>/
#     bin/      kube-apiserver kube-controller-manager kube-scheduler kubelet etcd kubectl
#     gocache/  Go's build cache (~1.4 GB): a rebuild after a lost binary takes seconds
#
# If every binary is there, this prints the bin directory and exits without touching the
# network. Otherwise it installs what the build needs (golang-go, rsync, make, dpkg-dev,
# golang-github-modern-go-reflect2-dev), fetches the sources through a private APT
# configuration (the system's sources are left alone), builds (cold: ~10-14 min on 2
# cores) and removes the source tree. Idempotent; concurrent runs wait on a lock.
# Must run as root (it installs Debian packages and writes /var/cache).
#
# The test harness (tests/support/control_plane.rs) looks for the binaries in the same
# place: keep KUBE_VERSION in step with its KUBE_VERSION.
set -euo pipefail

# What Debian bookworm ships: the upstream v1.20.2 tree (with vendor/) under this version.
KUBE_VERSION=1.20.2
KUBE_DEB_VERSION=1.20.5+really1.20.2-1.1+deb12u1
ETCD_DEB_VERSION=3.4.23-4+b4
# A snapshot of the archive that holds exactly these versions, for when the mirror has
# moved on to newer ones.
SNAPSHOT=http://snapshot.debian.org/archive/debian/20250520T000000Z

CACHE_ROOT=${ZMESH_KUBE_CACHE:-/var/cache/zmesh}
CACHE=$CACHE_ROOT/kubernetes-$KUBE_VERSION
BIN=$CACHE/bin
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubelet etcd kubectl)

say() { echo "zmesh control plane: $*" >&2; }

complete() {
  local b
  for b in "${BINARIES[@]}"; do
    [ -x "$BIN/$b" ] || return 1
  done
}

if complete; then
  echo "$BIN"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  say "run as root (installs Debian packages, writes $CACHE_ROOT)"
  exit 1
fi

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
if ! flock -n 9; then
  say "another run is building in $CACHE; waiting for it"
  flock 9
fi
if complete; then
  echo "$BIN"
  exit 0
fi

started=$(date +%s)

# Build tools (Go 1.19 from Debian; reflect2 replaces the vendored one, see below).
packages=(golang-go golang-github-modern-go-reflect2-dev rsync make dpkg-dev ca-certificates)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# A fixed path: Go's cache keys include the source tree's path (-trimpath flags).
work=$CACHE/build
rm -rf "$work"
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT

# A private APT configuration: its own sources, lists and archive cache under $work.
apt_private() {
  local mirror=$1 dir=$work/apt
  mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial"
  cat >"$dir/sources.list" <<EOF
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror bookworm main
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror bookworm main
EOF
  APT=(apt-get -q
    -o "Dir::Etc::SourceList=$dir/sources.list"
    -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::State::Lists=$dir/lists"
    -o "Dir::Cache=$dir/cache"
    -o "Acquire::Check-Valid-Until=false"
    -o "APT::Sandbox::User=root")
  "${APT[@]}" update >/dev/null
}

fetch() {
  mkdir -p "$work/src" "$work/debs"
  (cd "$work/src" && "${APT[@]}" source --download-only "kubernetes=$KUBE_DEB_VERSION") >/dev/null &&
    (cd "$work/debs" && "${APT[@]}" download "etcd-server=$ETCD_DEB_VERSION" "kubernetes-client=$KUBE_DEB_VERSION") >/dev/null
}

say "fetching kubernetes $KUBE_DEB_VERSION (source) and etcd $ETCD_DEB_VERSION"
apt_private http://deb.debian.org/debian
if ! fetch; then
  say "deb.debian.org no longer has these versions; trying $SNAPSHOT"
  rm -rf "$work/apt" "$work/src" "$work/debs"
  apt_private "$SNAPSHOT"
  fetch
fi

# etcd and kubectl: extracted, not installed (installing etcd-server starts a service).
for deb in "$work"/debs/*.deb; do
  dpkg-deb -x "$deb" "$work/root"
done

# kube-apiserver and kube-controller-manager from source.
(cd "$work/src" && dpkg-source --no-check -x ./*.dsc tree) >/dev/null
tree=$work/src/tree
# The vendored reflect2 1.0.1 crashes at run time when built with Go >= 1.18; Debian's
# 1.0.2 is API-compatible.
rm -rf "$tree/vendor/github.com/modern-go/reflect2"
cp -a /usr/share/gocode/src/github.com/modern-go/reflect2 "$tree/vendor/github.com/modern-go/reflect2"
# The build sets GOCACHE=_output/local/go/cache: point that at the kept cache.
mkdir -p "$CACHE/gocache" "$tree/_output/local/go"
ln -s "$CACHE/gocache" "$tree/_output/local/go/cache"
say "building kube-apiserver, kube-controller-manager, kube-scheduler and kubelet (cold: ~8-12 min on 2 cores)"
(
  cd "$tree"
  export GOFLAGS=-tags=providerless GOTOOLCHAIN=local
  make WHAT=cmd/kube-apiserver
  make WHAT=cmd/kube-controller-manager
  make WHAT=cmd/kube-scheduler
  make WHAT=cmd/kubelet
) >"$work/build.log" 2>&1 || {
  tail -n 40 "$work/build.log" >&2
  say "build failed (log above)"
  exit 1
}

# Install atomically: a binary is either complete or absent.
mkdir -p "$BIN"
install_bin() {
  install -m 0755 "$1" "$BIN/.$2.tmp"
  mv -f "$BIN/.$2.tmp" "$BIN/$2"
}
built=$tree/_output/local/bin/linux/$(go env GOARCH)
install_bin "$built/kube-apiserver" kube-apiserver
install_bin "$built/kube-controller-manager" kube-controller-manager
install_bin "$built/kube-scheduler" kube-scheduler
install_bin "$built/kubelet" kubelet
install_bin "$work/root/usr/bin/etcd" etcd
install_bin "$work/root/usr/bin/kubectl" kubectl
complete
say "built in $(($(date +%s) - started)) s: $("$BIN/kube-apiserver" --version)"
echo "$BIN"
