//! `shardgate-bench`: end-to-end throughput against the local stack (`deploy/local/stack.sh up`).
//!
//! For each mode it starts a fresh gateway (release build), drives it, and prints rows/s,
//! gateway CPU-seconds per million rows (utime + stime from /proc), and batch latency
//! percentiles:
//! - `grpc-smart`: the shard-aware client, one `WriteStream` per core endpoint;
//! - `grpc-smart-secure`: `grpc-smart` over TLS (a self-signed ECDSA P-256 certificate made with
//!   openssl) with `[ingest.auth]` on, the client sending a bearer token with every call — the
//!   cost of TLS and authentication on the streaming path;
//! - `tls-handshakes`: the `grpc-smart-secure` gateway's TLS listener on core 0's own port
//!   taking full TLS 1.3 handshakes (a new connection each, no resumption, 32 at a time) for
//!   `--handshake-seconds`: handshakes per second on one core ("rows" are handshakes) and the
//!   gateway's CPU-seconds per million handshakes; the client runs on the same machine;
//! - `grpc-plain`: one `WriteStream` on the shared port (rows a core does not own are forwarded);
//! - `kafka`: messages produced first, then the gateway consumes them (rows/s is messages ÷
//!   time from the first row written to the last, by the gateway's written-rows counter; the
//!   group join before it is printed apart; offsets committed and the table read back after;
//!   latency from a second run at a steady rate);
//! - `rabbitmq` / `jetstream`: `--broker-rows` orders published to a durable queue / stream
//!   first, then the gateway consumes them (rows/s is rows ÷ time from the first row written to
//!   the last, by the gateway's written-rows counter; the table is read back after);
//! - `rabbitmq-consume` / `jetstream-consume`: the same orders read by a client that only
//!   consumes and acknowledges them, as the gateway's source is configured (prefetch 512 with
//!   `multiple` acks / a durable pull consumer with explicit acks) — the broker's own ceiling;
//! - `kafka-consume`: the `kafka-5` mode's orders read by a client that only consumes them
//!   (librdkafka as the gateway's source configures it: each message copied out, its offset
//!   stored, stored offsets committed automatically) — the broker's and librdkafka's share of
//!   the Kafka path's cost;
//! - `nats`: core NATS, a gateway subscribed first, then `--broker-rows` orders published at
//!   `--nats-rate` per second (core NATS keeps no backlog and drops for a consumer that falls
//!   too far behind: a run that loses messages fails, naming how many);
//! - `zeromq`: a gateway started first with its PULL socket bound, then `--broker-rows` orders
//!   pushed to it (PUSH blocks at its high-water mark, so nothing is dropped); rows/s is rows ÷
//!   time from the first row written to the last;
//! - `kafka-5`: as `kafka`, with the 5-column orders (a flat ~117-byte JSON object; the table
//!   read back and compared value by value);
//! - `kafka-5-rollup`: `kafka-5` with a stream rollup (orders and items per hour) in the same
//!   gateway; CPU taken once the rollup has checkpointed every message, the closed hours'
//!   counts checked — its CPU per row against `kafka-5`'s is the rollup's cost per ingested row;
//! - `scan-driver` / `scan-driver-parallel` / `scan`: the `ceiling-events` table (`--rows`
//!   events, written by the driver alone when it holds anything else) read whole by one paged
//!   `SELECT *` with the scylla crate alone / by `--scan-splits` token ranges read 8 at a time
//!   with the scylla crate alone / through a gateway's `Scan` with the shard-aware client
//!   (`--scan-splits` planned, `--scan-parallel` splits at a time, each at its owner core's port, every row compared);
//! - `get-smart` / `get-plain`: `Get`s of those events by key, to the owner core's port / on the
//!   shared port: latency at a fixed `--get-rate`, rows/s with 64 in flight;
//! - `ceiling` / `ceiling-5` / `ceiling-events`: the Kafka modes' orders (8 / 5 columns) / the
//!   gRPC modes' events written by the scylla crate alone, no gateway — what the database takes
//!   on this machine, the bar the other modes are measured against.
//!
//! Every mode also reports the database's CPU seconds per million rows (the local Cassandra's
//! utime + stime from /proc over the same span).
//!
//! When a path ran beside its ceiling (and, for a broker, its `-consume` mode), a second table
//! gives the path's floor on this box: the consume-only client's and the ceiling writer's CPU per
//! row (the least the gateway's own can be with these libraries), and the rows/s that the cores
//! allow even a gateway that cost no more, with the broker and Cassandra at their measured cost.
//!
//! gRPC latency is per batch, from the moment the client hands the batch to the stream to the
//! moment its response arrives; each stream keeps `--window` batches in flight (closed loop).

// Tooling and tests: a failed expectation is the tool or test failing, never a gateway core.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::collections::{BTreeMap, HashMap};

use anyhow::Context;
use clap::Parser;
use futures::{StreamExt, TryStreamExt};
use scylla::client::session::Session;
use scylla::serialize::row::SerializeRow;
use scylla::statement::batch::{Batch, BatchType};
use scylla::value::{CqlDecimal, CqlTimestamp};
use shardgate::client::{GatewayAddr, GatewayChannel, ShardAwareClient};
use shardgate::devkit::{self, Gateway};
use shardgate::wire::proto::ingest_client::IngestClient;
use shardgate::wire::proto::{RowBatch, WriteStreamRequest};

#[derive(Parser)]
#[command(about = "End-to-end shardgate benchmark against the local stack")]
struct Args {
    /// Modes to run: ceiling, ceiling-5, ceiling-events, grpc-smart, grpc-smart-secure, tls-handshakes, grpc-plain, kafka, kafka-5,
    /// kafka-spooled, kafka-consume, scan-driver, scan-driver-parallel, scan, get-smart, get-plain,
    /// job, job-python, rabbitmq, rabbitmq-consume, jetstream, jetstream-consume, nats, zeromq (comma
    /// separated).
    #[arg(
        long,
        default_value = "ceiling-events,grpc-smart,grpc-plain,ceiling,kafka",
        value_delimiter = ','
    )]
    modes: Vec<String>,
    /// Rows per mode.
    #[arg(long, default_value_t = 500_000)]
    rows: i64,
    /// Rows per gRPC batch.
    #[arg(long, default_value_t = 500)]
    batch_rows: i64,
    /// Batches a gRPC stream keeps in flight (closed loop: the next batch is sent when one is
    /// answered), so latency measures service time rather than the client's own queue.
    #[arg(long, default_value_t = 8)]
    window: usize,
    /// The gateway's `runtime.write_batch_rows_max` (1 = single writes), and the ceiling
    /// writer's rows per batch.
    #[arg(long, default_value_t = 64)]
    write_batch_rows: usize,
    /// Rows of the `rabbitmq`, `jetstream`, `nats` and `zeromq` modes and their `-consume`
    /// ceilings.
    #[arg(long, default_value_t = 200_000)]
    broker_rows: u64,
    /// The prefetch of the `rabbitmq` mode's route and of the `rabbitmq-consume` client.
    #[arg(long, default_value_t = 512)]
    rabbitmq_prefetch: u16,
    /// Messages per second the `nats` mode publishes.
    #[arg(long, default_value_t = 40_000)]
    nats_rate: u64,
    /// Token ranges of the `scan-driver-parallel` mode (read 8 at a time) and splits the `scan`
    /// mode asks the gateway to plan.
    #[arg(long, default_value_t = 24)]
    scan_splits: usize,
    /// Splits the `scan` mode reads at once.
    #[arg(long, default_value_t = 8)]
    scan_parallel: usize,
    /// `Get`s per second in the latency run of the `get-smart` / `get-plain` modes.
    #[arg(long, default_value_t = 2_000)]
    get_rate: u64,
    /// Messages per second in the Kafka latency run.
    #[arg(long, default_value_t = 5_000)]
    kafka_rate: u64,
    /// Messages of the Kafka latency run (default: a tenth of `--rows`, between 10,000 and
    /// 50,000); more make a longer steady run, whose p99 one stall moves less.
    #[arg(long)]
    kafka_latency_messages: Option<u64>,
    /// The gateway's `runtime.spool_memory_mib_per_core` in the `kafka-spooled` mode (default:
    /// the gateway's own).
    #[arg(long)]
    spool_memory_mib: Option<u64>,
    /// Seconds the `tls-handshakes` mode runs.
    #[arg(long, default_value_t = 10)]
    handshake_seconds: u64,
    /// The gateway binary.
    #[arg(long, default_value = "target/release/shardgate")]
    gateway: PathBuf,
    /// Directory for configs and logs.
    #[arg(long, default_value = ".state/bench")]
    work_dir: PathBuf,
}

struct Outcome {
    mode: String,
    rows: u64,
    seconds: f64,
    cpu_seconds: f64,
    /// The database's and the brokers' CPU seconds over the same span.
    services: devkit::SpanCpu,
    latencies: Vec<Duration>,
    /// p50, p99, p999 in milliseconds when measured by the gateway instead of `latencies`.
    quantiles_ms: Option<[f64; 3]>,
    forwarded: f64,
}

impl Outcome {
    /// A run measured by its rows, time and CPU only (no latencies, nothing forwarded).
    fn untimed(mode: String, rows: u64, seconds: f64, cpu_seconds: f64, services: devkit::SpanCpu) -> Outcome {
        Outcome {
            mode,
            rows,
            seconds,
            cpu_seconds,
            services,
            latencies: Vec::new(),
            quantiles_ms: None,
            forwarded: 0.0,
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.work_dir)?;
    let mut outcomes = Vec::new();
    for mode in &args.modes {
        let outcome = match mode.as_str() {
            "ceiling" | "ceiling-events" | "ceiling-5" => ceiling(&args, mode).await?,
            "grpc-smart" | "grpc-plain" | "grpc-smart-secure" => grpc(&args, mode).await?,
            "tls-handshakes" => tls_handshakes(&args).await?,
            "kafka" => kafka(&args, false, false, false).await?,
            "kafka-spooled" => kafka(&args, true, false, false).await?,
            "kafka-5" => kafka(&args, false, true, false).await?,
            "kafka-5-rollup" => kafka(&args, false, true, true).await?,
            "rabbitmq" | "jetstream" => broker(&args, mode).await?,
            "rabbitmq-consume" | "jetstream-consume" => broker_ceiling(&args, mode).await?,
            "kafka-consume" => kafka_ceiling(&args).await?,
            "scan-driver" => scan_driver(&args, false).await?,
            "scan-driver-parallel" => scan_driver(&args, true).await?,
            "scan" => scan_gateway(&args).await?,
            "job" => job_gateway(&args).await?,
            "job-python" => job_python(&args).await?,
            "get-smart" => get_gateway(&args, true).await?,
            "get-plain" => get_gateway(&args, false).await?,
            "nats" => nats(&args).await?,
            "zeromq" => zeromq(&args).await?,
            other => anyhow::bail!("unknown mode `{other}`"),
        };
        outcomes.push(outcome);
    }
    println!();
    println!("| mode | rows | seconds | rows/s | writer CPU-s per million rows | Cassandra CPU-s per million rows | brokers' CPU-s per million rows | p50 ms | p99 ms | p999 ms | forwarded rows |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for o in &outcomes {
        let mut l = o.latencies.clone();
        l.sort_unstable();
        let pct = |p: f64| {
            if let Some(q) = o.quantiles_ms {
                let at = [0.50, 0.99, 0.999].iter().position(|&x| x == p).unwrap_or(0);
                format!("{:.1}", q[at])
            } else if l.is_empty() {
                "n/a".to_string()
            } else {
                format!("{:.1}", l[((l.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e3)
            }
        };
        let per = PerMillion::of(o);
        println!(
            "| {} | {} | {:.1} | {:.0} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {:.0} |",
            o.mode,
            o.rows,
            o.seconds,
            per.rows_per_second,
            per.cpu,
            per.cassandra,
            per.brokers,
            pct(0.50),
            pct(0.99),
            pct(0.999),
            o.forwarded
        );
    }
    print_floors(&outcomes);
    Ok(())
}

/// A mode's costs per million rows, and its rows/s: one computation for both tables, so they
/// print the same figures.
struct PerMillion {
    /// The gateway's, writer's or client's CPU seconds.
    cpu: f64,
    cassandra: f64,
    brokers: f64,
    rows_per_second: f64,
}

impl PerMillion {
    fn of(o: &Outcome) -> PerMillion {
        let per = |seconds: f64| seconds * 1e6 / o.rows as f64;
        PerMillion {
            cpu: per(o.cpu_seconds),
            cassandra: per(o.services.cassandra),
            brokers: per(o.services.brokers),
            rows_per_second: o.rows as f64 / o.seconds,
        }
    }
}

/// Each path's floor on this box, from modes of the same run (issue 13): a client that only
/// consumes the same messages (its CPU and the broker's, the `-consume` mode; gRPC has none)
/// plus the scylla crate alone writing the same rows (its CPU and Cassandra's, the ceiling
/// mode). Their two client-side costs together are the least the gateway's own CPU per row can
/// be with these libraries; all four together, on cores that everything shares, bound the
/// rows/s even of a gateway that cost no more.
fn print_floors(outcomes: &[Outcome]) {
    let find = |mode: &str| outcomes.iter().find(|o| o.mode == mode).map(PerMillion::of);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let paths = [
        ("grpc-smart", None, "ceiling-events"),
        ("kafka-5", Some("kafka-consume"), "ceiling-5"),
        ("rabbitmq", Some("rabbitmq-consume"), "ceiling"),
        ("jetstream", Some("jetstream-consume"), "ceiling"),
    ];
    let mut header = false;
    for (path, consume, ceiling) in paths {
        let (Some(measured), Some(written)) = (find(path), find(ceiling)) else {
            continue;
        };
        // A broker path needs its consume-only mode in the run.
        let consumed = match consume.map(find) {
            Some(None) => continue,
            Some(consumed) => consumed,
            None => None,
        };
        if !header {
            header = true;
            println!();
            println!("Floors on {cores} cores (issue 13), CPU-s per million rows:");
            println!("| path | consume-only client | its broker | ceiling writer | its Cassandra | gateway floor (client + writer) | at most rows/s (cores ÷ all four) | gateway | rows/s |");
            println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
        }
        let (client, broker) = consumed.as_ref().map_or((0.0, 0.0), |c| (c.cpu, c.brokers));
        let gateway_floor = client + written.cpu;
        let all = gateway_floor + broker + written.cassandra;
        let shown = |value: f64| consumed.as_ref().map_or("—".to_string(), |_| format!("{value:.1}"));
        println!(
            "| {path} | {} | {} | {:.1} | {:.1} | {:.1} | {:.0} | {:.1} | {:.0} |",
            shown(client),
            shown(broker),
            written.cpu,
            written.cassandra,
            gateway_floor,
            cores * 1e6 / all,
            measured.cpu,
            measured.rows_per_second
        );
    }
}

async fn grpc(args: &Args, mode: &str) -> anyhow::Result<Outcome> {
    let keyspace = "shardgate_bench";
    let table = format!("{keyspace}.events");
    let session = devkit::connect(devkit::CASSANDRA).await?;
    devkit::create_events_table(&session, keyspace).await?;
    let config = args.work_dir.join("gateway-grpc.toml");
    let mut toml = devkit::ingest_gateway_toml("", 2048, args.write_batch_rows);
    let mut address = GatewayAddr::from(devkit::INGEST_LISTEN);
    if mode == "grpc-smart-secure" {
        let (security, secured) = secure_listeners(&args.work_dir)?;
        toml.push_str(&security);
        address = secured;
    }
    std::fs::write(&config, toml)?;
    let gateway = Gateway::start(
        &args.gateway,
        &config,
        &args.work_dir.join(format!("gateway-{mode}.log")),
    )?;
    let client = ShardAwareClient::connect(address, &[&table]).await?;
    let batches = devkit::event_batches(&table, args.rows, args.batch_rows);
    let per_stream: Vec<(IngestClient<GatewayChannel>, Vec<RowBatch>)> = if mode.starts_with("grpc-smart") {
        let mut parts: Vec<Vec<RowBatch>> = (0..client.cores()).map(|_| Vec::new()).collect();
        let mut unknown = Vec::new();
        for batch in batches {
            for (owner, part, _) in client.split(batch) {
                match owner {
                    Some(core) => parts[core].push(part),
                    None => unknown.push(part),
                }
            }
        }
        let mut streams: Vec<_> = parts
            .into_iter()
            .enumerate()
            .map(|(c, p)| (client.core_client(c), p))
            .collect();
        streams.push((client.shared_client(), unknown));
        streams
    } else {
        vec![(client.shared_client(), batches)]
    };
    println!("== {mode}: {} rows in batches of {}", args.rows, args.batch_rows);
    let database = devkit::ServicesCpu::start()?;
    let cpu_before = gateway.cpu_seconds()?;
    let started = Instant::now();
    let results = futures::future::join_all(per_stream.into_iter().map(|(c, b)| timed_stream(c, b, args.window))).await;
    let seconds = started.elapsed().as_secs_f64();
    let cpu_seconds = gateway.cpu_seconds()? - cpu_before;
    let services = database.seconds()?;
    let mut rows = 0;
    let mut latencies = Vec::new();
    for result in results {
        let (written, l) = result?;
        rows += written;
        latencies.extend(l);
    }
    let forwarded = devkit::scrape_metric(devkit::ADMIN_LISTEN, shardgate::telemetry::metric::ROWS_FORWARDED)?;
    gateway.stop()?;
    anyhow::ensure!(rows == args.rows as u64, "{mode}: {rows} of {} rows written", args.rows);
    Ok(Outcome {
        mode: mode.to_string(),
        rows,
        seconds,
        cpu_seconds,
        services,
        latencies,
        quantiles_ms: None,
        forwarded,
    })
}

/// Full TLS handshakes against core 0's own port for `--handshake-seconds`, 32 at a time.
async fn tls_handshakes(args: &Args) -> anyhow::Result<Outcome> {
    use rustls_pki_types::pem::PemObject;
    let config = args.work_dir.join("gateway-tls.toml");
    let mut toml = devkit::ingest_gateway_toml("", 2048, args.write_batch_rows);
    let (security, address) = secure_listeners(&args.work_dir)?;
    toml.push_str(&security);
    std::fs::write(&config, toml)?;
    let gateway = Gateway::start(
        &args.gateway,
        &config,
        &args.work_dir.join("gateway-tls-handshakes.log"),
    )?;
    let ca = address.tls.as_ref().context("TLS")?.ca_pem.clone();
    let mut roots = rustls::RootCertStore::empty();
    for certificate in rustls_pki_types::CertificateDer::pem_slice_iter(&ca) {
        roots.add(certificate?)?;
    }
    let mut client = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![b"h2".to_vec()];
    // Every handshake a full one: no session tickets or ids kept.
    client.resumption = rustls::client::Resumption::disabled();
    let connector = futures_rustls::TlsConnector::from(Arc::new(client));
    let port = devkit::INGEST_CORE_PORT_BASE;
    let deadline = Instant::now() + Duration::from_secs(args.handshake_seconds);
    println!(
        "== tls-handshakes: {} s against 127.0.0.1:{port} (core 0)",
        args.handshake_seconds
    );
    let cpu_before = gateway.cpu_seconds()?;
    let started = Instant::now();
    let workers = (0..32).map(|_| {
        let connector = connector.clone();
        async move {
            use tokio_util::compat::TokioAsyncReadCompatExt;
            let mut done = 0u64;
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let began = Instant::now();
                let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
                let name = rustls_pki_types::ServerName::try_from("127.0.0.1")?.to_owned();
                let tls = connector.connect(name, stream.compat()).await?;
                latencies.push(began.elapsed());
                drop(tls);
                done += 1;
            }
            anyhow::Ok((done, latencies))
        }
    });
    let results = futures::future::join_all(workers).await;
    let seconds = started.elapsed().as_secs_f64();
    let cpu_seconds = gateway.cpu_seconds()? - cpu_before;
    let (mut handshakes, mut latencies) = (0, Vec::new());
    for result in results {
        let (done, l) = result?;
        handshakes += done;
        latencies.extend(l);
    }
    let failures = devkit::scrape_metric(
        devkit::ADMIN_LISTEN,
        shardgate::telemetry::metric::TLS_HANDSHAKE_FAILURES,
    )
    .unwrap_or(0.0);
    gateway.stop()?;
    anyhow::ensure!(
        failures == 0.0,
        "tls-handshakes: {failures} handshakes failed on the gateway's side"
    );
    Ok(Outcome {
        mode: "tls-handshakes".to_string(),
        rows: handshakes,
        seconds,
        cpu_seconds,
        services: devkit::SpanCpu::default(),
        latencies,
        quantiles_ms: None,
        forwarded: 0.0,
    })
}

/// `[ingest.tls]` and `[ingest.auth]` for the `grpc-smart-secure` mode — a self-signed
/// certificate made with openssl in `dir`, one principal allowed to write the bench's keyspace —
/// and how its client reaches the gateway (TLS, that principal's token).
fn secure_listeners(dir: &std::path::Path) -> anyhow::Result<(String, GatewayAddr)> {
    let (cert, key) = (dir.join("bench-server.pem"), dir.join("bench-server.key"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
        ])
        .args([
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ])
        .args([
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-addext",
            "extendedKeyUsage=serverAuth",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .context("openssl runs")?;
    anyhow::ensure!(
        made.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    let token = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let hash = shardgate::auth::token_sha256_hex(&token);
    let toml = format!(
        "[ingest.tls]\ncert_file = {cert:?}\nkey_file = {key:?}\n\n[ingest.auth]\n[[ingest.auth.principal]]\n\
         name = \"bench\"\ntoken_sha256 = \"{hash}\"\nscopes = [\"write:shardgate_bench.*\"]\n"
    );
    let tls = shardgate::tls::ClientTls {
        ca_pem: std::fs::read(&cert)?,
        identity: None,
    };
    let address = GatewayAddr {
        address: devkit::INGEST_LISTEN.to_string(),
        tls: Some(tls),
        token: Some(token),
    };
    Ok((toml, address))
}

/// Streams batches with at most `window` unanswered, and measures each batch's latency.
async fn timed_stream(
    mut client: IngestClient<GatewayChannel>,
    batches: Vec<RowBatch>,
    window: usize,
) -> anyhow::Result<(u64, Vec<Duration>)> {
    if batches.is_empty() {
        return Ok((0, Vec::new()));
    }
    let sent_at: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; batches.len()]));
    let recorder = Arc::clone(&sent_at);
    let slots = Arc::new(tokio::sync::Semaphore::new(window.max(1)));
    let taken = Arc::clone(&slots);
    let requests = futures::stream::iter(batches.into_iter().enumerate()).then(move |(id, batch)| {
        let taken = Arc::clone(&taken);
        let recorder = Arc::clone(&recorder);
        async move {
            if let Ok(permit) = taken.acquire().await {
                permit.forget();
            }
            if let Ok(mut times) = recorder.lock() {
                times[id] = Some(Instant::now());
            }
            WriteStreamRequest {
                batch_id: id as u64,
                batch: Some(batch),
                ..Default::default()
            }
        }
    });
    let mut responses = client.write_stream(requests).await?.into_inner();
    let mut written = 0u64;
    let mut latencies = Vec::new();
    while let Some(response) = responses.next().await {
        let response = response?;
        written += u64::from(response.written);
        let sent = sent_at
            .lock()
            .ok()
            .and_then(|t| t.get(response.batch_id as usize).copied().flatten());
        if let Some(sent) = sent {
            latencies.push(sent.elapsed());
        }
        slots.add_permits(1);
    }
    Ok((written, latencies))
}

/// The gateway config of a Kafka bench run: the orders route, acknowledged after the write or
/// once in the spool (`<work_dir>/spool`, emptied first).
fn kafka_config(
    args: &Args,
    keyspace: &str,
    topic: &str,
    group: &str,
    spooled: bool,
    five: bool,
) -> anyhow::Result<String> {
    let route = if five {
        devkit::orders5_route_toml
    } else {
        devkit::orders_route_toml
    };
    let routes = route("orders", keyspace, topic, group, &format!("{topic}.dead-letter"));
    if !spooled {
        return Ok(devkit::gateway_toml(&routes));
    }
    let spool = args.work_dir.join("spool");
    let _ = std::fs::remove_dir_all(&spool);
    let routes = routes.replace("format = \"json\"", "format = \"json\"\nack = \"spooled\"");
    Ok(devkit::gateway_toml_with(
        &routes,
        &format!(
            "spool_dir = \"{}\"{}",
            spool.display(),
            args.spool_memory_mib
                .map(|mib| format!("\nspool_memory_mib_per_core = {mib}"))
                .unwrap_or_default()
        ),
        devkit::ADMIN_LISTEN,
    ))
}

/// The `kafka-5-rollup` mode's wait: until the rollup has checkpointed every message (its
/// checkpoints trail the route's writes by up to one interval), so the gateway's CPU is taken
/// over both.
async fn wait_rollup(session: &scylla::client::session::Session, keyspace: &str, rows: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let progress = shardgate::job::stream::progress(session, keyspace, "bench_hourly").await?;
        if progress.messages >= rows {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "kafka-5-rollup: the rollup checkpointed {} of {rows} messages",
            progress.messages
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every hour the rollup closed holds the count of the orders placed in it; returns how many.
async fn verify_rollup(session: &scylla::client::session::Session, keyspace: &str, rows: u64) -> anyhow::Result<usize> {
    let closed = shardgate::job::stream::progress(session, keyspace, "bench_hourly")
        .await?
        .closed_through_ms;
    let results: Vec<(scylla::value::CqlTimestamp, i64)> =
        devkit::select(session, format!("SELECT window_start, orders FROM {keyspace}.hourly")).await?;
    let mut expected: std::collections::BTreeMap<i64, i64> = std::collections::BTreeMap::new();
    for i in 0..rows {
        let hour = devkit::expected_order(i).placed_at_ms.div_euclid(3_600_000) * 3_600_000;
        if closed.is_some_and(|closed| hour + 3_600_000 <= closed) {
            *expected.entry(hour).or_default() += 1;
        }
    }
    let found: std::collections::BTreeMap<i64, i64> = results.into_iter().map(|(at, n)| (at.0, n)).collect();
    anyhow::ensure!(
        found == expected && !expected.is_empty(),
        "kafka-5-rollup: closed hours' counts differ ({} results, {} expected)",
        found.len(),
        expected.len()
    );
    Ok(expected.len())
}

/// Kafka → Cassandra, the 8-column orders or (`five`) the 5-column ones; with `rollup` (5
/// columns), a stream rollup beside the route in the same gateway, its CPU included and its
/// closed hours checked. Rows/s is rows ÷ time from the first row written to the last, by the
/// gateway's written-rows counter.
async fn kafka(args: &Args, spooled: bool, five: bool, rollup: bool) -> anyhow::Result<Outcome> {
    let mode = match (spooled, five, rollup) {
        (true, _, _) => "kafka-spooled",
        (false, true, true) => "kafka-5-rollup",
        (false, true, false) => "kafka-5",
        (false, false, _) => "kafka",
    };
    let keyspace = match (five, rollup) {
        (true, true) => "shardgate_bench_rollup",
        (true, false) => "shardgate_bench_kafka5",
        (false, _) => "shardgate_bench_kafka",
    };
    let session = devkit::connect(devkit::CASSANDRA).await?;
    if five {
        devkit::create_orders5_table(&session, keyspace).await?;
    } else {
        devkit::create_orders_table(&session, keyspace).await?;
    }
    if rollup {
        session
            .query_unpaged(
                format!(
                    "CREATE TABLE {keyspace}.hourly (window_start timestamp PRIMARY KEY, orders bigint, items bigint)"
                ),
                (),
            )
            .await?;
    }
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let topic = format!("bench.orders.{run}");
    let group = format!("shardgate-bench-{run}");
    let partitions = 6;
    devkit::create_topic(&topic, partitions).await?;
    devkit::create_topic(&format!("{topic}.dead-letter"), 1).await?;
    println!("== {mode}: producing {} messages to {topic}", args.rows);
    let message = if five {
        devkit::order5_message
    } else {
        devkit::order_message
    };
    let messages = (0..args.rows as u64).map(|i| {
        let (key, payload) = message(i);
        (key, payload.into_bytes())
    });
    devkit::produce(&topic, messages)?;
    let config = args.work_dir.join("gateway-kafka.toml");
    let mut text = kafka_config(args, keyspace, &topic, &group, spooled, five)?;
    if rollup {
        // Jobs run through the gateway's ingest listener.
        text.push_str(&format!(
            "\n[ingest]\nlisten = \"{}\"\ncore_port_base = {}\n{}",
            devkit::INGEST_LISTEN,
            devkit::INGEST_CORE_PORT_BASE,
            devkit::hourly_rollup_job_toml("bench_hourly", keyspace)
        ));
    }
    std::fs::write(&config, text)?;
    let database = devkit::ServicesCpu::start()?;
    let started = Instant::now();
    let gateway = Gateway::start(&args.gateway, &config, &args.work_dir.join("gateway-kafka.log"))?;
    // The span is measured from the first row written (the group join before it is reported
    // apart) to the last; offsets committed and the table read back after it.
    let first_written = wait_written(mode, 1, started).await?;
    let last_written = wait_written(mode, args.rows as u64, started).await?;
    let seconds = last_written.duration_since(first_written).as_secs_f64();
    if rollup {
        wait_rollup(&session, keyspace, args.rows as u64).await?;
        println!(
            "   rollup: every message checkpointed {:.1} s after start",
            started.elapsed().as_secs_f64()
        );
    }
    let cpu_seconds = gateway.cpu_seconds()?;
    let services = database.seconds()?;
    wait_committed(&group, &topic, partitions, args.rows).await?;
    println!(
        "   first row written {:.1} s after the gateway started (group join); all offsets committed after {:.1} s",
        first_written.duration_since(started).as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    let rows = args.rows as u64;
    if five {
        let report = devkit::verify_orders5(&session, keyspace, rows).await?;
        anyhow::ensure!(
            report.matching == rows,
            "{mode}: {} of {rows} rows exact ({:?})",
            report.matching,
            report.differences
        );
    } else {
        devkit::wait_for_orders(&session, keyspace, rows, Duration::from_secs(600)).await?;
    }
    let forwarded = devkit::scrape_metric(devkit::ADMIN_LISTEN, shardgate::telemetry::metric::ROWS_FORWARDED)?;
    print_batch_shape(mode)?;
    gateway.stop()?;
    if rollup {
        let hours = verify_rollup(&session, keyspace, rows).await?;
        println!("   rollup: {hours} closed hours exact");
    }
    // The latency run uses the 8-column orders only.
    let quantiles_ms = if five {
        None
    } else {
        Some(kafka_latency(args, keyspace, run, spooled).await?)
    };
    Ok(Outcome {
        mode: mode.into(),
        rows: args.rows as u64,
        seconds,
        cpu_seconds,
        services,
        latencies: Vec::new(),
        quantiles_ms,
        forwarded,
    })
}

/// Kafka latency under a steady load the gateway keeps up with: a fresh topic and gateway,
/// messages produced at `--kafka-rate` per second, each one's delay from its Kafka timestamp
/// (set when produced) to its row confirmed by Cassandra, as the gateway's
/// `shardgate_delivery_latency_seconds` summary reports it (the slowest core's quantile).
/// Spooled: the delay to the acknowledgement (the spool's sync), which is what the summary
/// records for spooled routes.
async fn kafka_latency(args: &Args, keyspace: &str, run: u64, spooled: bool) -> anyhow::Result<[f64; 3]> {
    let suffix = if spooled { "spooled." } else { "" };
    let topic = format!("bench.orders.latency.{suffix}{run}");
    let group = format!("shardgate-bench-latency-{suffix}{run}");
    let partitions = 6;
    devkit::create_topic(&topic, partitions).await?;
    let config = args.work_dir.join("gateway-kafka-latency.toml");
    std::fs::write(&config, kafka_config(args, keyspace, &topic, &group, spooled, false)?)?;
    let gateway = Gateway::start(&args.gateway, &config, &args.work_dir.join("gateway-kafka-latency.log"))?;
    // Wait for the group to own the partitions; the warm-up message is then consumed.
    devkit::produce(
        &topic,
        std::iter::once(devkit::order_message(0)).map(|(k, p)| (k, p.into_bytes())),
    )?;
    wait_committed(&group, &topic, partitions, 1).await?;
    let count = args
        .kafka_latency_messages
        .unwrap_or_else(|| (args.rows as u64 / 10).clamp(10_000, 50_000));
    println!("== kafka latency: {count} messages at {} per second", args.kafka_rate);
    let messages = (1..=count).map(|i| {
        let (key, payload) = devkit::order_message(i);
        (key, payload.into_bytes())
    });
    let topic_name = topic.clone();
    let rate = args.kafka_rate;
    tokio::task::spawn_blocking(move || devkit::produce_at(&topic_name, messages, Some(rate))).await??;
    wait_committed(&group, &topic, partitions, count as i64 + 1).await?;
    let mut quantiles = [0.0; 3];
    for (slot, q) in quantiles.iter_mut().zip(["0.5", "0.99", "0.999"]) {
        let samples = devkit::scrape_samples(
            devkit::ADMIN_LISTEN,
            shardgate::telemetry::metric::DELIVERY_LATENCY_SECONDS,
            &[("quantile", q)],
        )?;
        *slot = samples.into_iter().fold(0.0, f64::max) * 1e3;
    }
    gateway.stop()?;
    Ok(quantiles)
}

/// Waits until `group`'s committed offsets on `topic` reach `target` in total.
async fn wait_committed(group: &str, topic: &str, partitions: i32, target: i64) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let (committed, _) = devkit::committed_and_end(group, topic, partitions).context("committed offsets")?;
        if committed >= target {
            return Ok(());
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "kafka bench stalled at {committed} of {target}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Batches the ceiling writer keeps in flight.
const CEILING_IN_FLIGHT: usize = 48;

/// One sample order as the ceiling writer binds it: the columns of `orders`, then the write
/// timestamp.
type OrderRow = (
    String,
    i64,
    String,
    CqlDecimal,
    i32,
    CqlTimestamp,
    bool,
    Vec<String>,
    i64,
);

fn order_row(i: u64) -> OrderRow {
    let e = devkit::expected_order(i);
    (
        e.order_id,
        e.customer_id,
        e.city,
        CqlDecimal::from_signed_be_bytes_slice_and_exponent(&e.amount_cents.to_be_bytes(), 2),
        e.quantity,
        CqlTimestamp(e.placed_at_ms),
        e.express,
        e.tags,
        e.placed_at_ms * 1_000,
    )
}

/// One 5-column order as the ceiling writer binds it, then the write timestamp.
fn order5_row(i: u64) -> (String, i64, CqlDecimal, i32, CqlTimestamp, i64) {
    let (order_id, customer_id, cents, quantity, placed_at_ms) = devkit::expected_order5(i);
    (
        order_id,
        customer_id,
        CqlDecimal::from_signed_be_bytes_slice_and_exponent(&cents.to_be_bytes(), 2),
        quantity,
        CqlTimestamp(placed_at_ms),
        placed_at_ms * 1_000,
    )
}

/// One sample event (the gRPC modes' rows) as the ceiling writer binds it, then the write
/// timestamp.
type EventRow = (i64, String, f64, CqlTimestamp, Vec<i32>, i64);

fn event_row(i: i64) -> EventRow {
    use shardgate::wire::proto::value::Kind;
    let row = devkit::event_row(i);
    let kinds: Vec<_> = row.values.into_iter().filter_map(|v| v.kind).collect();
    match kinds.as_slice() {
        [Kind::Int(id), Kind::Text(name), Kind::Double(score), Kind::TimestampMs(at), Kind::List(tags)] => {
            let tags = tags
                .values
                .iter()
                .filter_map(|v| match v.kind {
                    Some(Kind::Int(n)) => Some(n as i32),
                    _ => None,
                })
                .collect();
            (*id, name.clone(), *score, CqlTimestamp(*at), tags, at * 1_000)
        }
        _ => unreachable!("devkit::event_row's shape"),
    }
}

/// The database's ceiling on this machine: the rows of the Kafka mode (`ceiling`: orders) or of
/// the gRPC modes (`ceiling-events`) written by the scylla crate alone, no gateway.
async fn ceiling(args: &Args, mode: &str) -> anyhow::Result<Outcome> {
    let session = devkit::connect(devkit::CASSANDRA).await?;
    let rows = args.rows as u64;
    let (keyspace, written) = if mode == "ceiling" {
        let keyspace = "shardgate_bench_ceiling";
        devkit::create_orders_table(&session, keyspace).await?;
        let insert = format!(
            "INSERT INTO {keyspace}.orders (order_id, customer_id, city, amount, quantity, placed_at, express, tags) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
        );
        let written = write_ceiling(args, &session, keyspace, "orders", &insert, (0..rows).map(order_row)).await?;
        devkit::wait_for_orders(&session, keyspace, rows, Duration::from_secs(60)).await?;
        (keyspace, written)
    } else if mode == "ceiling-5" {
        let keyspace = "shardgate_bench_ceiling5";
        devkit::create_orders5_table(&session, keyspace).await?;
        let insert = format!(
            "INSERT INTO {keyspace}.orders5 (order_id, customer_id, amount, quantity, placed_at) \
             VALUES (?, ?, ?, ?, ?) USING TIMESTAMP ?"
        );
        let written = write_ceiling(args, &session, keyspace, "orders5", &insert, (0..rows).map(order5_row)).await?;
        let report = devkit::verify_orders5(&session, keyspace, rows).await?;
        anyhow::ensure!(
            report.matching == rows,
            "ceiling-5: {} of {rows} rows exact",
            report.matching
        );
        (keyspace, written)
    } else {
        let keyspace = "shardgate_bench_ceiling_events";
        devkit::create_events_table(&session, keyspace).await?;
        let insert = format!(
            "INSERT INTO {keyspace}.events (id, name, score, at, tags) VALUES (?, ?, ?, ?, ?) USING TIMESTAMP ?"
        );
        let written = write_ceiling(
            args,
            &session,
            keyspace,
            "events",
            &insert,
            (0..args.rows).map(event_row),
        )
        .await?;
        let report = devkit::verify_events(&session, keyspace, rows).await?;
        anyhow::ensure!(
            report.matching == rows,
            "ceiling-events: {} of {rows} rows exact",
            report.matching
        );
        (keyspace, written)
    };
    let (seconds, cpu_seconds, services, latencies) = written;
    println!("   {mode}: {rows} rows in {keyspace}, row-exact");
    Ok(Outcome {
        mode: mode.into(),
        rows,
        seconds,
        cpu_seconds,
        services,
        latencies,
        quantiles_ms: None,
        forwarded: 0.0,
    })
}

/// What a ceiling run measured: seconds, writer CPU-s, the services' CPU-s, per-batch latencies.
type CeilingRun = (f64, f64, devkit::SpanCpu, Vec<Duration>);

/// Writes `rows` with `insert` the way a driver-only writer does best: rows grouped by the
/// (replica, shard) of their token, UNLOGGED batches of `--write-batch-rows` rows of one group,
/// [`CEILING_IN_FLIGHT`] batches in flight. The writer's CPU is this process's own over the
/// run, grouping included; latency is per batch.
async fn write_ceiling<R: SerializeRow + Send + Sync>(
    args: &Args,
    session: &Session,
    keyspace: &str,
    table: &str,
    insert: &str,
    rows: impl Iterator<Item = R>,
) -> anyhow::Result<CeilingRun> {
    let insert = session.prepare(insert).await?;
    println!(
        "== ceiling: {} rows into {keyspace}.{table} by the scylla crate alone, UNLOGGED batches of {} rows of one replica and shard, {CEILING_IN_FLIGHT} in flight",
        args.rows, args.write_batch_rows
    );
    let database = devkit::ServicesCpu::start()?;
    let cpu_before = devkit::process_cpu_seconds(std::process::id())?;
    let started = Instant::now();
    let cluster = session.get_cluster_state();
    let mut open: HashMap<(uuid::Uuid, u32), Vec<R>> = HashMap::new();
    let mut groups = Vec::new();
    for row in rows {
        let token = insert.calculate_token(&row)?.context("the table has a partition key")?;
        let (node, shard) = cluster
            .get_token_endpoints(keyspace, table, token)
            .into_iter()
            .next()
            .context("no replica for a token")?;
        let group = open.entry((node.host_id, shard)).or_default();
        group.push(row);
        if group.len() >= args.write_batch_rows {
            groups.push(std::mem::take(group));
        }
    }
    groups.extend(open.into_values().filter(|g| !g.is_empty()));
    let insert = &insert;
    let latencies: Vec<Duration> = futures::stream::iter(groups)
        .map(|rows| async move {
            let mut batch = Batch::new(BatchType::Unlogged);
            for _ in &rows {
                batch.append_statement(insert.clone());
            }
            let sent = Instant::now();
            session.batch(&batch, &rows).await.map(|_| sent.elapsed())
        })
        .buffer_unordered(CEILING_IN_FLIGHT)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu_seconds = devkit::process_cpu_seconds(std::process::id())? - cpu_before;
    Ok((seconds, cpu_seconds, database.seconds()?, latencies))
}

/// Where [`fill_broker`] left the orders.
enum Filled {
    /// A RabbitMQ queue.
    Queue(String),
    /// A JetStream stream and the durable consumer name to read it with.
    Stream { stream: String, durable: String },
}

/// Publishes `rows` orders to a fresh RabbitMQ queue (`kind` "rabbitmq"; persistent, each
/// confirmed) or JetStream stream (each acknowledged); returns where they are and the gateway
/// route that reads them into `keyspace`.
async fn fill_broker(args: &Args, kind: &str, rows: u64, keyspace: &str) -> anyhow::Result<(Filled, String)> {
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    let messages = (0..rows).map(devkit::order_message_with_id);
    println!("== {kind}: publishing {rows} messages");
    if kind == "rabbitmq" {
        let (queue, dead_letter) = (format!("bench.orders.{run}"), format!("bench.orders.{run}.dead-letter"));
        devkit::recreate_queue(&queue).await?;
        devkit::recreate_queue(&dead_letter).await?;
        devkit::publish_rabbitmq(&queue, messages).await?;
        let route = devkit::rabbitmq_orders_route_toml("orders", keyspace, &queue, &dead_letter)
            .replace("prefetch = 512", &format!("prefetch = {}", args.rabbitmq_prefetch));
        Ok((Filled::Queue(queue), route))
    } else {
        let (stream, subject) = (format!("bench-orders-{run}"), format!("bench.orders.{run}"));
        devkit::create_stream(&stream, &[&subject]).await?;
        devkit::publish_jetstream(&subject, messages).await?;
        let durable = format!("bench-{run}");
        let route = devkit::jetstream_orders_route_toml(
            "orders",
            keyspace,
            &stream,
            &subject,
            &durable,
            &format!("{subject}.dead-letter"),
        );
        Ok((Filled::Stream { stream, durable }, route))
    }
}

/// `max_ack_pending` of the bench's JetStream route (the source's default).
const JETSTREAM_MAX_ACK_PENDING: i64 = 4096;

/// RabbitMQ or JetStream → Cassandra: the orders published first (persistent / stream-stored,
/// each confirmed), then a gateway started on them; rows/s is rows ÷ time from the first row
/// written to the last (connecting and the consumer's set-up are printed apart).
async fn broker(args: &Args, mode: &str) -> anyhow::Result<Outcome> {
    let keyspace = "shardgate_bench_broker";
    let session = devkit::connect(devkit::CASSANDRA).await?;
    devkit::create_orders_table(&session, keyspace).await?;
    let rows = args.broker_rows;
    let (_, routes) = fill_broker(args, mode, rows, keyspace).await?;
    let config = args.work_dir.join(format!("gateway-{mode}.toml"));
    std::fs::write(&config, devkit::gateway_toml(&routes))?;
    let database = devkit::ServicesCpu::start()?;
    let started = Instant::now();
    let gateway = Gateway::start(
        &args.gateway,
        &config,
        &args.work_dir.join(format!("gateway-{mode}.log")),
    )?;
    // Done when the gateway has written every row (its counter, so the wait costs the database
    // nothing); the table is read back after the measured span.
    let first_written = wait_written(mode, 1, started).await?;
    let last_written = wait_written(mode, rows, started).await?;
    println!(
        "   first row written {:.2} s after the gateway started",
        first_written.duration_since(started).as_secs_f64()
    );
    let seconds = last_written.duration_since(first_written).as_secs_f64();
    broker_outcome(mode, rows, seconds, gateway, database, &session, keyspace).await
}

/// The broker's own ceiling: the orders of the `rabbitmq` / `jetstream` mode read by a client
/// that only consumes and acknowledges them, configured as the gateway's source is. Rows/s is
/// messages ÷ time from the first delivery to the last acknowledgement; "writer" CPU is this
/// process's (the consuming client's) over the run.
async fn broker_ceiling(args: &Args, mode: &str) -> anyhow::Result<Outcome> {
    let kind = mode.trim_end_matches("-consume");
    let rows = args.broker_rows;
    let (filled, _) = fill_broker(args, kind, rows, "shardgate_bench_broker").await?;
    let database = devkit::ServicesCpu::start()?;
    let cpu_before = devkit::process_cpu_seconds(std::process::id())?;
    let span = match &filled {
        Filled::Queue(queue) => devkit::drain_rabbitmq(queue, rows, args.rabbitmq_prefetch).await?,
        Filled::Stream { stream, durable } => {
            devkit::drain_jetstream(stream, durable, rows, JETSTREAM_MAX_ACK_PENDING).await?
        }
    };
    let cpu_seconds = devkit::process_cpu_seconds(std::process::id())? - cpu_before;
    println!("   {mode}: {rows} messages consumed and acknowledged, nothing written");
    Ok(Outcome::untimed(
        mode.into(),
        rows,
        span.as_secs_f64(),
        cpu_seconds,
        database.seconds()?,
    ))
}

/// The Kafka path's floor: `--rows` 5-column orders produced to a fresh 6-partition topic, then
/// read by a client that only consumes them (`devkit::drain_kafka`), its CPU in the writer
/// column. What the gateway spends per Kafka row beyond this and the `ceiling-5` writer's is its
/// own.
async fn kafka_ceiling(args: &Args) -> anyhow::Result<Outcome> {
    let mode = "kafka-consume";
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let topic = format!("bench.orders.consume.{run}");
    devkit::create_topic(&topic, 6).await?;
    println!("== {mode}: producing {} messages to {topic}", args.rows);
    let messages = (0..args.rows as u64).map(|i| {
        let (key, payload) = devkit::order5_message(i);
        (key, payload.into_bytes())
    });
    devkit::produce(&topic, messages)?;
    let rows = args.rows as u64;
    let database = devkit::ServicesCpu::start()?;
    let cpu_before = devkit::process_cpu_seconds(std::process::id())?;
    let group = format!("shardgate-bench-consume-{run}");
    let span = tokio::task::spawn_blocking(move || devkit::drain_kafka(&topic, &group, rows)).await??;
    let cpu_seconds = devkit::process_cpu_seconds(std::process::id())? - cpu_before;
    println!("   {mode}: {rows} messages consumed and their offsets committed, nothing written");
    Ok(Outcome::untimed(
        mode.into(),
        rows,
        span.as_secs_f64(),
        cpu_seconds,
        database.seconds()?,
    ))
}

/// Keyspace of the read modes' table: the `ceiling-events` mode's.
const READ_KEYSPACE: &str = "shardgate_bench_ceiling_events";

/// The events table with exactly `--rows` sample events, written by the driver alone when it
/// holds anything else.
async fn ensure_events(args: &Args, session: &Session) -> anyhow::Result<()> {
    let rows = args.rows as u64;
    let present = session
        .query_unpaged(format!("SELECT count(*) FROM {READ_KEYSPACE}.events"), ())
        .await
        .ok()
        .and_then(|r| r.into_rows_result().ok())
        .and_then(|r| r.single_row::<(i64,)>().ok())
        .map(|(n,)| n as u64);
    if present == Some(rows) {
        return Ok(());
    }
    println!("== filling {READ_KEYSPACE}.events with {rows} events (driver alone)");
    devkit::create_events_table(session, READ_KEYSPACE).await?;
    let insert = format!(
        "INSERT INTO {READ_KEYSPACE}.events (id, name, score, at, tags) VALUES (?, ?, ?, ?, ?) USING TIMESTAMP ?"
    );
    write_ceiling(
        args,
        session,
        READ_KEYSPACE,
        "events",
        &insert,
        (0..args.rows).map(event_row),
    )
    .await?;
    Ok(())
}

/// Reads with the scylla crate alone: `SELECT *` of the events table, one paged query
/// (`scan-driver`) or `--scan-splits` token ranges read 8 at a time (`scan-driver-parallel`).
/// Counts the rows and checks every id came once. Its CPU is this process's.
async fn scan_driver(args: &Args, parallel: bool) -> anyhow::Result<Outcome> {
    let mode = if parallel {
        "scan-driver-parallel"
    } else {
        "scan-driver"
    };
    let session = Arc::new(devkit::connect(devkit::CASSANDRA).await?);
    ensure_events(args, &session).await?;
    let rows = args.rows as u64;
    println!("== {mode}: reading {rows} events with the scylla crate alone");
    let database = devkit::ServicesCpu::start()?;
    let cpu_before = devkit::process_cpu_seconds(std::process::id())?;
    let started = Instant::now();
    let ranges: Vec<(i64, i64)> = if parallel {
        let count = args.scan_splits.max(1) as i128;
        let width = (i128::from(i64::MAX) - i128::from(i64::MIN)) / count;
        (0..count)
            .map(|i| {
                let start = i128::from(i64::MIN) + width * i;
                let end = if i == count - 1 {
                    i128::from(i64::MAX)
                } else {
                    start + width
                };
                (start as i64, end as i64)
            })
            .collect()
    } else {
        Vec::new()
    };
    let ids: Vec<i64> = if parallel {
        let mut select = session
            .prepare(format!(
                "SELECT id, name, score, at, tags FROM {READ_KEYSPACE}.events WHERE token(id) > ? AND token(id) <= ?"
            ))
            .await?;
        select.set_page_size(5000);
        let select = Arc::new(select);
        let reads = ranges.into_iter().map(|(start, end)| {
            let (session, select) = (Arc::clone(&session), Arc::clone(&select));
            async move {
                let mut ids = Vec::new();
                let mut pages = session
                    .execute_iter((*select).clone(), (start, end))
                    .await?
                    .rows_stream::<(i64, Option<String>, Option<f64>, Option<CqlTimestamp>, Option<Vec<i32>>)>()?;
                while let Some(row) = pages.next().await {
                    ids.push(row?.0);
                }
                Ok::<_, anyhow::Error>(ids)
            }
        });
        let mut ids = Vec::new();
        let mut running = futures::stream::iter(reads).buffer_unordered(8);
        while let Some(part) = running.next().await {
            ids.extend(part?);
        }
        ids
    } else {
        let mut select = session
            .prepare(format!("SELECT id, name, score, at, tags FROM {READ_KEYSPACE}.events"))
            .await?;
        select.set_page_size(5000);
        let mut ids = Vec::new();
        let mut pages = session.execute_iter(select, ()).await?.rows_stream::<(
            i64,
            Option<String>,
            Option<f64>,
            Option<CqlTimestamp>,
            Option<Vec<i32>>,
        )>()?;
        while let Some(row) = pages.next().await {
            ids.push(row?.0);
        }
        ids
    };
    let seconds = started.elapsed().as_secs_f64();
    let cpu_seconds = devkit::process_cpu_seconds(std::process::id())? - cpu_before;
    let mut seen = vec![false; rows as usize];
    for id in &ids {
        anyhow::ensure!(
            (0..rows as i64).contains(id) && !std::mem::replace(&mut seen[*id as usize], true),
            "{mode}: event {id} out of range or read twice"
        );
    }
    anyhow::ensure!(ids.len() as u64 == rows, "{mode}: {} of {rows} rows read", ids.len());
    println!("   {mode}: {rows} rows read, each once");
    Ok(Outcome::untimed(
        mode.into(),
        rows,
        seconds,
        cpu_seconds,
        database.seconds()?,
    ))
}

/// The events table scanned through a gateway with the shard-aware client: planned by the
/// gateway, `--scan-parallel` splits at a time, each at its owner core's port; every row
/// compared with the event it should be. CPU is the gateway's.
async fn scan_gateway(args: &Args) -> anyhow::Result<Outcome> {
    let mode = "scan";
    let session = devkit::connect(devkit::CASSANDRA).await?;
    ensure_events(args, &session).await?;
    let rows = args.rows as u64;
    let config = args.work_dir.join("gateway-query.toml");
    std::fs::write(&config, devkit::ingest_gateway_toml("", 2048, args.write_batch_rows))?;
    let gateway = Gateway::start(&args.gateway, &config, &args.work_dir.join("gateway-query.log"))?;
    let table = format!("{READ_KEYSPACE}.events");
    let client = ShardAwareClient::connect(devkit::INGEST_LISTEN, &[&table]).await?;
    println!(
        "== {mode}: scanning {rows} events through the gateway, {} splits at a time",
        args.scan_parallel
    );
    let database = devkit::ServicesCpu::start()?;
    let cpu_before = gateway.cpu_seconds()?;
    let report =
        devkit::read_back_events(&client, &table, rows, args.scan_splits as u32, args.scan_parallel, 0).await?;
    let cpu_seconds = gateway.cpu_seconds()? - cpu_before;
    let services = database.seconds()?;
    anyhow::ensure!(
        report.exact == rows && report.scanned == rows,
        "{mode}: {} of {rows} rows exact, {} scanned, {} duplicates: {:?}",
        report.exact,
        report.scanned,
        report.duplicates,
        report.differences
    );
    println!(
        "   {mode}: {rows} rows read back exact, each once, in {} splits",
        report.splits
    );
    gateway.stop()?;
    Ok(Outcome::untimed(
        mode.into(),
        rows,
        report.scan_time.as_secs_f64(),
        cpu_seconds,
        services,
    ))
}

/// Per minute of the events `0..rows`: (events, sum of scores, top score), computed here.
fn expected_per_minute(rows: i64) -> BTreeMap<i64, (i64, f64, f64)> {
    let mut minutes: BTreeMap<i64, (i64, f64, f64)> = BTreeMap::new();
    for i in 0..rows {
        let at = devkit::event_at_ms(i);
        let score = i as f64 * 0.5;
        let minute = minutes
            .entry(at.div_euclid(60_000) * 60_000)
            .or_insert((0, 0.0, f64::MIN));
        minute.0 += 1;
        minute.1 += score;
        minute.2 = minute.2.max(score);
    }
    minutes
}

/// Compares a per-minute result table with [`expected_per_minute`] (sums to 1e-9 relative:
/// their order of addition differs).
async fn check_per_minute(session: &Session, table: &str, rows: i64) -> anyhow::Result<usize> {
    let expected = expected_per_minute(rows);
    let got: Vec<(CqlTimestamp, i64, f64, f64)> = session
        .query_iter(format!("SELECT window_start, events, score, top FROM {table}"), ())
        .await?
        .rows_stream::<(CqlTimestamp, i64, f64, f64)>()?
        .try_collect()
        .await?;
    anyhow::ensure!(
        got.len() == expected.len(),
        "{table}: {} minutes, {} expected",
        got.len(),
        expected.len()
    );
    for (start, events, score, top) in got {
        let Some(&(e, s, t)) = expected.get(&start.0) else {
            anyhow::bail!("{table}: a minute that should not be there: {}", start.0);
        };
        anyhow::ensure!(
            events == e && (score - s).abs() <= s.abs() * 1e-9 && top == t,
            "{table}: minute {}: ({events}, {score}, {top}) against ({e}, {s}, {t})",
            start.0
        );
    }
    Ok(expected.len())
}

/// Runs `command` to its end, sampling its CPU seconds every 20 ms (the last sample before it
/// exits: up to 20 ms of CPU can go uncounted). Returns (stdout+stderr, wall seconds, CPU).
fn run_sampled(mut command: std::process::Command) -> anyhow::Result<(String, f64, f64)> {
    let started = Instant::now();
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let mut cpu = 0.0;
    let (mut out, mut err) = (child.stdout.take(), child.stderr.take());
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(out) = out.as_mut() {
            let _ = std::io::Read::read_to_string(out, &mut text);
        }
        if let Some(err) = err.as_mut() {
            let _ = std::io::Read::read_to_string(err, &mut text);
        }
        text
    });
    let status = loop {
        if let Ok(seconds) = devkit::process_cpu_seconds(pid) {
            cpu = seconds;
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let seconds = started.elapsed().as_secs_f64();
    let text = reader.join().unwrap_or_default();
    anyhow::ensure!(status.success(), "{status}: {text}");
    Ok((text, seconds, cpu))
}

/// A processing job over the events table through a gateway (`shardgate job run`): events,
/// score sum and top score per minute into a table; results compared with the same aggregation
/// computed here. CPU is the gateway's plus the job runner's.
async fn job_gateway(args: &Args) -> anyhow::Result<Outcome> {
    let mode = "job";
    let session = devkit::connect(devkit::CASSANDRA).await?;
    ensure_events(args, &session).await?;
    let table = format!("{READ_KEYSPACE}.events_per_minute");
    session
        .query_unpaged(format!("DROP TABLE IF EXISTS {table}"), ())
        .await?;
    session
        .query_unpaged(
            format!(
                "CREATE TABLE {table} (window_start timestamp PRIMARY KEY, events bigint, score double, top double)"
            ),
            (),
        )
        .await?;
    session.await_schema_agreement().await?;
    let job = format!(
        "\n[[job]]\nname = \"per_minute\"\nstate_keyspace = \"{READ_KEYSPACE}\"\nparallel_splits = {parallel}\n\
         [job.source]\ntable = \"{READ_KEYSPACE}.events\"\ncolumns = [\"score\", \"at\"]\nmin_splits = {splits}\n\
         [job.aggregate]\nwindow = {{ column = \"at\", size = \"1m\" }}\n\
         measures = {{ events = \"count()\", score = \"sum(row.score)\", top = \"max(row.score)\" }}\n\
         [[job.sink]]\ntable = \"{table}\"\n",
        parallel = args.scan_parallel,
        splits = args.scan_splits,
    );
    let config = args.work_dir.join("gateway-job.toml");
    std::fs::write(
        &config,
        devkit::ingest_gateway_toml("", 2048, args.write_batch_rows) + &job,
    )?;
    let gateway = Gateway::start(&args.gateway, &config, &args.work_dir.join("gateway-job.log"))?;
    println!(
        "== {mode}: aggregating {} events per minute through the gateway (shardgate job run)",
        args.rows
    );
    let database = devkit::ServicesCpu::start()?;
    let cpu_before = gateway.cpu_seconds()?;
    let mut command = std::process::Command::new(&args.gateway);
    command
        .args(["job", "run", "--config"])
        .arg(&config)
        .args(["--job", "per_minute"]);
    let (text, seconds, runner_cpu) = run_sampled(command)?;
    let gateway_cpu = gateway.cpu_seconds()? - cpu_before;
    let services = database.seconds()?;
    let minutes = check_per_minute(&session, &table, args.rows).await?;
    println!(
        "   {mode}: {minutes} minutes exact; gateway {:.1} CPU-s/M, runner {:.1} CPU-s/M; {}",
        gateway_cpu * 1e6 / args.rows as f64,
        runner_cpu * 1e6 / args.rows as f64,
        text.lines().rev().find(|l| l.starts_with("job ")).unwrap_or_default()
    );
    gateway.stop()?;
    Ok(Outcome::untimed(
        mode.into(),
        args.rows as u64,
        seconds,
        gateway_cpu + runner_cpu,
        services,
    ))
}

/// The seed's way: `deploy/bench/python_aggregate.py` reads the events with the Python driver,
/// aggregates per minute in Python and writes the results back (a virtualenv with the pinned
/// driver is made in the work directory). CPU is the Python process's.
async fn job_python(args: &Args) -> anyhow::Result<Outcome> {
    let mode = "job-python";
    let session = devkit::connect(devkit::CASSANDRA).await?;
    ensure_events(args, &session).await?;
    let venv = args.work_dir.join("venv");
    let python = venv.join("bin/python");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/bench/python_aggregate.py");
    let requirements = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/bench/requirements.txt");
    if !python.exists() {
        let made = std::process::Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()?;
        anyhow::ensure!(made.success(), "python3 -m venv {}", venv.display());
    }
    let installed = std::process::Command::new(venv.join("bin/pip"))
        .args(["install", "-q", "-r"])
        .arg(&requirements)
        .status()?;
    anyhow::ensure!(installed.success(), "pip install -r {}", requirements.display());
    let table = format!("{READ_KEYSPACE}.events_per_minute_python");
    session
        .query_unpaged(format!("DROP TABLE IF EXISTS {table}"), ())
        .await?;
    session.await_schema_agreement().await?;
    println!("== {mode}: aggregating {} events per minute in Python", args.rows);
    let database = devkit::ServicesCpu::start()?;
    let mut command = std::process::Command::new(&python);
    command.arg(&script).arg(READ_KEYSPACE);
    let (text, seconds, cpu_seconds) = run_sampled(command)?;
    let services = database.seconds()?;
    let minutes = check_per_minute(&session, &table, args.rows).await?;
    println!("   {mode}: {minutes} minutes exact; {}", text.trim());
    Ok(Outcome::untimed(
        mode.into(),
        args.rows as u64,
        seconds,
        cpu_seconds,
        services,
    ))
}

/// `Get`s of the events by key through a gateway, by the shard-aware client (`get-smart`: each
/// to its key's owner core) or a plain one on the shared port (`get-plain`). Latency from a run
/// at a fixed `--get-rate`; rows/s from a closed loop of 64 `Get`s in flight. Every answer is
/// compared with its event. CPU is the gateway's over the closed loop.
async fn get_gateway(args: &Args, smart: bool) -> anyhow::Result<Outcome> {
    use shardgate::wire::proto::value::Kind;
    use shardgate::wire::proto::{GetRequest, Value};
    let mode = if smart { "get-smart" } else { "get-plain" };
    let session = devkit::connect(devkit::CASSANDRA).await?;
    ensure_events(args, &session).await?;
    let rows = args.rows as u64;
    let config = args.work_dir.join("gateway-query.toml");
    std::fs::write(&config, devkit::ingest_gateway_toml("", 2048, args.write_batch_rows))?;
    let gateway = Gateway::start(&args.gateway, &config, &args.work_dir.join("gateway-query.log"))?;
    let table = format!("{READ_KEYSPACE}.events");
    let client = ShardAwareClient::connect(devkit::INGEST_LISTEN, &[&table]).await?;
    let plain = client.query_client();
    let count = (rows / 20).clamp(5_000, 50_000);
    let request = |id: u64| GetRequest {
        table: table.clone(),
        columns: devkit::event_columns(),
        key: vec![Value {
            kind: Some(Kind::Int((id * 7919 % rows) as i64)),
        }],
        ..Default::default()
    };
    let get = |id: u64| {
        let (client, mut plain, request) = (client.clone(), plain.clone(), request(id));
        async move {
            let expected = devkit::event_row((id * 7919 % rows) as i64);
            let started = Instant::now();
            let response = if smart {
                client.get(request).await?
            } else {
                plain.get(request).await?.into_inner()
            };
            let elapsed = started.elapsed();
            let got = response.result.map(|r| r.rows).unwrap_or_default();
            anyhow::ensure!(got == [expected], "get of event {}: {got:?}", id * 7919 % rows);
            Ok::<_, anyhow::Error>(elapsed)
        }
    };
    println!(
        "== {mode}: {count} gets at {} per second, then {count} with 64 in flight",
        args.get_rate
    );
    let mut latencies = Vec::with_capacity(count as usize);
    let paced = Instant::now();
    let mut pending = futures::stream::FuturesUnordered::new();
    for i in 0..count {
        let due = Duration::from_secs_f64(i as f64 / args.get_rate.max(1) as f64);
        if let Some(wait) = due.checked_sub(paced.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        pending.push(tokio::spawn(get(i)));
        while pending.len() > 1024 {
            latencies.push(pending.next().await.expect("pending")??);
        }
    }
    while let Some(done) = pending.next().await {
        latencies.push(done??);
    }
    let database = devkit::ServicesCpu::start()?;
    let cpu_before = gateway.cpu_seconds()?;
    let started = Instant::now();
    let mut closed = futures::stream::iter((count..2 * count).map(get)).buffer_unordered(64);
    while let Some(done) = closed.next().await {
        done?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu_seconds = gateway.cpu_seconds()? - cpu_before;
    gateway.stop()?;
    println!("   {mode}: {} gets, every answer its event", 2 * count);
    Ok(Outcome {
        mode: mode.into(),
        rows: count,
        seconds,
        cpu_seconds,
        services: database.seconds()?,
        latencies,
        quantiles_ms: None,
        forwarded: 0.0,
    })
}

/// Core NATS → Cassandra: the gateway subscribes first (a warm-up order is published until one
/// is written), then `--broker-rows` orders are published at `--nats-rate` per second. Rows/s
/// is rows ÷ time from the first row written to the last; a run in which core NATS dropped
/// messages (it keeps no backlog) fails, naming how many.
async fn nats(args: &Args) -> anyhow::Result<Outcome> {
    let mode = "nats";
    let keyspace = "shardgate_bench_broker";
    let session = devkit::connect(devkit::CASSANDRA).await?;
    devkit::create_orders_table(&session, keyspace).await?;
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    let subject = format!("bench.orders.nats.{run}");
    let routes =
        devkit::nats_orders_route_toml("orders", keyspace, &subject, "bench", &format!("{subject}.dead-letter"));
    let config = args.work_dir.join("gateway-nats.toml");
    std::fs::write(&config, devkit::gateway_toml(&routes))?;
    let database = devkit::ServicesCpu::start()?;
    let started = Instant::now();
    let gateway = Gateway::start(&args.gateway, &config, &args.work_dir.join("gateway-nats.log"))?;
    let written = || {
        devkit::scrape_metric(devkit::ADMIN_LISTEN, shardgate::telemetry::metric::ROWS_WRITTEN).unwrap_or(0.0) as u64
    };
    while written() == 0 {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "{mode}: the gateway never subscribed"
        );
        devkit::publish_nats(&subject, [devkit::order_message_with_id(0)]).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let warm_up = written();
    let rows = args.broker_rows;
    println!("== {mode}: publishing {rows} messages at {} per second", args.nats_rate);
    let publisher = {
        let subject = subject.clone();
        let rate = args.nats_rate;
        tokio::spawn(async move {
            devkit::publish_nats_at(&subject, (0..rows).map(devkit::order_message_with_id), rate).await
        })
    };
    let target = warm_up + rows;
    let (mut first, mut seen, mut last_change) = (None, warm_up, Instant::now());
    loop {
        let now = written();
        if now > seen {
            first.get_or_insert_with(Instant::now);
            seen = now;
            last_change = Instant::now();
        }
        if seen >= target {
            break;
        }
        anyhow::ensure!(
            !publisher.is_finished() || last_change.elapsed() < Duration::from_secs(3),
            "{mode}: {} of {rows} messages written, the rest dropped by core NATS at {} per second (lower --nats-rate)",
            seen - warm_up,
            args.nats_rate
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seconds = first.map_or(0.0, |f| f.elapsed().as_secs_f64());
    anyhow::ensure!(publisher.await?? == rows, "{mode}: not every message was published");
    broker_outcome(mode, rows, seconds, gateway, database, &session, keyspace).await
}

/// ZeroMQ → Cassandra: the gateway binds its PULL socket first, then `--broker-rows` orders are
/// pushed (two frames: order id, JSON); rows/s is rows ÷ time from the first row written to the
/// last (ZeroMQ keeps no backlog to fill beforehand).
async fn zeromq(args: &Args) -> anyhow::Result<Outcome> {
    let mode = "zeromq";
    let keyspace = "shardgate_bench_broker";
    let session = devkit::connect(devkit::CASSANDRA).await?;
    devkit::create_orders_table(&session, keyspace).await?;
    let rows = args.broker_rows;
    let routes = devkit::zeromq_orders_route_toml("orders", keyspace, "bench.zeromq.dead-letter");
    let config = args.work_dir.join("gateway-zeromq.toml");
    std::fs::write(&config, devkit::gateway_toml(&routes))?;
    let database = devkit::ServicesCpu::start()?;
    let started = Instant::now();
    let gateway = Gateway::start(&args.gateway, &config, &args.work_dir.join("gateway-zeromq.log"))?;
    println!("== {mode}: pushing {rows} messages");
    let pusher = tokio::task::spawn_blocking(move || {
        let messages = (0..rows).map(|i| {
            let (key, payload) = devkit::order_message(i);
            (key.into_bytes(), payload.into_bytes())
        });
        devkit::push_zeromq(devkit::ZMQ_ENDPOINT, messages)
    });
    let first_written = wait_written(mode, 1, started).await?;
    let last_written = wait_written(mode, rows, started).await?;
    let seconds = last_written.duration_since(first_written).as_secs_f64();
    let outcome = broker_outcome(mode, rows, seconds, gateway, database, &session, keyspace).await?;
    anyhow::ensure!(pusher.await?? == rows, "{mode}: not every message was pushed");
    Ok(outcome)
}

/// The end of a broker mode once its last row is written (`seconds` measured): the gateway's
/// and the database's CPU so far, then the table read back row-exact, the batch shape printed
/// and the gateway stopped.
async fn broker_outcome(
    mode: &str,
    rows: u64,
    seconds: f64,
    gateway: Gateway,
    database: devkit::ServicesCpu,
    session: &Session,
    keyspace: &str,
) -> anyhow::Result<Outcome> {
    let cpu_seconds = gateway.cpu_seconds()?;
    let services = database.seconds()?;
    devkit::wait_for_orders(session, keyspace, rows, Duration::from_secs(60)).await?;
    let forwarded = devkit::scrape_metric(devkit::ADMIN_LISTEN, shardgate::telemetry::metric::ROWS_FORWARDED)?;
    print_batch_shape(mode)?;
    gateway.stop()?;
    Ok(Outcome {
        mode: mode.into(),
        rows,
        seconds,
        cpu_seconds,
        services,
        latencies: Vec::new(),
        quantiles_ms: None,
        forwarded,
    })
}

/// Waits until the gateway's written counter reaches `rows` and returns when; fails 600 s
/// after `started`. Each scrape renders every metric, and its summaries' quantiles cost the
/// gateway CPU (about 7 % of it when scraped every 10 ms, 1–6 % every 50 ms in the longer
/// broker runs), so the wait polls sparingly: it sleeps for half the time the rows still
/// missing take at the rate seen so far (20 ms to 500 ms), so most scrapes fall near the end
/// and the time is still read within 20 ms there.
async fn wait_written(mode: &str, rows: u64, started: Instant) -> anyhow::Result<Instant> {
    let written_metric = shardgate::telemetry::metric::ROWS_WRITTEN;
    let mut first: Option<(Instant, f64)> = None;
    loop {
        let written = devkit::scrape_metric(devkit::ADMIN_LISTEN, written_metric).unwrap_or(0.0);
        if written >= rows as f64 {
            return Ok(Instant::now());
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "{mode}: {rows} rows not written within 600 s"
        );
        let (since, at_first) = *first.get_or_insert((Instant::now(), written));
        let rate = (written - at_first) / since.elapsed().as_secs_f64().max(1e-3);
        let wait = if rate > 0.0 {
            Duration::from_secs_f64(((rows as f64 - written) / rate / 2.0).clamp(0.02, 0.5))
        } else {
            Duration::from_millis(50)
        };
        tokio::time::sleep(wait).await;
    }
}

/// Prints the mean hand-off to a core and the mean rows per database write of the running
/// gateway.
fn print_batch_shape(mode: &str) -> anyhow::Result<()> {
    println!(
        "   {mode}: {:.1} messages per hand-off to a core, {:.1} rows per database write",
        histogram_mean(shardgate::telemetry::metric::RECEIVED_BATCH_ROWS)?,
        histogram_mean(shardgate::telemetry::metric::BATCH_ROWS)?
    );
    Ok(())
}

/// The mean of a histogram the gateway exports (its `_sum` over its `_count`, all label sets).
fn histogram_mean(name: &str) -> anyhow::Result<f64> {
    let sum = devkit::scrape_metric(devkit::ADMIN_LISTEN, &format!("{name}_sum"))?;
    let count = devkit::scrape_metric(devkit::ADMIN_LISTEN, &format!("{name}_count"))?;
    Ok(sum / count.max(1.0))
}
