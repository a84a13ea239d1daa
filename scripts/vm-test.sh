#!/usr/bin/env bash
# Runs the eBPF redirection tests and the demo on Debian's own kernels, each booted in a
# QEMU VM (TCG: no KVM needed), as a node on that distribution would run zmesh:
#
#   bookworm  Debian 12, Linux 6.1 (no TCX: tc ingress is a clsact filter): `zmesh check`,
#             the redirection tests and the demo (permissive and strict) must pass
#   bullseye  Debian 11, Linux 5.10, below zmesh's floor (5.14: no SO_NETNS_COOKIE): `zmesh
#             check` and the demo must refuse it at once, naming the missing feature
#
# (deb.debian.org offers no 5.15 kernel any more: bullseye-backports, which had one, moved
# to archive.debian.org, which this machine cannot reach.) Usage: scripts/vm-test.sh [SUITE...]  (default: both; also
# ZMESH_VM_SUITES). Needs the test build first (scripts/test.sh runs it after cargo test).
#
# Everything comes from Debian's packages, fetched with apt through an apt configuration
# of its own (the machine's sources are not touched, nothing is installed): the kernel
# image, qemu-system-x86 7.2 and the libraries this machine lacks, busybox-static. The
# slow parts are cached outside the clone, keyed by package version, built only when
# missing: /var/cache/zmesh/vm/{apt,kernel,qemu,busybox,initramfs-base}. The guest's root
# is an initramfs: busybox, this machine's bash/iproute2/nftables/netcat/tcpdump/bpftool/
# procps with their libraries, the kernel's modules, zmesh and the redirect tests (debug
# builds, stripped), examples/demo, and scripts/vm/init, which runs the steps and reports.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

CACHE=${ZMESH_VM_CACHE:-/var/cache/zmesh/vm}
SUITES=("$@")
if [ ${#SUITES[@]} -eq 0 ]; then
  read -r -a SUITES <<<"${ZMESH_VM_SUITES:-bookworm bullseye}"
fi
VM_TIMEOUT=${ZMESH_VM_TIMEOUT:-900}
# The guest's init says "zmesh-vm: up" about 4 s after QEMU starts (TCG). Seen once in CI:
# a boot that printed nothing at all for the whole VM_TIMEOUT while the next VM came up in
# 4 s. A guest silent this long is killed and booted once more, saying so; the steps'
# results are never retried.
BOOT_TIMEOUT=${ZMESH_VM_BOOT_TIMEOUT:-300}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
# modules the guest loads, in this order, with their dependencies: pod veths, the
# testbed's bridge, the clsact qdisc and bpf classifier, and the nftables DNAT that plays
# kube-proxy in the lab (conntrack needs crc32c, which libcrc32c only asks for by alias)
MODULES=(veth bridge sch_ingress cls_bpf crc32c_generic nf_tables nft_chain_nat nft_nat
  nft_numgen nft_reject nft_reject_ipv4 nft_reject_inet nf_conntrack)
# busybox applets the guest gets (ip, tc, sysctl and nc come from this machine instead)
APPLETS=(sh mount umount mkdir ln cat echo cut awk grep head tail sleep poweroff sync
  modprobe insmod lsmod depmod uname nproc ls rm cp mv dmesg sed tr sort uniq wc timeout
  env true false basename dirname mktemp readlink id printf test '[' ps kill chmod touch
  find xargs hostname seq stat)
# programs zmesh, its tests and the demo run, taken from this machine with their libraries
HOST_TOOLS=(bash ip tc nft nc tcpdump bpftool sysctl ss)
# what the guest must show on each suite's kernel (scripts/vm/init reads it from the
# kernel command line): "supported" runs everything, "below-floor" expects a refusal
declare -A EXPECT=([bookworm]=supported [bullseye]=below-floor)

log() { echo "vm-test: $*" >&2; }
die() {
  log "$*"
  exit 1
}

[ "$(id -u)" -eq 0 ] || die "run as root"
for tool in apt-get apt-cache dpkg-deb xz strip flock ldd cargo; do
  command -v "$tool" >/dev/null || die "$tool is missing (scripts/setup.sh installs it)"
done
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9 # one builder of the cache at a time

# ---------------------------------------------------------------- apt, on its own
# An apt configuration per suite under $CACHE/apt: the suite and its security updates.
apt_dir() { echo "$CACHE/apt/$1"; }
apt_opts() {
  local d
  d=$(apt_dir "$1")
  echo "-o Dir::Etc=$d/etc -o Dir::Etc::SourceList=$d/etc/sources.list" \
    "-o Dir::Etc::SourceParts=$d/etc/sources.list.d -o Dir::Etc::Preferences=$d/etc/preferences" \
    "-o Dir::Etc::PreferencesParts=$d/etc/preferences.d -o Dir::State=$d/state" \
    "-o Dir::Cache=$d/cache -o Dir::State::status=/var/lib/dpkg/status" \
    "-o APT::Sandbox::User=root -o Debug::NoLocking=1"
}
# shellcheck disable=SC2046
apt_get() {
  local suite=$1
  shift
  apt-get $(apt_opts "$suite") -qq "$@"
}
# shellcheck disable=SC2046
apt_cache() {
  local suite=$1
  shift
  apt-cache $(apt_opts "$suite") "$@"
}
apt_update() {
  local suite=$1 d
  d=$(apt_dir "$suite")
  mkdir -p "$d/etc/sources.list.d" "$d/etc/preferences.d" "$d/state/lists/partial" \
    "$d/cache/archives/partial"
  cat >"$d/etc/sources.list" <<EOF
deb [signed-by=$KEYRING] http://deb.debian.org/debian $suite main
deb [signed-by=$KEYRING] http://deb.debian.org/debian-security $suite-security main
EOF
  # the package lists are refreshed once a day (kernels get security updates)
  if [ -z "$(find "$d/state/lists" -maxdepth 1 -name '*Packages*' -mmin -1440 2>/dev/null)" ]; then
    log "apt update ($suite)"
    apt_get "$suite" update || [ -n "$(find "$d/state/lists" -maxdepth 1 -name '*Packages*')" ] ||
      die "apt update for $suite failed and no earlier lists are cached"
  fi
}
version_of() { apt_cache "$1" show --no-all-versions "$2" | sed -n 's/^Version: //p' | head -1; }
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

# Downloads packages of $suite into $dir (a fresh directory) and unpacks them into $dir/root.
fetch_unpack() {
  local suite=$1 dir=$2
  shift 2
  mkdir -p "$dir/debs" "$dir/root"
  (cd "$dir/debs" && apt_get "$suite" download "$@")
  for deb in "$dir"/debs/*.deb; do dpkg-deb -x "$deb" "$dir/root"; done
  rm -rf "$dir/debs"
}

# ---------------------------------------------------------------- qemu (bookworm's 7.2)
# qemu-system-x86 and the libraries of its dependency closure this machine does not have;
# installing it would replace this machine's newer qemu-utils.
qemu_dir() {
  local version dir tmp
  version=$(version_of bookworm qemu-system-x86)
  dir="$CACHE/qemu/${version//:/_}"
  if [ ! -e "$dir/.done" ]; then
    log "qemu $version: fetching"
    tmp=$(mktemp -d "$CACHE/qemu-tmp.XXXXXX")
    local queue=(qemu-system-x86) seen=" qemu-system-x86 " pkgs=(qemu-system-x86 qemu-system-common qemu-system-data)
    while [ ${#queue[@]} -gt 0 ]; do
      local pkg=${queue[0]}
      queue=("${queue[@]:1}")
      local dep
      for dep in $(apt_cache bookworm depends --no-recommends --no-suggests --no-conflicts \
        --no-breaks --no-replaces --no-enhances "$pkg" | sed -n 's/^ *Depends: \([^ <]*\).*/\1/p'); do
        case "$dep" in qemu-system-* | seabios | ipxe-qemu) continue ;; esac
        [[ $seen == *" $dep "* ]] && continue
        seen+="$dep "
        installed "$dep" && continue
        pkgs+=("$dep")
        queue+=("$dep")
      done
    done
    fetch_unpack bookworm "$tmp" "${pkgs[@]}"
    local missing
    missing=$(qemu_env "$tmp/root" ldd "$tmp/root/usr/bin/qemu-system-x86_64" | grep "not found" || true)
    [ -z "$missing" ] || die "qemu lacks libraries: $missing"
    rm -rf "$dir"
    mkdir -p "$(dirname "$dir")"
    mv "$tmp/root" "$dir"
    rm -rf "$tmp"
    touch "$dir/.done"
  fi
  echo "$dir"
}
qemu_env() {
  local root=$1
  shift
  LD_LIBRARY_PATH="$root/usr/lib/x86_64-linux-gnu:$root/lib/x86_64-linux-gnu" \
    QEMU_MODULE_DIR="$root/usr/lib/x86_64-linux-gnu/qemu" "$@"
}

# ---------------------------------------------------------------- busybox-static
busybox_bin() {
  local version dir tmp
  version=$(version_of bookworm busybox-static)
  dir="$CACHE/busybox/${version//:/_}"
  if [ ! -e "$dir/.done" ]; then
    log "busybox $version: fetching"
    tmp=$(mktemp -d "$CACHE/busybox-tmp.XXXXXX")
    fetch_unpack bookworm "$tmp" busybox-static
    mkdir -p "$dir"
    cp "$tmp/root/bin/busybox" "$dir/busybox"
    rm -rf "$tmp"
    touch "$dir/.done"
  fi
  echo "$dir/busybox"
}

# ---------------------------------------------------------------- the kernel of a suite
# $CACHE/kernel/<package>_<version>_<modules>/: vmlinux (uncompressed, booted through qboot's PVH
# entry), release, and modules.cpio (the modules the guest needs, with their
# dependencies and busybox depmod's index).
kernel_dir() {
  local suite=$1 busybox=$2 pkg version dir tmp release
  pkg=$(apt_cache "$suite" depends linux-image-amd64 | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*\).*/\1/p' | head -1)
  [ -n "$pkg" ] || die "no linux-image-amd64 in $suite"
  version=$(version_of "$suite" "$pkg")
  # keyed by the module list too: another list is another subset
  dir="$CACHE/kernel/${pkg}_${version//:/_}_$(echo "${MODULES[*]}" | sha256sum | cut -c1-8)"
  if [ ! -e "$dir/.done" ]; then
    log "kernel $pkg $version ($suite): fetching"
    tmp=$(mktemp -d "$CACHE/kernel-tmp.XXXXXX")
    fetch_unpack "$suite" "$tmp" "$pkg"
    release=$(ls "$tmp/root/lib/modules")
    local vmlinuz=$tmp/root/boot/vmlinuz-$release offset
    offset=$(grep -abo $'\xfd7zXZ\x00' "$vmlinuz" | head -1 | cut -d: -f1)
    [ -n "$offset" ] || die "$vmlinuz: no xz payload"
    tail -c +$((offset + 1)) "$vmlinuz" | xz -dcq >"$tmp/vmlinux" 2>/dev/null || true
    [ "$(head -c 4 "$tmp/vmlinux" | od -An -c | tr -d ' ')" = "177ELF" ] || die "cannot unpack $vmlinuz"
    # dependency closure of the wanted modules, from busybox depmod over the whole tree
    local mods=$tmp/root/lib/modules/$release
    "$busybox" depmod -b "$tmp/root" "$release"
    local closure=() queue=() m
    for m in "${MODULES[@]}"; do
      local path
      path=$(grep -m1 "/${m}\.ko:" "$mods/modules.dep" | cut -d: -f1)
      [ -n "$path" ] || die "$release has no module $m"
      queue+=("$path")
    done
    local seen=" "
    while [ ${#queue[@]} -gt 0 ]; do
      m=${queue[0]}
      queue=("${queue[@]:1}")
      [[ $seen == *" $m "* ]] && continue
      seen+="$m "
      closure+=("$m")
      # shellcheck disable=SC2207
      queue+=($(grep -m1 "^$m:" "$mods/modules.dep" | cut -d: -f2))
    done
    local stage=$tmp/stage/lib/modules/$release
    mkdir -p "$stage"
    cp "$mods/modules.builtin" "$mods/modules.order" "$stage/"
    for m in "${closure[@]}"; do
      mkdir -p "$stage/$(dirname "$m")"
      cp "$mods/$m" "$stage/$m"
    done
    "$busybox" depmod -b "$tmp/stage" "$release"
    (cd "$tmp/stage" && find . -mindepth 1 | "$busybox" cpio -o -H newc 2>/dev/null) >"$tmp/modules.cpio"
    rm -rf "$dir"
    mkdir -p "$dir"
    mv "$tmp/vmlinux" "$tmp/modules.cpio" "$dir/"
    echo "$release" >"$dir/release"
    rm -rf "$tmp"
    touch "$dir/.done"
    log "kernel $release: ${#closure[@]} modules"
  fi
  echo "$dir"
}

# ---------------------------------------------------------------- the guest's base
# busybox applets, this machine's tools with their libraries, /etc: keyed by the versions
# of busybox and of the packages the tools come from, and by this script.
copy_with_libs() {
  local stage=$1 bin=$2 dest=$3 lib
  mkdir -p "$stage$(dirname "$dest")"
  cp -L "$bin" "$stage$dest"
  for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
    [ -e "$stage$lib" ] && continue
    mkdir -p "$stage$(dirname "$lib")"
    cp -L "$lib" "$stage$lib"
  done
}
base_cpio() {
  local busybox=$1 key tool path pkgs="" dir tmp
  for tool in "${HOST_TOOLS[@]}"; do
    path=$(command -v "$tool") || die "$tool is missing (scripts/setup.sh installs it)"
    path=$(readlink -f "$path")
    pkgs+="$(dpkg-query -W -f='${Package}=${Version} ' "$(dpkg -S "$path" 2>/dev/null | head -1 | cut -d: -f1)" 2>/dev/null || echo "$path")"
  done
  key=$({
    echo "$pkgs"
    sha256sum "$busybox" "$0" | cut -d' ' -f1
  } | sha256sum | cut -c1-16)
  dir="$CACHE/initramfs-base/$key"
  if [ ! -e "$dir/.done" ]; then
    log "initramfs base $key: building"
    tmp=$(mktemp -d "$CACHE/base-tmp.XXXXXX")
    local stage=$tmp/stage
    mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,run,root,zmesh}
    cp "$busybox" "$stage/bin/busybox"
    local applet
    for applet in "${APPLETS[@]}"; do ln -s busybox "$stage/bin/$applet"; done
    ln -s ../bin/busybox "$stage/sbin/modprobe"
    for tool in "${HOST_TOOLS[@]}"; do
      path=$(command -v "$tool")
      copy_with_libs "$stage" "$(readlink -f "$path")" "$path"
    done
    echo "root:x:0:0:root:/root:/usr/bin/bash" >"$stage/etc/passwd"
    echo "root:x:0:" >"$stage/etc/group"
    printf '127.0.0.1 localhost\n::1 localhost\n' >"$stage/etc/hosts"
    (cd "$stage" && find . -mindepth 1 | "$busybox" cpio -o -H newc 2>/dev/null) >"$tmp/base.cpio"
    mkdir -p "$dir"
    mv "$tmp/base.cpio" "$dir/"
    rm -rf "$tmp"
    touch "$dir/.done"
  fi
  echo "$dir/base.cpio"
}

# ---------------------------------------------------------------- this build
# zmesh (with the demo) and the redirect tests, as the test build made them.
run_cpio() {
  local busybox=$1 out=$2 stage json exe name
  stage=$(mktemp -d)
  mkdir -p "$stage/zmesh/tests" "$stage/zmesh/examples" "$stage/etc/zmesh-vm"
  json=$(cargo test --workspace --features zmesh/demo --locked --no-run --message-format=json 2>/dev/null)
  exe=$(grep '"reason":"compiler-artifact"' <<<"$json" | grep '"kind":\["bin"\]' |
    grep '"name":"zmesh"' | grep '"test":false' | grep -o '"executable":"[^"]*"' | cut -d'"' -f4 | head -1)
  [ -x "$exe" ] || die "no zmesh binary from the test build"
  copy_with_libs "$stage" "$exe" /zmesh/zmesh
  strip --strip-debug "$stage/zmesh/zmesh"
  while read -r exe; do
    name=$(basename "$exe")
    copy_with_libs "$stage" "$exe" "/zmesh/tests/${name%-*}"
    strip --strip-debug "$stage/zmesh/tests/${name%-*}"
  done < <(grep '"reason":"compiler-artifact"' <<<"$json" | grep 'redirect-bpf#' |
    grep '"test":true' | grep -o '"executable":"[^"]*"' | cut -d'"' -f4)
  [ -n "$(ls "$stage/zmesh/tests")" ] || die "no redirect test binaries from the test build"
  cp -r "$repo/examples/demo" "$stage/zmesh/examples/"
  printf '%s\n' "${MODULES[@]}" >"$stage/etc/zmesh-vm/modules"
  cp "$repo/scripts/vm/init" "$stage/init"
  chmod +x "$stage/init"
  (cd "$stage" && find . -mindepth 1 | "$busybox" cpio -o -H newc 2>/dev/null) >"$out"
  rm -rf "$stage"
}

# ---------------------------------------------------------------- boot and run
# Boots the guest once, its console streamed and kept in $console. Returns QEMU's status,
# or 200 if the guest said nothing like "zmesh-vm: up" within BOOT_TIMEOUT (QEMU killed).
boot() {
  local kernel=$1 qemu=$2 initrd=$3 console=$4 expect=$5 qemu_pid tail_pid waited=0 rc=0
  : >"$console"
  # env execs timeout, so $! is timeout's pid: a TERM to it reaches QEMU.
  env LD_LIBRARY_PATH="$qemu/usr/lib/x86_64-linux-gnu:$qemu/lib/x86_64-linux-gnu" \
    QEMU_MODULE_DIR="$qemu/usr/lib/x86_64-linux-gnu/qemu" \
    timeout "$VM_TIMEOUT" "$qemu/usr/bin/qemu-system-x86_64" \
    -L "$qemu/usr/share/qemu" -bios qboot.rom -machine pc -accel tcg -cpu max -smp 2 -m 2048 \
    -nodefaults -display none -no-reboot -serial stdio \
    -kernel "$kernel/vmlinux" -initrd "$initrd" \
    -append "console=ttyS0 rdinit=/init panic=-1 quiet loglevel=3 random.trust_cpu=on zmesh_vm_expect=$expect" \
    </dev/null >"$console" 2>&1 &
  qemu_pid=$!
  tail -n +1 -f --pid="$qemu_pid" "$console" &
  tail_pid=$!
  while kill -0 "$qemu_pid" 2>/dev/null && ! grep -aq 'zmesh-vm: up' "$console"; do
    if [ "$waited" -ge "$BOOT_TIMEOUT" ]; then
      kill "$qemu_pid" 2>/dev/null || true
      wait "$qemu_pid" || true
      wait "$tail_pid" || true
      return 200
    fi
    sleep 1 # a watchdog's poll: the guest's progress is only visible in the file
    waited=$((waited + 1))
  done
  wait "$qemu_pid" || rc=$?
  wait "$tail_pid" || true
  return "$rc"
}

run_suite() {
  local suite=$1 kernel=$2 qemu=$3 base=$4 run=$5 initrd console start rc=0 release
  release=$(cat "$kernel/release")
  initrd=$(mktemp /tmp/zmesh-vm-initrd.XXXXXX)
  cat "$base" "$kernel/modules.cpio" "$run" >"$initrd"
  console=$(mktemp /tmp/zmesh-vm-console.XXXXXX)
  local expect=${EXPECT[$suite]:-supported}
  log "$suite: booting Linux $release ($expect; QEMU TCG, 2 vCPUs, 2 GiB), initramfs $(($(stat -c %s "$initrd") / 1048576)) MiB"
  start=$(date +%s)
  boot "$kernel" "$qemu" "$initrd" "$console" "$expect" || rc=$?
  if [ "$rc" -eq 200 ]; then
    log "$suite: no sign of life from the guest within ${BOOT_TIMEOUT}s: booting it once more"
    rc=0
    start=$(date +%s)
    boot "$kernel" "$qemu" "$initrd" "$console" "$expect" || rc=$?
    [ "$rc" -ne 200 ] || log "$suite: again no sign of life within ${BOOT_TIMEOUT}s"
  fi
  local elapsed=$(($(date +%s) - start)) steps failed
  rm -f "$initrd"
  steps=$(grep -a 'zmesh-vm: step .* exit=' "$console" | tr -d '\r' || true)
  failed=$(grep -v ' exit=0 ' <<<"$steps" || true)
  echo
  log "$suite, Linux $release: $(grep -a -o 'zmesh-vm: up: .*' "$console" | tr -d '\r' || echo "never came up")"
  while read -r line; do [ -n "$line" ] && log "  ${line#zmesh-vm: }"; done <<<"$steps"
  log "  the VM ran ${elapsed}s (qemu: exit $rc)"
  local finished=0
  grep -aq 'zmesh-vm: done' "$console" && finished=1
  rm -f "$console"
  [ "$finished" -eq 1 ] || {
    log "$suite: the VM did not finish its steps"
    return 1
  }
  [ -z "$failed" ]
}

# Everything cached is built under the lock; the VMs run without it.
for suite in "${SUITES[@]}" bookworm; do apt_update "$suite"; done # bookworm: qemu, busybox
QEMU=$(qemu_dir)
BUSYBOX=$(busybox_bin)
BASE=$(base_cpio "$BUSYBOX")
declare -A KERNEL
for suite in "${SUITES[@]}"; do KERNEL[$suite]=$(kernel_dir "$suite" "$BUSYBOX"); done
flock -u 9
RUN=$(mktemp /tmp/zmesh-vm-run.XXXXXX)
trap 'rm -f "$RUN"' EXIT
run_cpio "$BUSYBOX" "$RUN"

failed=()
for suite in "${SUITES[@]}"; do
  run_suite "$suite" "${KERNEL[$suite]}" "$QEMU" "$BASE" "$RUN" || failed+=("$suite")
done
[ ${#failed[@]} -eq 0 ] || die "failed on: ${failed[*]}"
log "passed on: ${SUITES[*]}"
