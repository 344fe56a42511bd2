"""shardgate from Python: write rows through the ingest API, get each back by key, scan the
table, and check that what comes back is what went in.

    deploy/clients/python/run.sh KEYSPACE.TABLE [HOST:PORT]

Against a gateway with `[ingest.tls]` and `[ingest.auth]`, set `SHARDGATE_CA_FILE` (PEM of the
CA its certificate chains to) and `SHARDGATE_TOKEN_FILE` (a file holding a principal's bearer
token): the channel is then TLS and every call carries `authorization: Bearer <token>`. The
principal needs `admin` here (the example's last call is a DELETE, which names no table through
its binds).

The table is `(id bigint PRIMARY KEY, name text, score double, at timestamp,
tags frozen<list<int>>)`, as the test suite creates it. The gRPC client code comes from proto/ (run.sh generates
it with grpcio-tools). Exits non-zero, saying why, on any difference.
"""

import os
import sys

import grpc

from shardgate.v1 import ingest_pb2, ingest_pb2_grpc, query_pb2, query_pb2_grpc, types_pb2

ROWS = 500


def row(i):
    """Row i: values in the order of COLUMNS."""
    return types_pb2.Row(
        values=[
            types_pb2.Value(int=i),
            types_pb2.Value(text=f"python-{i}"),
            types_pb2.Value(double=i * 0.25),
            types_pb2.Value(timestamp_ms=1_700_000_000_000 + i),
            types_pb2.Value(list=types_pb2.Values(values=[types_pb2.Value(int=i % 5), types_pb2.Value(int=7)])),
        ]
    )


COLUMNS = ["id", "name", "score", "at", "tags"]


def open_channel(endpoint):
    """Plaintext, or TLS (SHARDGATE_CA_FILE) with a bearer token (SHARDGATE_TOKEN_FILE)."""
    ca_file = os.environ.get("SHARDGATE_CA_FILE")
    token_file = os.environ.get("SHARDGATE_TOKEN_FILE")
    if not ca_file:
        if token_file:
            sys.exit("SHARDGATE_TOKEN_FILE needs SHARDGATE_CA_FILE: a token is only sent over TLS")
        return grpc.insecure_channel(endpoint)
    with open(ca_file, "rb") as f:
        credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
    if token_file:
        with open(token_file) as f:
            token = f.read().strip()
        credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
    return grpc.secure_channel(endpoint, credentials)


def main():
    table = sys.argv[1]
    endpoint = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1:50051"
    channel = open_channel(endpoint)
    ingest = ingest_pb2_grpc.IngestStub(channel)
    query = query_pb2_grpc.QueryStub(channel)

    written = ingest.Write(
        ingest_pb2.WriteRequest(batch=types_pb2.RowBatch(table=table, columns=COLUMNS, rows=[row(i) for i in range(ROWS)]))
    )
    if written.written != ROWS or written.errors:
        sys.exit(f"write: {written.written} of {ROWS} rows written, errors {list(written.errors)[:3]}")

    for i in range(ROWS):
        got = query.Get(query_pb2.GetRequest(table=table, key=[types_pb2.Value(int=i)], columns=COLUMNS))
        if list(got.result.rows) != [row(i)]:
            sys.exit(f"get {i}: {got.result.rows} instead of {row(i)}")

    seen = {}
    pages = 0
    for page in query.Scan(query_pb2.ScanRequest(table=table, columns=COLUMNS, options=query_pb2.QueryOptions(page_size=64))):
        pages += 1
        for r in page.page.rows:
            key = r.values[0].int
            if key in seen:
                sys.exit(f"scan: row {key} twice")
            seen[key] = r
    if sorted(seen) != list(range(ROWS)):
        sys.exit(f"scan: {len(seen)} rows instead of {ROWS}")
    for key, r in seen.items():
        if r != row(key):
            sys.exit(f"scan: row {key} is {r}")

    try:
        query.Execute(query_pb2.ExecuteRequest(cql=f"DELETE FROM {table} WHERE id = 1"))
        sys.exit("execute: a DELETE was accepted by a read-only gateway")
    except grpc.RpcError as error:
        code = dict(error.trailing_metadata() or ()).get("shardgate-error-code")
        if code != "READ_ONLY":
            sys.exit(f"execute: DELETE refused with {code}: {error.details()}")

    print(f"python example OK: {ROWS} rows written, got back by key and scanned in {pages} pages, a DELETE refused READ_ONLY")


if __name__ == "__main__":
    main()
