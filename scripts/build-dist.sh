#!/usr/bin/env bash
# Builds what the container image ships, exactly as the Dockerfile's build stage does (it
# runs this script): `zmesh` (no `demo` feature: a node's binary carries no test harness)
# and `zmesh-cni`, profile `dist` (fat LTO, what BENCHMARKS.md measured), from Cargo.lock.
# Copies both into OUT_DIR (default: dist/), without debug info. Needs clang-19 and
# libbpf-dev (the eBPF programs); ~10-14 min cold on 2 cores. Honours CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-dist}

cargo build --locked --profile dist -p zmesh -p zmesh-cni --bin zmesh --bin zmesh-datapath --bin zmesh-cni

target=${CARGO_TARGET_DIR:-target}
mkdir -p "$out"
install -m 0755 "$target/dist/zmesh" "$target/dist/zmesh-datapath" "$target/dist/zmesh-cni" "$out/"
# The profile keeps line tables (release's debug = 1) for local profiling; the image does
# not need them (~120 MB of the binary's size). Symbols stay, for backtraces.
strip --strip-debug "$out/zmesh" "$out/zmesh-datapath" "$out/zmesh-cni"
echo "$out/zmesh $out/zmesh-datapath $out/zmesh-cni"
