"""The shard-aware writer (shardgate_writer.py) against a gateway: writes rows 0..N of the test
table `(id bigint PRIMARY KEY, name text, score double, at timestamp, tags frozen<list<int>>)`,
each to its owner core, in batches of 1,000.

    deploy/clients/python/run.sh shard_aware.py KEYSPACE.TABLE [HOST:PORT] [ROWS]

Prints how many rows went to each core. Exits non-zero, saying why, when a row is refused.
"""

import sys

from example import COLUMNS, row
from shardgate_writer import ShardAwareWriter

BATCH = 1000


def main():
    table = sys.argv[1]
    endpoint = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1:50051"
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 20_000
    writer = ShardAwareWriter(endpoint, tables=[table])
    per_core = [0] * writer.cores
    written = 0
    for start in range(0, count, BATCH):
        rows = [row(i) for i in range(start, min(start + BATCH, count))]
        for r in rows:
            per_core[writer.owner_core(writer.token(table, COLUMNS, r))] += 1
        written += writer.write(table, COLUMNS, rows)
    if written != count:
        sys.exit(f"shard-aware writer: {written} of {count} rows written")
    shares = ", ".join(f"core {core}: {n}" for core, n in enumerate(per_core))
    print(f"python shard-aware writer OK: {written} rows written ({shares})")


if __name__ == "__main__":
    main()
