#!/usr/bin/env bash
# The whole test suite: local services up, then unit, property and integration tests (the
# integration tests talk to the real Cassandra and Kafka started here; none are skipped).
# Extra arguments go to `cargo test`, e.g. `deploy/local/test.sh kill_9`.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
# The module graph stays acyclic (a cycle fails the run before anything is built).
python3 deploy/local/acyclic.py --self-test
python3 deploy/local/acyclic.py
if [[ "${CI:-}" == "true" ]]; then
  # CI leaves nothing running behind it.
  trap 'deploy/local/stack.sh down || true' EXIT
fi
# The build's system packages first; then the services are fetched and started while the tests
# compile (on a fresh machine both take minutes), and the tests run once both are done.
deploy/local/stack.sh packages
stack_log="$(mktemp)"
deploy/local/stack.sh up >"$stack_log" 2>&1 &
stack_pid=$!
cargo test --release --locked --features devkit --no-run "$@" || {
  wait "$stack_pid" || true
  exit 101
}
if ! wait "$stack_pid"; then
  cat "$stack_log" >&2
  echo "the local services did not start (see above)" >&2
  exit 1
fi
cat "$stack_log"
rm -f "$stack_log"
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
