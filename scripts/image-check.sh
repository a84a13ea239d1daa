#!/usr/bin/env bash
# What CI can check of the Dockerfile without a container builder (none runs here: no
# dockerd, buildah or podman). It does not build the image. It checks that:
#
#   1. the Dockerfile's build stage runs scripts/build-dist.sh, on the Rust version the
#      workspace declares and the Debian release of this machine (so what is built and
#      linked here is what the image's build stage gets), with its build packages installed;
#   2. scripts/build-dist.sh builds (the same command, profile and features as the image);
#   3. every shared library the two binaries load (ldd) comes from a Debian package of the
#      runtime stage's list, and so do the programs the agent runs (`ip`, `nft`);
#   4. the binaries run: the CLI without the `demo` harness, `zmesh-cni` answering VERSION,
#      and the CA creating its state and reading it back as user 65532, the image's
#      (non-root) user.
#
# The dist build (fat LTO, 10-14 min cold on 2 cores) goes to $DIST_TARGET_DIR (default
# /var/cache/zmesh/dist-target), so a machine pays it once per change. Must run as root
# (step 4 switches to user 65532).
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "image check: $*" >&2; exit 1; }
say() { echo "image check: $*" >&2; }

arg() { # the value of `ARG NAME=value` (quotes removed) in the Dockerfile
  local value
  value=$(sed -n "s/^ARG $1=//p" Dockerfile | head -n1)
  [ -n "$value" ] || fail "Dockerfile: no ARG $1=..."
  value=${value#\"}
  echo "${value%\"}"
}

# 1. The build stage is this machine's build.
rust_version=$(arg RUST_VERSION)
debian=$(arg DEBIAN)
build_packages=$(arg BUILD_PACKAGES)
runtime_packages=$(arg RUNTIME_PACKAGES)
grep -q '^FROM docker.io/library/rust:${RUST_VERSION}-${DEBIAN} AS build' Dockerfile ||
  fail "Dockerfile: the build stage is not FROM rust:\${RUST_VERSION}-\${DEBIAN}"
grep -q '^FROM docker.io/library/debian:${DEBIAN}-slim' Dockerfile ||
  fail "Dockerfile: the runtime stage is not FROM debian:\${DEBIAN}-slim"
grep -q 'bash scripts/build-dist.sh /out$' Dockerfile ||
  fail "Dockerfile: the build stage does not run scripts/build-dist.sh /out"
workspace_rust=$(sed -n 's/^rust-version = "\(.*\)"/\1/p' Cargo.toml)
[ "$rust_version" = "$workspace_rust" ] ||
  fail "Dockerfile RUST_VERSION=$rust_version, the workspace's rust-version is $workspace_rust"
rustc_version=$(rustc --version | awk '{print $2}')
case "$rustc_version" in
  "$rust_version" | "$rust_version".*) ;;
  *) fail "this machine's rustc is $rustc_version, the image's build stage uses $rust_version" ;;
esac
# shellcheck disable=SC1091
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
[ "$codename" = "$debian" ] ||
  fail "this machine is Debian '$codename', the image's stages are '$debian': the libraries checked here would not be the image's"
for p in $build_packages; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
    fail "build package $p is not installed here (bash scripts/setup.sh)"
done
say "Dockerfile: rust $rust_version on $debian (rustc $rustc_version here), build packages: $build_packages"

# 2. Build as the image's build stage does.
export CARGO_TARGET_DIR=${DIST_TARGET_DIR:-/var/cache/zmesh/dist-target}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
started=$(date +%s)
bash scripts/build-dist.sh "$out" >/dev/null
say "scripts/build-dist.sh: $(($(date +%s) - started)) s; $(du -h "$out/zmesh" | cut -f1) zmesh, $(du -h "$out/zmesh-datapath" | cut -f1) zmesh-datapath, $(du -h "$out/zmesh-cni" | cut -f1) zmesh-cni"

# 3. Libraries and programs come from the runtime stage's packages.
in_runtime() { [[ " $runtime_packages " == *" $1 "* ]]; }
package_of() { # the Debian package that ships FILE (merged /usr: /lib is /usr/lib, ...)
  local file=$1 candidate p=""
  for candidate in "$file" "$(readlink -f "$file")"; do
    for candidate in "$candidate" "/usr$candidate" "${candidate#/usr}"; do
      p=$(dpkg -S "$candidate" 2>/dev/null) && break 2
    done
  done
  [ -n "$p" ] || fail "no Debian package ships $file"
  p=${p%%:*}
  echo "${p%%,*}"
}
for binary in zmesh zmesh-datapath zmesh-cni; do
  ldd "$out/$binary" >"$out/ldd" || fail "ldd $binary failed"
  if grep -q 'not found' "$out/ldd"; then
    fail "$binary: $(grep 'not found' "$out/ldd")"
  fi
  libs=()
  while read -r lib; do
    package=$(package_of "$lib")
    in_runtime "$package" || fail "$binary loads $lib from package $package, which the runtime stage does not install (RUNTIME_PACKAGES: $runtime_packages)"
    libs+=("$(basename "$lib")<-$package")
  done < <(awk '/=>/ {print $3} /^[[:space:]]*\/[^ ]+ \(/ {print $1}' "$out/ldd")
  [ ${#libs[@]} -gt 0 ] || fail "ldd listed no library for $binary (static? then this check needs rethinking)"
  say "$binary links ${libs[*]}"
done
# The programs the agent executes: `ip` (agent/src/steering.rs, redirect-bpf/src/sys.rs,
# agent/src/inpod.rs) and `nft` (agent/src/inpod.rs).
for program in ip nft; do
  path=$(command -v "$program") || fail "$program is not installed here"
  package=$(package_of "$path")
  in_runtime "$package" || fail "the agent runs $program (package $package), which the runtime stage does not install"
done
say "ip and nft come from $(package_of "$(command -v ip)") and $(package_of "$(command -v nft)")"

# 4. The binaries run; the CA as the image's user.
"$out/zmesh" --help >/dev/null || fail "zmesh --help failed"
if "$out/zmesh" demo --help >/dev/null 2>&1; then
  fail "the image's zmesh has the demo harness (built with --features demo)"
fi
"$out/zmesh-datapath" --socket /var/run/zmesh/datapath.sock --dry-run >/dev/null ||
  fail "zmesh-datapath --dry-run failed"
version=$(CNI_COMMAND=VERSION "$out/zmesh-cni" </dev/null) || fail "zmesh-cni VERSION failed"
grep -q '"supportedVersions"' <<<"$version" || fail "zmesh-cni VERSION answered: $version"
chmod 0755 "$out" "$out/zmesh"
state=$(mktemp -d)
chown 65532:65532 "$state"
as_nonroot() { setpriv --reuid 65532 --regid 65532 --clear-groups -- "$@"; }
as_nonroot "$out/zmesh" ca init --state-dir "$state/state" --if-missing >/dev/null ||
  { rm -rf "$state"; fail "zmesh ca init as user 65532 failed"; }
as_nonroot "$out/zmesh" ca status --state-dir "$state/state" >/dev/null ||
  { rm -rf "$state"; fail "zmesh ca status (reading the CA's keys) as user 65532 failed"; }
as_nonroot "$out/zmesh" ca serve --state-dir "$state/state" --kubernetes --bearer=kubernetes --dry-run >/dev/null ||
  { rm -rf "$state"; fail "zmesh ca serve --dry-run as user 65532 failed"; }
owner=$(stat -c %u "$state/state")
rm -rf "$state"
[ "$owner" = 65532 ] || fail "the CA state was created by uid $owner, not 65532"
say "zmesh runs without the demo harness, zmesh-datapath parses its flags, zmesh-cni answers VERSION, the CA inits, reads its keys and parses its flags as uid 65532"
say "ok (no image was built: no container builder on this machine)"
