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
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::tls::ClientTls;
use crate::topology::{NodeShards, Ownership, PartitionKeyHasher};
use crate::wire::convert::{parse_native_type, to_cql};
use crate::wire::flat::encode_row_batch;
use crate::wire::proto::ingest_client::IngestClient;
use crate::wire::proto::query_client::QueryClient;
use crate::wire::proto::{
    GetRequest, GetResponse, GetTopologyRequest, ResultSet, Row, RowBatch, RowError, ScanRequest, Split,
    WriteFlatRequest, WriteRequest, WriteResponse,
};

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

/// A gateway client that routes each row to its owner core: writes, `Get`s and scan splits.
#[derive(Clone)]
pub struct ShardAwareClient {
    ownership: Ownership,
    shared: IngestClient<GatewayChannel>,
    cores: Vec<IngestClient<GatewayChannel>>,
    query_shared: QueryClient<GatewayChannel>,
    query_cores: Vec<QueryClient<GatewayChannel>>,
    keys: HashMap<String, TableKey>,
}

/// How to reach a gateway's gRPC API: its shared `host:port`, TLS when its listeners use it
/// (the same for its per-core ports), and the bearer token when it authenticates callers.
#[derive(Clone)]
pub struct GatewayAddr {
    /// `host:port`.
    pub address: String,
    /// What to trust and present; `None`: plaintext.
    pub tls: Option<ClientTls>,
    /// The bearer token sent with every call (`ingest.auth`); `None`: none sent.
    pub token: Option<String>,
}

impl std::fmt::Debug for GatewayAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        f.debug_struct("GatewayAddr")
            .field("address", &self.address)
            .field("tls", &self.tls)
            .field("token", &self.token.as_ref().map(|_| "(set)"))
            .finish()
    }
}

impl From<&str> for GatewayAddr {
    fn from(address: &str) -> GatewayAddr {
        GatewayAddr {
            address: address.to_string(),
            tls: None,
            token: None,
        }
    }
}

impl GatewayAddr {
    /// The same address, sending `token` as `authorization: Bearer <token>`.
    pub fn with_token(mut self, token: impl Into<String>) -> GatewayAddr {
        self.token = Some(token.into());
        self
    }

    /// The interceptor that adds this address's token to every call.
    pub fn credentials(&self) -> Result<Credentials, ClientError> {
        let Some(token) = &self.token else {
            return Ok(Credentials(None));
        };
        let mut value: MetadataValue<Ascii> = format!("Bearer {token}").parse().map_err(|_| ClientError::Connect {
            endpoint: self.address.clone(),
            reason: "the bearer token is not printable ASCII".to_string(),
        })?;
        value.set_sensitive(true);
        Ok(Credentials(Some(value)))
    }
}

/// Adds `authorization: Bearer <token>` to every call of a client, when there is a token.
#[derive(Clone, Default)]
pub struct Credentials(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Credentials {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A channel to a gateway that sends its credentials with every call.
pub type GatewayChannel = InterceptedService<Channel, Credentials>;

/// A channel to `gateway`'s `endpoint` (its shared or a per-core one), with its TLS and token.
pub async fn gateway_channel(gateway: &GatewayAddr, endpoint: &str) -> Result<GatewayChannel, ClientError> {
    let credentials = gateway.credentials()?;
    Ok(InterceptedService::new(
        channel(endpoint, gateway.tls.as_ref()).await?,
        credentials,
    ))
}

async fn channel(endpoint: &str, tls: Option<&ClientTls>) -> Result<Channel, ClientError> {
    let error = |reason: String| ClientError::Connect {
        endpoint: endpoint.to_string(),
        reason,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut builder = Endpoint::from_shared(format!("{scheme}://{endpoint}"))
        .map_err(|e| error(e.to_string()))?
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .tcp_nodelay(true);
    if let Some(tls) = tls {
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca_pem));
        if let Some((cert, key)) = &tls.identity {
            config = config.identity(Identity::from_pem(cert, key));
        }
        builder = builder.tls_config(config).map_err(|e| error(format!("TLS: {e}")))?;
    }
    // The transport error alone says little ("transport error"): its sources say why.
    builder.connect().await.map_err(|e| {
        let mut reason = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(cause) = source {
            reason.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        error(reason)
    })
}

impl ShardAwareClient {
    /// Connects to the gateway's shared endpoint (`host:port`, or a [`GatewayAddr`] with TLS),
    /// reads the topology for `tables` (`keyspace.table`) and connects to every core's own
    /// endpoint (with the same TLS).
    pub async fn connect(gateway: impl Into<GatewayAddr>, tables: &[&str]) -> Result<ShardAwareClient, ClientError> {
        let gateway = gateway.into();
        let shared_channel = gateway_channel(&gateway, &gateway.address).await?;
        let query_shared = QueryClient::new(shared_channel.clone()).max_decoding_message_size(usize::MAX);
        let mut shared = IngestClient::new(shared_channel);
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
            Vec::new(),
        );
        let mut cores = Vec::with_capacity(topology.core_endpoints.len());
        let mut query_cores = Vec::with_capacity(topology.core_endpoints.len());
        for core_endpoint in &topology.core_endpoints {
            let core_channel = gateway_channel(&gateway, core_endpoint).await?;
            query_cores.push(QueryClient::new(core_channel.clone()).max_decoding_message_size(usize::MAX));
            cores.push(IngestClient::new(core_channel));
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
            query_shared,
            query_cores,
            keys,
        })
    }

    /// Number of gateway cores.
    pub fn cores(&self) -> usize {
        self.ownership.cores()
    }

    /// The client of core `core`'s own endpoint (the shared one when cores publish none).
    pub fn core_client(&self, core: usize) -> IngestClient<GatewayChannel> {
        self.cores.get(core).cloned().unwrap_or_else(|| self.shared.clone())
    }

    /// The client of the shared endpoint.
    pub fn shared_client(&self) -> IngestClient<GatewayChannel> {
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

impl ShardAwareClient {
    /// The query client of core `core`'s own endpoint (the shared one when cores publish none).
    pub fn query_core_client(&self, core: usize) -> QueryClient<GatewayChannel> {
        self.query_cores
            .get(core)
            .cloned()
            .unwrap_or_else(|| self.query_shared.clone())
    }

    /// The query client of the shared endpoint.
    pub fn query_client(&self) -> QueryClient<GatewayChannel> {
        self.query_shared.clone()
    }

    /// `Get` sent to the core that owns the key (the shared endpoint when the client cannot
    /// tell: a table it was not connected for, a key type it does not handle).
    pub async fn get(&self, request: GetRequest) -> Result<GetResponse, tonic::Status> {
        let owner = self.keys.get(&request.table).and_then(|key| {
            let names: Vec<String> = key.columns.iter().map(|(name, _)| name.clone()).collect();
            let row = Row {
                values: request.key.iter().take(names.len()).cloned().collect(),
            };
            row_token(&key.columns, &names, &row).map(|token| self.ownership.owner_core(token))
        });
        let mut client = match owner {
            Some(core) => self.query_core_client(core),
            None => self.query_client(),
        };
        client.get(request).await.map(tonic::Response::into_inner)
    }

    /// Scans a table in parallel, each split at its owner core's endpoint, `parallel` splits at
    /// a time: `request` gives the table, columns, `where` and options; `splits` (from
    /// `PlanScan`) and `resume` (one token per split, empty = from its start) say what is left.
    /// A split whose stream breaks (a transport error, the gateway restarting) resumes from its
    /// last page's token, up to `SCAN_SPLIT_RETRIES` times in a row. Pages arrive on the returned
    /// channel as they come; it closes when every split is done, or after the first error.
    pub fn scan(
        &self,
        request: ScanRequest,
        splits: Vec<Split>,
        resume: Vec<Vec<u8>>,
        parallel: usize,
    ) -> tokio::sync::mpsc::Receiver<Result<ScanPage, tonic::Status>> {
        let (pages, receiver) = tokio::sync::mpsc::channel(parallel.max(1));
        let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(parallel.max(1)));
        for (index, split) in splits.into_iter().enumerate() {
            let token = resume.get(index).cloned().unwrap_or_default();
            let client = self.query_core_client(split.core as usize);
            let (request, pages, permits) = (request.clone(), pages.clone(), std::sync::Arc::clone(&permits));
            tokio::spawn(async move {
                let Ok(_permit) = permits.acquire_owned().await else {
                    return;
                };
                scan_split(client, request, index, split, token, pages).await;
            });
        }
        receiver
    }
}

/// Times a scan split is resumed in a row after its stream broke.
pub const SCAN_SPLIT_RETRIES: u32 = 5;

/// One page of a scan split, as [`ShardAwareClient::scan`] delivers it.
#[derive(Debug, Clone)]
pub struct ScanPage {
    /// Index of the split in the caller's list.
    pub split: usize,
    /// The page's rows and column specs.
    pub result: ResultSet,
    /// Resumes the split after this page; empty once the split is done.
    pub token: Vec<u8>,
}

/// Reads one split to its end on `client`, resuming from the last token when the stream breaks.
async fn scan_split(
    mut client: QueryClient<GatewayChannel>,
    request: ScanRequest,
    index: usize,
    split: Split,
    mut token: Vec<u8>,
    pages: tokio::sync::mpsc::Sender<Result<ScanPage, tonic::Status>>,
) {
    use futures::StreamExt;
    let mut failures = 0;
    loop {
        let mut attempt = request.clone();
        attempt.splits = vec![split.clone()];
        attempt.resume = vec![token.clone()];
        attempt.parallel_splits = 1;
        let broke = match client.scan(attempt).await {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                let mut broke = None;
                while let Some(page) = stream.next().await {
                    match page {
                        Ok(page) => {
                            failures = 0;
                            let result = page.page.unwrap_or_default();
                            token = result.next_page_token.clone();
                            let done = page.split_done;
                            if pages
                                .send(Ok(ScanPage {
                                    split: index,
                                    result,
                                    token: token.clone(),
                                }))
                                .await
                                .is_err()
                            {
                                return;
                            }
                            if done {
                                return;
                            }
                        }
                        Err(status) => {
                            broke = Some(status);
                            break;
                        }
                    }
                }
                // A stream that ends without its split done broke too.
                Some(broke.unwrap_or_else(|| tonic::Status::unavailable("the scan stream ended early")))
            }
            Err(status) => Some(status),
        };
        let Some(status) = broke else { return };
        // Transport breaks and the gateway's retryable refusals (UNAVAILABLE, TIMEOUT,
        // OVERLOADED); a bad request fails at once.
        let transient = matches!(
            status.code(),
            tonic::Code::Unavailable
                | tonic::Code::Unknown
                | tonic::Code::Cancelled
                | tonic::Code::Internal
                | tonic::Code::DeadlineExceeded
                | tonic::Code::ResourceExhausted
        );
        failures += 1;
        if !transient || failures > SCAN_SPLIT_RETRIES {
            let _ = pages.send(Err(status)).await;
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200 * u64::from(failures))).await;
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
    mut client: IngestClient<GatewayChannel>,
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
