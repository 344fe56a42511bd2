//! `shardgate export`: a whole table (or the rows a `where` keeps) streamed through the scan
//! path — planned by the gateway, each split read at its owner core's port by the shard-aware
//! client — to JSON lines or CSV, on stdout or a file. With `--resume STATE` (and `--output`)
//! it records after each page which pages of which splits are in the file and how long the file
//! was then; a run started again with the same state file truncates the file to that length and
//! goes on from each split's last page, so every row is in the file exactly once. A terminal
//! shows a progress bar (rows, rows/s, splits done of total); otherwise one summary line.
//!
//! Threads: the caller's tokio runtime (the client is tonic's).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::client::ShardAwareClient;
use crate::wire::proto::value::Kind;
use crate::wire::proto::{PlanScanRequest, QueryOptions, ScanRequest, Split, TokenRange, Value};

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One JSON object per row, keyed by column name.
    Jsonl,
    /// A header line of column names, then one line per row; collections as JSON text.
    Csv,
}

/// What to export and where.
#[derive(Debug, Clone)]
pub struct ExportSpec {
    /// The gateway's shared endpoint (`host:port`, TLS when its listeners use it).
    pub endpoint: crate::client::GatewayAddr,
    /// `keyspace.table`.
    pub table: String,
    /// Columns; empty = all.
    pub columns: Vec<String>,
    /// Extra CQL restrictions (`AND`-ed after the token range).
    pub r#where: String,
    /// Adds ALLOW FILTERING.
    pub allow_filtering: bool,
    /// Output format.
    pub format: Format,
    /// Output file; `None` = stdout.
    pub output: Option<PathBuf>,
    /// Resume state file (needs `output`).
    pub resume: Option<PathBuf>,
    /// Splits read at once.
    pub parallel: usize,
    /// Rows per page.
    pub page_size: u32,
}

/// What an export did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportReport {
    /// Rows written by this run.
    pub rows: u64,
    /// Rows in the output in all (with the rows of earlier runs of a resumed export).
    pub rows_total: u64,
    /// Splits of the scan.
    pub splits: usize,
}

impl std::fmt::Display for ExportReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} rows exported ({} by this run), {} splits",
            self.rows_total, self.rows, self.splits
        )
    }
}

/// A split as the state file keeps it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct SavedSplit {
    ranges: Vec<(i64, i64)>,
    core: u32,
    node: i32,
    shard: u32,
    /// Base64 page token the split resumes at; empty = from its start.
    token: String,
    done: bool,
}

/// The resume state: the export's identity, its splits' progress, the output's length.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct State {
    table: String,
    columns: Vec<String>,
    r#where: String,
    format: String,
    splits: Vec<SavedSplit>,
    output_bytes: u64,
    rows: u64,
    /// The CSV header is written.
    header: bool,
}

impl State {
    fn load(path: &Path) -> anyhow::Result<Option<State>> {
        match std::fs::read(path) {
            Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).map_err(|e| {
                anyhow::anyhow!("--resume {}: not a shardgate export state file: {e}", path.display())
            })?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(anyhow::anyhow!("--resume {}: {e}", path.display())),
        }
    }

    /// Written to a temporary file, synced, then renamed over the old state.
    fn save(&self, path: &Path) -> anyhow::Result<()> {
        let temporary = path.with_extension("tmp");
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(&serde_json::to_vec(self)?)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)?;
        Ok(())
    }
}

fn format_name(format: Format) -> &'static str {
    match format {
        Format::Jsonl => "jsonl",
        Format::Csv => "csv",
    }
}

fn saved(split: &Split) -> SavedSplit {
    SavedSplit {
        ranges: split.ranges.iter().map(|r| (r.start, r.end)).collect(),
        core: split.core,
        node: split.node,
        shard: split.shard,
        token: String::new(),
        done: false,
    }
}

fn split_of(saved: &SavedSplit) -> Split {
    Split {
        ranges: saved
            .ranges
            .iter()
            .map(|&(start, end)| TokenRange { start, end })
            .collect(),
        core: saved.core,
        node: saved.node,
        shard: saved.shard,
    }
}

/// Runs an export; `progress` draws a bar when true.
pub async fn run(spec: ExportSpec, progress: bool) -> anyhow::Result<ExportReport> {
    anyhow::ensure!(
        spec.resume.is_none() || spec.output.is_some(),
        "--resume needs --output: stdout cannot be truncated to where the state says"
    );
    let client = ShardAwareClient::connect(spec.endpoint.clone(), &[&spec.table]).await?;
    let previous = match &spec.resume {
        Some(path) => State::load(path)?,
        None => None,
    };
    let mut state = match previous {
        Some(state) => {
            anyhow::ensure!(
                state.table == spec.table
                    && state.columns == spec.columns
                    && state.r#where == spec.r#where
                    && state.format == format_name(spec.format),
                "the state file is of another export ({} columns {:?} where {:?}, {}); remove it to start over",
                state.table,
                state.columns,
                state.r#where,
                state.format
            );
            state
        }
        None => {
            let splits = client
                .query_client()
                .plan_scan(PlanScanRequest {
                    table: spec.table.clone(),
                    min_splits: 0,
                })
                .await?
                .into_inner()
                .splits;
            State {
                table: spec.table.clone(),
                columns: spec.columns.clone(),
                r#where: spec.r#where.clone(),
                format: format_name(spec.format).into(),
                splits: splits.iter().map(saved).collect(),
                output_bytes: 0,
                rows: 0,
                header: false,
            }
        }
    };
    let mut out: Box<dyn Write> = match &spec.output {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(path)
                .map_err(|e| anyhow::anyhow!("--output {}: {e}", path.display()))?;
            let length = file.metadata()?.len();
            anyhow::ensure!(
                length >= state.output_bytes,
                "--output {} holds {length} bytes, fewer than the {} the state file counts (lost in a crash?); remove both to start over",
                path.display(),
                state.output_bytes
            );
            // Whatever a stopped run wrote after its last saved state goes.
            file.set_len(state.output_bytes)?;
            let mut file = std::io::BufWriter::new(file);
            std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(state.output_bytes))?;
            Box::new(file)
        }
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let open: Vec<usize> = (0..state.splits.len()).filter(|&i| !state.splits[i].done).collect();
    let request = ScanRequest {
        table: spec.table.clone(),
        columns: spec.columns.clone(),
        r#where: spec.r#where.clone(),
        allow_filtering: spec.allow_filtering,
        options: Some(QueryOptions {
            page_size: spec.page_size,
            ..Default::default()
        }),
        ..Default::default()
    };
    let base64 = base64::engine::general_purpose::STANDARD;
    let splits = open.iter().map(|&i| split_of(&state.splits[i])).collect();
    // A token that does not decode would restart its split and repeat rows the output holds.
    let resume = open
        .iter()
        .map(|&i| {
            base64.decode(&state.splits[i].token).map_err(|e| {
                anyhow::anyhow!(
                    "the state file's splits[{i}].token is not base64 ({e}); remove the state file and the output to start over"
                )
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let mut pages = client.scan(request, splits, resume, spec.parallel.max(1));
    let started = Instant::now();
    let total_splits = state.splits.len();
    let bar = progress.then(|| {
        let bar = indicatif::ProgressBar::new(total_splits as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len} splits, {elapsed}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_position(state.splits.iter().filter(|s| s.done).count() as u64);
        bar
    });
    let mut report = ExportReport {
        splits: total_splits,
        ..Default::default()
    };
    let mut written_bytes = state.output_bytes;
    let mut columns: Option<Vec<String>> = None;
    while let Some(page) = pages.recv().await {
        let page = page?;
        let result = page.result;
        if columns.is_none() && !result.columns.is_empty() {
            columns = Some(result.columns.iter().map(|c| c.name.clone()).collect());
        }
        let names = columns.as_deref().unwrap_or_default();
        let mut text = Vec::new();
        if spec.format == Format::Csv && !state.header && !names.is_empty() {
            let mut header = csv::Writer::from_writer(Vec::new());
            header.write_record(names)?;
            text.extend(header.into_inner().map_err(|e| anyhow::anyhow!("csv: {e}"))?);
            state.header = true;
        }
        for row in &result.rows {
            match spec.format {
                Format::Jsonl => {
                    serde_json::to_writer(&mut text, &json_object(names, row))?;
                    text.push(b'\n');
                }
                Format::Csv => {
                    let mut line = csv::Writer::from_writer(Vec::new());
                    line.write_record(row.values.iter().map(csv_of))?;
                    text.extend(line.into_inner().map_err(|e| anyhow::anyhow!("csv: {e}"))?);
                }
            }
        }
        out.write_all(&text)?;
        written_bytes += text.len() as u64;
        let rows = result.rows.len() as u64;
        report.rows += rows;
        state.rows += rows;
        let index = open[page.split];
        state.splits[index].token = base64.encode(&page.token);
        state.splits[index].done = page.token.is_empty();
        state.output_bytes = written_bytes;
        if let Some(path) = &spec.resume {
            // The rows reach the file before the state that counts them.
            out.flush()?;
            state.save(path)?;
        }
        if let Some(bar) = &bar {
            bar.set_position(state.splits.iter().filter(|s| s.done).count() as u64);
            let seconds = started.elapsed().as_secs_f64().max(1e-3);
            bar.set_message(format!(
                "{} rows, {:.0} rows/s",
                state.rows,
                report.rows as f64 / seconds
            ));
        }
    }
    out.flush()?;
    drop(out);
    if let Some(bar) = bar {
        bar.finish();
    }
    anyhow::ensure!(
        state.splits.iter().all(|s| s.done),
        "the scan ended with {} of {} splits unfinished",
        state.splits.iter().filter(|s| !s.done).count(),
        state.splits.len()
    );
    report.rows_total = state.rows;
    Ok(report)
}

/// A row as a JSON object of its columns (`names` in row order), values as [`json_of`] writes
/// them: a line of `--format jsonl`, a job's `row` and its broker messages.
pub fn json_object(names: &[String], row: &crate::wire::proto::Row) -> serde_json::Map<String, serde_json::Value> {
    names
        .iter()
        .zip(&row.values)
        .map(|(name, value)| (name.clone(), json_of(value)))
        .collect()
}

/// A typed value as JSON, in the forms the mapping reads back: text as strings, integers and
/// floats as numbers (non-finite floats as strings), timestamps, dates and times as ISO-8601
/// text, decimals and varints as exact decimal strings, UUIDs hyphenated, inets as addresses,
/// blobs as base64, lists, sets, vectors and tuples as arrays, maps with text keys as objects
/// (else arrays of `[key, value]`), user types as objects.
pub fn json_of(value: &Value) -> serde_json::Value {
    use serde_json::Value as J;
    let Some(kind) = &value.kind else {
        return J::Null;
    };
    let float = |f: f64| serde_json::Number::from_f64(f).map_or_else(|| J::String(f.to_string()), J::Number);
    match kind {
        Kind::Null(_) | Kind::Unset(_) => J::Null,
        Kind::Text(s) => J::String(s.clone()),
        Kind::Int(i) => J::from(*i),
        Kind::Float(f) => float(f64::from(*f)),
        Kind::Double(d) => float(*d),
        Kind::Boolean(b) => J::Bool(*b),
        Kind::Blob(b) => J::String(base64::engine::general_purpose::STANDARD.encode(b)),
        Kind::Uuid(b) | Kind::Timeuuid(b) => J::String(
            <[u8; 16]>::try_from(b.as_slice())
                .map(|bytes| uuid::Uuid::from_bytes(bytes).to_string())
                .unwrap_or_default(),
        ),
        Kind::TimestampMs(ms) => J::String(
            chrono::DateTime::from_timestamp_millis(*ms)
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                .unwrap_or_else(|| ms.to_string()),
        ),
        Kind::DateDays(days) => J::String(
            chrono::DateTime::from_timestamp(i64::from(*days) * 86_400, 0)
                .map(|t| t.date_naive().to_string())
                .unwrap_or_else(|| days.to_string()),
        ),
        Kind::TimeNs(ns) => {
            let seconds = ns / 1_000_000_000;
            J::String(format!(
                "{:02}:{:02}:{:02}.{:09}",
                seconds / 3600,
                seconds / 60 % 60,
                seconds % 60,
                ns % 1_000_000_000
            ))
        }
        Kind::Decimal(d) => J::String(
            bigdecimal::BigDecimal::new(
                num_bigint::BigInt::from_signed_bytes_be(&d.unscaled),
                i64::from(d.scale),
            )
            .to_string(),
        ),
        Kind::Varint(b) => J::String(num_bigint::BigInt::from_signed_bytes_be(b).to_string()),
        Kind::Inet(b) => J::String(match b.len() {
            4 => <[u8; 4]>::try_from(b.as_slice())
                .map(|a| std::net::Ipv4Addr::from(a).to_string())
                .unwrap_or_default(),
            _ => <[u8; 16]>::try_from(b.as_slice())
                .map(|a| std::net::Ipv6Addr::from(a).to_string())
                .unwrap_or_default(),
        }),
        Kind::List(items) | Kind::Set(items) | Kind::Tuple(items) | Kind::Vector(items) => {
            J::Array(items.values.iter().map(json_of).collect())
        }
        Kind::Map(map) => {
            let text_keys = map
                .entries
                .iter()
                .all(|e| matches!(e.key.as_ref().and_then(|k| k.kind.as_ref()), Some(Kind::Text(_))));
            if text_keys {
                J::Object(
                    map.entries
                        .iter()
                        .map(|e| {
                            let key = match e.key.as_ref().and_then(|k| k.kind.as_ref()) {
                                Some(Kind::Text(s)) => s.clone(),
                                _ => String::new(),
                            };
                            (key, e.value.as_ref().map_or(J::Null, json_of))
                        })
                        .collect(),
                )
            } else {
                J::Array(
                    map.entries
                        .iter()
                        .map(|e| {
                            J::Array(vec![
                                e.key.as_ref().map_or(J::Null, json_of),
                                e.value.as_ref().map_or(J::Null, json_of),
                            ])
                        })
                        .collect(),
                )
            }
        }
        Kind::Udt(udt) => J::Object(
            udt.fields
                .iter()
                .map(|f| (f.name.clone(), f.value.as_ref().map_or(J::Null, json_of)))
                .collect(),
        ),
        Kind::Duration(d) => J::String(format!("{}mo{}d{}ns", d.months, d.days, d.nanoseconds)),
    }
}

/// A typed value as one CSV field: scalars as in [`json_of`] without quotes, null as an empty
/// field, collections as JSON text.
pub fn csv_of(value: &Value) -> String {
    match json_of(value) {
        serde_json::Value::Null => String::new(),
        serde_json::Value::String(s) => s,
        other => other.to_string(),
    }
}
