#!/usr/bin/env bash
# The whole test suite: local services up, then unit, property and integration tests (the
# integration tests talk to the real Cassandra and Kafka started here; none are skipped).
# Extra arguments go to `cargo test`, e.g. `deploy/local/test.sh kill_9`.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
deploy/local/stack.sh up
# The module graph stays acyclic (a cycle fails the run before anything is built).
python3 deploy/local/acyclic.py --self-test
python3 deploy/local/acyclic.py
if [[ "${CI:-}" == "true" ]]; then
  # CI leaves nothing running behind it.
  trap 'deploy/local/stack.sh down || true' EXIT
fi
log="$(mktemp)"
set +e
cargo test --release --locked --features devkit "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line over every test binary, e.g. "tests: 45 passed, 0 failed".
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
rm -f "$log"
exit "$status"
