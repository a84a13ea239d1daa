#!/usr/bin/env bash
# The main job: builds zmesh and runs the local demo mesh (a small cluster in network
# namespaces on this machine). Must run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
cargo build --release --locked --features demo --bin zmesh
exec ./target/release/zmesh demo "$@"
