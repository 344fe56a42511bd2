#!/usr/bin/env bash
# The demo: local services up, gateway built and serving a sample config, sample orders fed
# through Kafka (plus malformed messages), live progress, and every row verified in Cassandra.
#   deploy/local/demo.sh [--messages N] [--partitions P] [--malformed M]
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
deploy/local/stack.sh up
echo "[demo] building shardgate (release; the first build takes several minutes)"
cargo build --release --locked --features devkit --bins
exec target/release/shardgate-demo --gateway target/release/shardgate --work-dir .state/demo "$@"
