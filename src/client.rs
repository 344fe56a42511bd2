//! The shard-aware producer client: computes each row's token like the gateway does and sends it
//! straight to the core that owns it, so the gateway forwards nothing.
//!
//! Runs on the caller's tokio runtime (tonic's `Channel`). At connect it reads `GetTopology`:
//! the cores' endpoints, the ring snapshot ([`Ownership`]) and the partition-key columns of the
//! tables it will write. Tokens come from the driver's Murmur3 partitioner over the key values
//! serialized by the driver's own `SerializeValue`, combined exactly as the driver combines
//! composite keys. A row whose owner it cannot tell (unknown table, a key type it does not
//! handle, a bad value) goes to the shared port, where the gateway routes it with one hop; a
//! stale topology likewise costs a forward, never a wrong write.

use std::collections::HashMap;

use scylla::cluster::metadata::ColumnType;
use scylla::routing::partitioner::{Murmur3Partitioner, Partitioner};
use scylla::serialize::value::SerializeValue;
use scylla::serialize::writers::CellWriter;
use tonic::transport::{Channel, Endpoint};

use crate::topology::{NodeShards, Ownership, PartitionKeyHasher};
use crate::wire::convert::{parse_native_type, to_cql};
use crate::wire::flat::encode_row_batch;
use crate::wire::proto::ingest_client::IngestClient;
use crate::wire::proto::{GetTopologyRequest, Row, RowBatch, RowError, WriteFlatRequest, WriteRequest, WriteResponse};

/// Errors connecting the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The endpoint could not be reached.
    #[error("cannot connect to `{endpoint}`: {reason}")]
    Connect {
        /// The endpoint.
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// The gateway refused `GetTopology`.
    #[error("cannot read the gateway topology: {0}")]
    Topology(tonic::Status),
}

/// Partition key of one table as the client needs it: batch-independent names and types.
#[derive(Debug, Clone)]
struct TableKey {
    columns: Vec<(String, ColumnType<'static>)>,
}

/// A gateway client that routes each row to its owner core.
#[derive(Clone)]
pub struct ShardAwareClient {
    ownership: Ownership,
    shared: IngestClient<Channel>,
    cores: Vec<IngestClient<Channel>>,
    keys: HashMap<String, TableKey>,
}

async fn channel(endpoint: &str) -> Result<Channel, ClientError> {
    let error = |reason: String| ClientError::Connect {
        endpoint: endpoint.to_string(),
        reason,
    };
    Endpoint::from_shared(format!("http://{endpoint}"))
        .map_err(|e| error(e.to_string()))?
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| error(e.to_string()))
}

impl ShardAwareClient {
    /// Connects to the gateway's shared endpoint (`host:port`), reads the topology for `tables`
    /// (`keyspace.table`) and connects to every core's own endpoint.
    pub async fn connect(endpoint: &str, tables: &[&str]) -> Result<ShardAwareClient, ClientError> {
        let mut shared = IngestClient::new(channel(endpoint).await?);
        let request = GetTopologyRequest {
            tables: tables.iter().map(|t| t.to_string()).collect(),
        };
        let topology = shared
            .get_topology(request)
            .await
            .map_err(ClientError::Topology)?
            .into_inner();
        let ownership = Ownership::from_parts(
            topology.cores as usize,
            topology.ring.iter().map(|e| (e.token, e.node)).collect(),
            topology
                .nodes
                .iter()
                .map(|n| NodeShards {
                    shards: u16::try_from(n.shards).unwrap_or(1).max(1),
                    msb_ignore: u8::try_from(n.msb_ignore).unwrap_or(0),
                })
                .collect(),
        );
        let mut cores = Vec::with_capacity(topology.core_endpoints.len());
        for core_endpoint in &topology.core_endpoints {
            cores.push(IngestClient::new(channel(core_endpoint).await?));
        }
        let keys = topology
            .tables
            .into_iter()
            .filter_map(|t| {
                let columns: Option<Vec<_>> = t
                    .columns
                    .into_iter()
                    .map(|c| parse_native_type(&c.cql_type).map(|typ| (c.name, typ)))
                    .collect();
                columns.map(|columns| (t.table, TableKey { columns }))
            })
            .collect();
        Ok(ShardAwareClient {
            ownership,
            shared,
            cores,
            keys,
        })
    }

    /// Number of gateway cores.
    pub fn cores(&self) -> usize {
        self.ownership.cores()
    }

    /// The client of core `core`'s own endpoint (the shared one when cores publish none).
    pub fn core_client(&self, core: usize) -> IngestClient<Channel> {
        self.cores.get(core).cloned().unwrap_or_else(|| self.shared.clone())
    }

    /// The client of the shared endpoint.
    pub fn shared_client(&self) -> IngestClient<Channel> {
        self.shared.clone()
    }

    /// The token of a row's partition key, computed like the driver does; `None` when the
    /// table's key is unknown or a key value is missing or does not fit.
    pub fn token(&self, table: &str, columns: &[String], row: &Row) -> Option<i64> {
        row_token(&self.keys.get(table)?.columns, columns, row)
    }

    /// The core that owns a row, if the client can tell.
    pub fn owner_core(&self, table: &str, columns: &[String], row: &Row) -> Option<usize> {
        self.token(table, columns, row)
            .map(|token| self.ownership.owner_core(token))
    }

    /// Splits a batch by owner core. Each part keeps the original row indexes, so per-row errors
    /// can be reported against the caller's batch. Rows of unknown owner form the `None` part.
    pub fn split(&self, batch: RowBatch) -> Vec<(Option<usize>, RowBatch, Vec<u32>)> {
        let mut parts: HashMap<Option<usize>, (Vec<Row>, Vec<u32>)> = HashMap::new();
        for (index, row) in batch.rows.into_iter().enumerate() {
            let owner = self
                .owner_core(&batch.table, &batch.columns, &row)
                .filter(|&c| c < self.cores.len());
            let part = parts.entry(owner).or_default();
            part.0.push(row);
            part.1.push(index as u32);
        }
        parts
            .into_iter()
            .map(|(owner, (rows, indexes))| {
                let part = RowBatch {
                    table: batch.table.clone(),
                    columns: batch.columns.clone(),
                    rows,
                    timestamp_us: batch.timestamp_us,
                };
                (owner, part, indexes)
            })
            .collect()
    }

    /// Writes a batch: each part to its owner core's endpoint, concurrently; per-row errors come
    /// back against the original row indexes.
    pub async fn write(&self, batch: RowBatch) -> Result<WriteResponse, tonic::Status> {
        self.write_parts(batch, Encoding::Protobuf).await
    }

    /// Like [`ShardAwareClient::write`], sending each part as a FlatBuffers row batch
    /// (`WriteFlat`).
    pub async fn write_flat(&self, batch: RowBatch) -> Result<WriteResponse, tonic::Status> {
        self.write_parts(batch, Encoding::FlatBuffers).await
    }

    async fn write_parts(&self, batch: RowBatch, encoding: Encoding) -> Result<WriteResponse, tonic::Status> {
        let calls = self.split(batch).into_iter().map(|(owner, part, indexes)| {
            let mut client = match owner {
                Some(core) => self.core_client(core),
                None => self.shared_client(),
            };
            async move {
                let response = match encoding {
                    Encoding::Protobuf => {
                        client
                            .write(WriteRequest {
                                batch: Some(part),
                                ..Default::default()
                            })
                            .await?
                    }
                    Encoding::FlatBuffers => {
                        let row_batch = encode_row_batch(&part);
                        client
                            .write_flat(WriteFlatRequest {
                                row_batch,
                                ..Default::default()
                            })
                            .await?
                    }
                };
                Ok::<_, tonic::Status>((response.into_inner(), indexes))
            }
        });
        let mut merged = WriteResponse::default();
        for result in futures::future::join_all(calls).await {
            let (response, indexes) = result?;
            merged.written += response.written;
            merged.errors.extend(response.errors.into_iter().map(|e| RowError {
                row: indexes.get(e.row as usize).copied().unwrap_or(e.row),
                ..e
            }));
        }
        merged.errors.sort_by_key(|e| e.row);
        Ok(merged)
    }
}

/// How a batch travels to the gateway.
#[derive(Debug, Clone, Copy)]
enum Encoding {
    Protobuf,
    FlatBuffers,
}

/// The token of `row`'s partition key: each key column's value serialized by the driver's
/// `SerializeValue`, combined as the driver combines composite keys, hashed by the driver's
/// Murmur3 partitioner. `key` lists the partition key columns in order; `columns` names the
/// row's values. `None` when a key column is absent, null or does not fit its type.
pub fn row_token(key: &[(String, ColumnType<'static>)], columns: &[String], row: &Row) -> Option<i64> {
    let mut hasher = PartitionKeyHasher::new(Murmur3Partitioner.build_hasher(), key.len());
    let mut cell = Vec::new();
    for (name, typ) in key {
        let position = columns.iter().position(|c| c == name)?;
        let value = to_cql(row.values.get(position)?, typ).ok()??;
        cell.clear();
        value.serialize(typ, CellWriter::new(&mut cell)).ok()?;
        // A serialized cell is a 4-byte length, then the value.
        hasher.component(cell.get(4..)?)?;
    }
    Some(hasher.finish())
}

/// What a stream of batches achieved.
#[derive(Debug, Default, Clone)]
pub struct StreamSummary {
    /// Batches answered.
    pub batches: u64,
    /// Rows written.
    pub written: u64,
    /// Rows not written (row indexes are within their sub-batch).
    pub errors: Vec<RowError>,
    /// Batches refused as a whole, by batch id (within their stream).
    pub batch_errors: Vec<(u64, crate::wire::proto::BatchError)>,
}

impl StreamSummary {
    fn absorb(&mut self, other: StreamSummary) {
        self.batches += other.batches;
        self.written += other.written;
        self.errors.extend(other.errors);
        self.batch_errors.extend(other.batch_errors);
    }
}

/// Sends `batches` over one `WriteStream` on `client` and collects every answer.
pub async fn stream_batches(
    mut client: IngestClient<Channel>,
    batches: Vec<RowBatch>,
) -> Result<StreamSummary, tonic::Status> {
    use crate::wire::proto::WriteStreamRequest;
    use futures::StreamExt;
    let requests = futures::stream::iter(batches.into_iter().enumerate().map(|(id, batch)| WriteStreamRequest {
        batch_id: id as u64,
        batch: Some(batch),
        ..Default::default()
    }));
    let mut responses = client.write_stream(requests).await?.into_inner();
    let mut summary = StreamSummary::default();
    while let Some(response) = responses.next().await {
        let response = response?;
        summary.batches += 1;
        summary.written += u64::from(response.written);
        summary.errors.extend(response.errors);
        if let Some(refused) = response.batch_error {
            summary.batch_errors.push((response.batch_id, refused));
        }
    }
    Ok(summary)
}

impl ShardAwareClient {
    /// Streams `batches` with one `WriteStream` per owner core (rows of unknown owner over the
    /// shared port), all concurrently.
    pub async fn stream(&self, batches: impl IntoIterator<Item = RowBatch>) -> Result<StreamSummary, tonic::Status> {
        let mut per_owner: HashMap<Option<usize>, Vec<RowBatch>> = HashMap::new();
        for batch in batches {
            for (owner, part, _) in self.split(batch) {
                per_owner.entry(owner).or_default().push(part);
            }
        }
        let streams = per_owner.into_iter().map(|(owner, parts)| {
            let client = match owner {
                Some(core) => self.core_client(core),
                None => self.shared_client(),
            };
            stream_batches(client, parts)
        });
        let mut total = StreamSummary::default();
        for summary in futures::future::join_all(streams).await {
            total.absorb(summary?);
        }
        Ok(total)
    }
}
