#!/usr/bin/env bash
# Prepares, once per machine, the container runtime the node tests run pods on
# (tests/support/node_runtime.rs): Debian bookworm's containerd, runc and CNI plugins, and
# two OCI image tarballs built here (nothing can be pulled: there is no registry).
# Everything goes to a cache outside the clone, keyed by the pinned versions below:
#
#   $ZMESH_NODE_RUNTIME_CACHE (default /var/cache/zmesh)/node-runtime-<key>/
#     bin/      containerd containerd-shim-runc-v2 ctr runc
#     cni/      the CNI plugins of containernetworking-plugins (bridge, host-local, loopback...)
#     images/   pause.tar     zmesh.test/pause:<key>: /pause, built from node-runtime/pause.c
#               workload.tar  zmesh.test/workload:<key>: busybox-static and its applets
#     versions  the Debian packages the binaries came from
#
# The packages are extracted (dpkg-deb -x), not installed: installing containerd enables
# its system service (and starts it on a machine that runs systemd), and the tests run
# their own containerd with a private configuration. The only packages installed are the
# build tools for the pause binary (gcc, libc6-dev) when missing.
#
# If the directory is complete, this prints its path and exits without touching the
# network. Idempotent; concurrent runs wait on a lock. Must run as root.
#
# The test harness derives the same path: keep KEY in step with RUNTIME_KEY in
# tests/support/node_runtime.rs.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

# The upstream versions Debian bookworm ships (any Debian revision of them will do).
CONTAINERD_VERSION=1.6.20
RUNC_VERSION=1.1.5
CNI_VERSION=1.1.1
BUSYBOX_VERSION=1.35.0
# Bump when the images, pause.c or the layout change (and RUNTIME_KEY in the harness).
REVISION=1
KEY=$CONTAINERD_VERSION-$REVISION

CACHE_ROOT=${ZMESH_NODE_RUNTIME_CACHE:-/var/cache/zmesh}
CACHE=$CACHE_ROOT/node-runtime-$KEY
FILES=(bin/containerd bin/containerd-shim-runc-v2 bin/ctr bin/runc
  cni/bridge cni/host-local cni/loopback images/pause.tar images/workload.tar versions)

say() { echo "zmesh node runtime: $*" >&2; }

complete() {
  local f
  for f in "${FILES[@]}"; do
    [ -e "$CACHE/$f" ] || return 1
  done
}

if complete; then
  echo "$CACHE"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  say "run as root (installs Debian packages, writes $CACHE_ROOT)"
  exit 1
fi

mkdir -p "$CACHE_ROOT"
exec 9>"$CACHE_ROOT/.node-runtime-$KEY.lock"
if ! flock -n 9; then
  say "another run is preparing $CACHE; waiting for it"
  flock 9
fi
if complete; then
  echo "$CACHE"
  exit 0
fi

started=$(date +%s)
work=$(mktemp -d "$CACHE_ROOT/.node-runtime-$KEY.XXXXXX")
trap 'rm -rf "$work"' EXIT

# The pause binary is static: gcc and the static libc.
missing=()
for p in gcc libc6-dev; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# name:upstream version; the .debs come from the system's APT sources.
packages=(containerd:$CONTAINERD_VERSION runc:$RUNC_VERSION
  containernetworking-plugins:$CNI_VERSION busybox-static:$BUSYBOX_VERSION)
download() {
  (cd "$work/debs" && apt-get -q -o APT::Sandbox::User=root download "${packages[@]%%:*}") >/dev/null
}
mkdir -p "$work/debs"
say "downloading ${packages[*]%%:*}"
if ! download; then
  apt-get update -qq
  download
fi
: >"$work/versions"
for entry in "${packages[@]}"; do
  name=${entry%%:*} want=${entry#*:}
  deb=$(echo "$work"/debs/"$name"_*.deb)
  version=$(dpkg-deb -f "$deb" Version)
  # Debian versions: [epoch:]upstream[~ds1|+ds1]-revision.
  upstream=${version#*:}
  case $upstream in
  "$want"[~+-]*) ;;
  *)
    say "$name is $version here, not $want: update the pinned versions (and the harness)"
    exit 1
    ;;
  esac
  echo "$name $version" >>"$work/versions"
  dpkg-deb -x "$deb" "$work/root"
done

out=$work/out
mkdir -p "$out/bin" "$out/cni" "$out/images"
cp "$work"/root/usr/bin/{containerd,containerd-shim-runc-v2,ctr} "$work/root/usr/sbin/runc" "$out/bin/"
cp "$work"/root/usr/lib/cni/* "$out/cni/"
mv "$work/versions" "$out/versions"

arch=$(dpkg --print-architecture)
tar_flags=(--sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --no-recursion)

# Adds a blob to the layout in $1 from file $2; prints "digest size".
blob() {
  local digest size
  digest=sha256:$(sha256sum "$2" | cut -d' ' -f1)
  size=$(stat -c %s "$2")
  mv "$2" "$1/blobs/sha256/${digest#sha256:}"
  echo "$digest $size"
}

# Writes an OCI image layout tarball $4 named zmesh.test/$1:$KEY: one uncompressed layer
# (the tree under $2), image config $3 (the "config" object of the image configuration).
oci_image() {
  local name=$1 rootfs=$2 config=$3 tarball=$4 dir layer layer_size cfg cfg_size man man_size
  dir=$(mktemp -d "$work/oci.XXXXXX")
  mkdir -p "$dir/blobs/sha256"
  (cd "$rootfs" && find . -mindepth 1 -printf '%P\n' | sort |
    tar "${tar_flags[@]}" -cf "$dir/layer" -T -)
  read -r layer layer_size < <(blob "$dir" "$dir/layer")
  printf '{"architecture":"%s","os":"linux","config":%s,"rootfs":{"type":"layers","diff_ids":["%s"]}}' \
    "$arch" "$config" "$layer" >"$dir/config"
  read -r cfg cfg_size < <(blob "$dir" "$dir/config")
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"%s","size":%s}]}' \
    "$cfg" "$cfg_size" "$layer" "$layer_size" >"$dir/manifest"
  read -r man man_size < <(blob "$dir" "$dir/manifest")
  printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"%s","size":%s,"platform":{"architecture":"%s","os":"linux"},"annotations":{"io.containerd.image.name":"zmesh.test/%s:%s","org.opencontainers.image.ref.name":"%s"}}]}' \
    "$man" "$man_size" "$arch" "$name" "$KEY" "$KEY" >"$dir/index.json"
  echo '{"imageLayoutVersion":"1.0.0"}' >"$dir/oci-layout"
  (cd "$dir" && find oci-layout index.json blobs | tar "${tar_flags[@]}" -cf "$tarball" -T -)
}

# pause: busybox cannot be it (see pause.c).
mkdir -p "$work/pause"
gcc -static -O2 -s -o "$work/pause/pause" "$here/node-runtime/pause.c"
oci_image pause "$work/pause" '{"Entrypoint":["/pause"]}' "$out/images/pause.tar"

# workload: busybox with a link per applet (sh, nc, sleep, wget, ip...).
rootfs=$work/workload
mkdir -p "$rootfs/bin" "$rootfs/etc" "$rootfs/root" "$rootfs/tmp"
chmod 1777 "$rootfs/tmp"
cp "$work/root/bin/busybox" "$rootfs/bin/busybox"
for applet in $("$rootfs/bin/busybox" --list-full); do
  [ "$applet" = bin/busybox ] && continue
  mkdir -p "$rootfs/$(dirname "$applet")"
  ln -sf /bin/busybox "$rootfs/$applet"
done
echo 'root:x:0:0:root:/root:/bin/sh' >"$rootfs/etc/passwd"
echo 'root:x:0:' >"$rootfs/etc/group"
oci_image workload "$rootfs" \
  '{"Cmd":["sh"],"Env":["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],"WorkingDir":"/"}' \
  "$out/images/workload.tar"

# Into place in one rename: the directory is either complete or absent.
rm -rf "$CACHE"
mv "$out" "$CACHE"
complete
say "prepared in $(($(date +%s) - started)) s: $(tr '\n' ' ' <"$CACHE/versions")"
echo "$CACHE"
