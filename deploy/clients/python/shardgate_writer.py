"""A shard-aware writer for shardgate in Python: each row goes straight to the gateway core that
owns it, so no row is forwarded between cores (the Rust `ShardAwareClient`'s rule).

    writer = ShardAwareWriter("127.0.0.1:50051", tables=["shop.orders"])
    written = writer.write("shop.orders", ["order_id", "amount"], rows)   # rows: types_pb2.Row

How: `Ingest.GetTopology` gives the gateway's cores and one endpoint per core, the token ring
(ascending tokens, each with the node owning the range ending there), each node's shard layout
and the tables' partition keys. A row's token is Murmur3 of its serialized partition key,
computed by the Python driver's own `Murmur3Token` (package cassandra-driver); the token's
primary node and shard give the owner core (`(node * shards + shard) % cores` when a node has at
least as many shards as the gateway has cores, else the core whose equal slice of the token
range holds the token). One channel per core endpoint; `write` sends each core its rows in one
`Write`.

Partition key types: text, ascii, varchar, tinyint, smallint, int, bigint, counter, boolean,
double, float, timestamp, date, uuid, timeuuid, blob. Other key types raise `ValueError`.
"""

import bisect
import struct

import grpc
from cassandra.metadata import Murmur3Token

from shardgate.v1 import ingest_pb2, ingest_pb2_grpc, topology_pb2, types_pb2

_FIXED = {
    "tinyint": ">b",
    "smallint": ">h",
    "int": ">i",
    "bigint": ">q",
    "counter": ">q",
    "timestamp": ">q",
    "double": ">d",
    "float": ">f",
}


def serialize(value, cql_type):
    """The CQL serialization of one partition key value (a `types_pb2.Value`) of `cql_type`."""
    kind = value.WhichOneof("kind")
    if cql_type in ("text", "ascii", "varchar") and kind == "text":
        return value.text.encode("utf-8")
    if cql_type in _FIXED:
        field = {"timestamp": "timestamp_ms", "double": "double", "float": "float"}.get(cql_type, "int")
        if kind != field:
            raise ValueError(f"a {cql_type} key needs Value.{field}, not {kind}")
        return struct.pack(_FIXED[cql_type], getattr(value, field))
    if cql_type == "boolean" and kind == "boolean":
        return b"\x01" if value.boolean else b"\x00"
    if cql_type == "date" and kind == "date_days":
        return struct.pack(">I", (value.date_days + (1 << 31)) & 0xFFFFFFFF)
    if cql_type in ("uuid", "timeuuid") and kind in ("uuid", "timeuuid"):
        return bytes(getattr(value, kind))
    if cql_type == "blob" and kind == "blob":
        return bytes(value.blob)
    raise ValueError(f"partition key type {cql_type} with Value.{kind} is not supported by this writer")


def routing_key(parts):
    """The bytes Murmur3 hashes: the value itself for one column, else each as
    (2-byte length, bytes, 0)."""
    if len(parts) == 1:
        return parts[0]
    return b"".join(struct.pack(">H", len(p)) + p + b"\x00" for p in parts)


def token_range_bucket(token, buckets):
    """The equal slice of the whole token range (`buckets` of them) that holds `token`."""
    return ((token + (1 << 63)) * buckets) >> 64


def shard_of(token, shards, msb_ignore):
    """ScyllaDB's shard of `token` on a node with `shards` shards (the driver's rule)."""
    biased = ((token + (1 << 63)) << msb_ignore) & 0xFFFFFFFFFFFFFFFF
    return (biased * shards) >> 64


class ShardAwareWriter:
    """Writes rows to their owner cores of one gateway; `credentials` (a
    `grpc.ChannelCredentials`, for TLS) apply to every channel."""

    def __init__(self, endpoint, tables, credentials=None):
        self._credentials = credentials
        topology = ingest_pb2_grpc.IngestStub(self._channel(endpoint)).GetTopology(
            topology_pb2.GetTopologyRequest(tables=list(tables))
        )
        self.cores = topology.cores
        self._ring_tokens = [entry.token for entry in topology.ring]
        self._ring_nodes = [entry.node for entry in topology.ring]
        self._nodes = [(n.shards, n.msb_ignore) for n in topology.nodes]
        self._keys = {t.table: [(c.name, c.cql_type) for c in t.columns] for t in topology.tables}
        self._stubs = [ingest_pb2_grpc.IngestStub(self._channel(e)) for e in topology.core_endpoints]

    def _channel(self, endpoint):
        if self._credentials is None:
            return grpc.insecure_channel(endpoint)
        return grpc.secure_channel(endpoint, self._credentials)

    def token(self, table, columns, row):
        """The Murmur3 token of `row`'s partition key (`columns` names the row's values)."""
        key = self._keys.get(table)
        if key is None:
            raise ValueError(f"{table}: not in the topology (pass it in `tables`)")
        parts = []
        for name, cql_type in key:
            if name not in columns:
                raise ValueError(f"{table}: partition key column {name} missing from {columns}")
            parts.append(serialize(row.values[columns.index(name)], cql_type))
        return Murmur3Token.hash_fn(routing_key(parts))

    def owner_core(self, token):
        """The gateway core that owns `token`."""
        if not self._ring_tokens:
            return token_range_bucket(token, self.cores)
        index = bisect.bisect_left(self._ring_tokens, token)
        node = self._ring_nodes[index % len(self._ring_nodes)]
        shards, msb_ignore = self._nodes[node] if node < len(self._nodes) else (1, 0)
        shard = shard_of(token, shards, msb_ignore) if shards > 1 else 0
        if shards >= self.cores:
            return (node * shards + shard) % self.cores
        return token_range_bucket(token, self.cores)

    def write(self, table, columns, rows, metadata=None):
        """Writes `rows` (types_pb2.Row, values in `columns` order), each to its owner core;
        returns the rows written. Raises `RuntimeError` naming the first refused row."""
        per_core = {}
        for row in rows:
            per_core.setdefault(self.owner_core(self.token(table, columns, row)), []).append(row)
        written = 0
        for core, core_rows in sorted(per_core.items()):
            batch = types_pb2.RowBatch(table=table, columns=columns, rows=core_rows)
            answer = self._stubs[core].Write(ingest_pb2.WriteRequest(batch=batch), metadata=metadata)
            if answer.errors:
                first = answer.errors[0]
                raise RuntimeError(f"core {core}: {len(answer.errors)} row(s) refused, first: {first}")
            written += answer.written
        return written
