"""The seed's way of processing, for `shardgate-bench --modes job-python`: read a whole table
with the Python driver, aggregate in Python, write the results back.

Reads `score` and `at` of `<keyspace>.events` (the columns the `job` mode reads), counts
events and sums and maxes `score` per minute of `at`, writes `<keyspace>.events_per_minute_python`; prints one line
`rows=<n> groups=<g>`.

    python_aggregate.py KEYSPACE [HOST]
"""

import sys

from cassandra.cluster import Cluster
from cassandra.query import SimpleStatement


def main():
    keyspace = sys.argv[1]
    host = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"
    cluster = Cluster([host])
    session = cluster.connect()
    session.execute(
        f"CREATE TABLE IF NOT EXISTS {keyspace}.events_per_minute_python "
        "(window_start timestamp PRIMARY KEY, events bigint, score double, top double)"
    )
    groups = {}
    rows = 0
    statement = SimpleStatement(f"SELECT score, at FROM {keyspace}.events", fetch_size=5000)
    for row in session.execute(statement):
        rows += 1
        minute = row.at.replace(second=0, microsecond=0)
        group = groups.get(minute)
        if group is None:
            groups[minute] = [1, row.score, row.score]
        else:
            group[0] += 1
            group[1] += row.score
            if row.score > group[2]:
                group[2] = row.score
    insert = session.prepare(
        f"INSERT INTO {keyspace}.events_per_minute_python (window_start, events, score, top) VALUES (?, ?, ?, ?)"
    )
    for minute, (events, score, top) in groups.items():
        session.execute(insert, (minute, events, score, top))
    print(f"rows={rows} groups={len(groups)}")
    cluster.shutdown()


if __name__ == "__main__":
    main()
