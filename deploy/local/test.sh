#!/usr/bin/env bash
# The whole test suite: local services up, then unit, property and integration tests (the
# integration tests talk to the real Cassandra and Kafka started here; none are skipped).
# Extra arguments go to `cargo test`, e.g. `deploy/local/test.sh kill_9`.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
deploy/local/stack.sh up
if [[ "${CI:-}" == "true" ]]; then
  # CI leaves nothing running behind it.
  trap 'deploy/local/stack.sh down || true' EXIT
fi
cargo test --release --locked "$@"
