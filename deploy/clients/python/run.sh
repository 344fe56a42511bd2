#!/usr/bin/env bash
# Runs the Python example against a gateway: a virtualenv with grpcio (requirements.txt) in
# .state/python-venv, stubs generated from proto/ into .state/python-stubs, then
# `example.py TABLE [ENDPOINT]`. Used by the test suite; runnable by hand the same way.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
venv="$repo/.state/python-venv"
stubs="$repo/.state/python-stubs"
if [[ ! -x "$venv/bin/python" ]]; then
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import grpc, grpc_tools" 2>/dev/null; then
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt"
fi
mkdir -p "$stubs"
"$venv/bin/python" -m grpc_tools.protoc -I "$repo/proto" --python_out="$stubs" --grpc_python_out="$stubs" \
  "$repo"/proto/shardgate/v1/*.proto
PYTHONPATH="$stubs" exec "$venv/bin/python" "$here/example.py" "$@"
