#!/usr/bin/env bash
# Runs a Python client against a gateway: a virtualenv with grpcio and cassandra-driver
# (requirements.txt) in .state/python-venv, client code generated from proto/ into
# .state/python-grpc, then `example.py TABLE [ENDPOINT]` — or, with a script first,
# `run.sh shard_aware.py TABLE [ENDPOINT] [ROWS]`. Used by the test suite; runnable by hand.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
venv="$repo/.state/python-venv"
generated="$repo/.state/python-grpc"
if [[ ! -x "$venv/bin/python" ]]; then
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import grpc, grpc_tools, cassandra" 2>/dev/null; then
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt"
fi
mkdir -p "$generated"
"$venv/bin/python" -m grpc_tools.protoc -I "$repo/proto" --python_out="$generated" --grpc_python_out="$generated" \
  "$repo"/proto/shardgate/v1/*.proto
script="example.py"
if [[ "${1:-}" == *.py ]]; then
  script="$1"
  shift
fi
PYTHONPATH="$generated:$here" exec "$venv/bin/python" "$here/$script" "$@"
