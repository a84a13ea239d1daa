#!/usr/bin/env bash
# Benchmarks the zmesh data path on this machine: direct TCP vs. client -> zmesh proxy A
# -> HBONE/mTLS -> zmesh proxy B -> server, both proxies as separate processes, all on
# 127.0.0.0/8. Prints a table of figures, mesh/direct ratios and the targets (see
# BENCHMARKS.md). Arguments go to zmesh-bench, e.g.:
#   scripts/bench.sh --rounds 3 --seconds 5 --json /tmp/bench.json
# With ZTUNNEL_BIN set (a stock ztunnel built with its `testing` feature; the project never
# builds one) and as root, it then runs zmesh and that ztunnel side by side on one topology
# (two network namespaces, nftables capture, plus the relay floors; zmesh-sidebyside, 3
# rounds), then on their own paths (zmesh's agent with eBPF redirection against ztunnel in
# in-pod mode on the lab's cluster; zmesh-podbench, 3 rounds), and prints both tables.
set -euo pipefail
cd "$(dirname "$0")/.."

# The `dist` profile is what a node runs (fat LTO); the first build takes several minutes.
cargo build --profile dist -p zmesh -p zmesh-bench
target/dist/zmesh-bench --zmesh target/dist/zmesh "$@"
if [ -n "${ZTUNNEL_BIN:-}" ]; then
  target/dist/zmesh-sidebyside --zmesh-datapath target/dist/zmesh-datapath --ztunnel "$ZTUNNEL_BIN" --rounds 3
  target/dist/zmesh-podbench --zmesh target/dist/zmesh --ztunnel "$ZTUNNEL_BIN" --rounds 3
fi
