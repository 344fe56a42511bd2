//! `/v1/cores` on the admin port: the gateway's totals per core, per route and per job as JSON
//! ([`Snapshot`]), read from the same registry `/metrics` renders, so the two always agree;
//! `shardgate top` turns two snapshots into rates ([`View`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::metric;

/// One core's totals and gauges.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CoreTotals {
    /// The data-plane core's index.
    pub core: usize,
    /// Share of the last second its thread was on the CPU, 0 to 1.
    pub busy: f64,
    /// Rows received (every source and the ingest API).
    pub rows_received: f64,
    /// Rows confirmed by the database.
    pub rows_written: f64,
    /// Rows handed to their owner core.
    pub rows_forwarded: f64,
    /// Rows dead-lettered or refused.
    pub rows_failed: f64,
    /// Ingest API rows admitted and not yet answered.
    pub in_flight: f64,
    /// Bytes in its live spool segments.
    pub spool_bytes: f64,
    /// Spooled records waiting on its disk for memory.
    pub spool_deferred_records: f64,
    /// The 0.99 quantile of its database writes' latency, seconds (the largest over its
    /// tables and sources); 0 before any write.
    pub write_p99_seconds: f64,
}

/// One route's totals and its source's backlog.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RouteTotals {
    /// The route's `name`.
    pub route: String,
    /// Rows received from its source.
    pub rows_received: f64,
    /// Rows written.
    pub rows_written: f64,
    /// Rows dead-lettered or refused.
    pub rows_failed: f64,
    /// Kafka: messages not yet consumed, every partition.
    pub kafka_lag: Option<f64>,
    /// Kafka: partitions assigned to this gateway.
    pub kafka_partitions: Option<f64>,
    /// JetStream: messages not yet delivered to the durable.
    pub jetstream_pending: Option<f64>,
    /// RabbitMQ: deliveries not yet acknowledged.
    pub amqp_unacked: Option<f64>,
}

/// One job's totals (runs inside `serve`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobTotals {
    /// The job's `name`.
    pub job: String,
    /// Rows read.
    pub rows_read: f64,
    /// Results written (once per sink).
    pub rows_out: f64,
    /// Scan jobs: splits of the current run done, and in all.
    pub splits_done: Option<f64>,
    /// See `splits_done`.
    pub splits_total: Option<f64>,
    /// Stream jobs: the watermark behind the wall clock, seconds.
    pub watermark_lag_seconds: Option<f64>,
}

/// What `/v1/cores` answers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// When it was taken, seconds since the Unix epoch.
    pub at: f64,
    /// `/ready`'s answer.
    pub ready: bool,
    /// Every core, by index.
    pub cores: Vec<CoreTotals>,
    /// Every route that has received or exported anything, by name.
    pub routes: Vec<RouteTotals>,
    /// Every job with a metric, by name.
    pub jobs: Vec<JobTotals>,
    /// Spooled records waiting on disk for memory, all cores.
    pub spool_deferred_records: f64,
}

/// One sample of Prometheus text: its name, labels and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name (with `_sum` / `_count` for a summary's parts).
    pub name: String,
    /// Label pairs, in order.
    pub labels: Vec<(String, String)>,
    /// Value (`NaN` kept).
    pub value: f64,
}

impl Sample {
    /// The value of label `name`.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// The samples of Prometheus text format 0.0.4 (comments and malformed lines skipped).
pub fn parse_prometheus_text(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_string();
    let mut labels = Vec::new();
    let mut rest = &line[name_end..];
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        let mut key = String::new();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '}' => {
                    end = Some(i + 1);
                    break;
                }
                ',' | ' ' => {}
                '=' => {
                    if chars.next()?.1 != '"' {
                        return None;
                    }
                    let mut value = String::new();
                    loop {
                        let (_, c) = chars.next()?;
                        match c {
                            '\\' => match chars.next()?.1 {
                                'n' => value.push('\n'),
                                other => value.push(other),
                            },
                            '"' => break,
                            other => value.push(other),
                        }
                    }
                    labels.push((std::mem::take(&mut key), value));
                }
                other => key.push(other),
            }
        }
        rest = &inner[end?..];
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        other => other.parse().ok()?,
    };
    Some(Sample { name, labels, value })
}

impl Snapshot {
    /// The snapshot of `samples` (a render of the registry), taken at `at`.
    pub fn of(samples: &[Sample], at: f64, ready: bool) -> Snapshot {
        let mut cores: BTreeMap<usize, CoreTotals> = BTreeMap::new();
        let mut routes: BTreeMap<String, RouteTotals> = BTreeMap::new();
        let mut jobs: BTreeMap<String, JobTotals> = BTreeMap::new();
        let add = |slot: &mut Option<f64>, value: f64| *slot = Some(slot.unwrap_or(0.0) + value);
        for sample in samples {
            let value = if sample.value.is_finite() { sample.value } else { 0.0 };
            let core = sample.label("core").and_then(|c| c.parse::<usize>().ok());
            let source = sample.label("source").filter(|s| *s != "grpc");
            let job = sample.label("job");
            let name = sample.name.as_str();
            if let Some(core) = core {
                let totals = cores.entry(core).or_insert_with(|| CoreTotals {
                    core,
                    ..CoreTotals::default()
                });
                match name {
                    metric::CORE_BUSY => totals.busy = value,
                    metric::ROWS_RECEIVED => totals.rows_received += value,
                    metric::ROWS_WRITTEN => totals.rows_written += value,
                    metric::ROWS_FORWARDED => totals.rows_forwarded += value,
                    metric::ROWS_FAILED => totals.rows_failed += value,
                    metric::INGEST_ROWS_IN_FLIGHT => totals.in_flight += value,
                    metric::SPOOL_BYTES => totals.spool_bytes = value,
                    metric::SPOOL_DEFERRED_RECORDS => totals.spool_deferred_records = value,
                    metric::WRITE_LATENCY_SECONDS if sample.label("quantile") == Some("0.99") => {
                        totals.write_p99_seconds = totals.write_p99_seconds.max(value);
                    }
                    _ => {}
                }
            }
            let route = source.or_else(|| sample.label("route"));
            if let Some(route) = route {
                let counted = matches!(
                    name,
                    metric::ROWS_RECEIVED
                        | metric::ROWS_WRITTEN
                        | metric::ROWS_FAILED
                        | metric::KAFKA_CONSUMER_LAG
                        | metric::KAFKA_ASSIGNED_PARTITIONS
                        | metric::JETSTREAM_PENDING
                        | metric::AMQP_UNACKED
                );
                if counted {
                    let totals = routes.entry(route.to_string()).or_insert_with(|| RouteTotals {
                        route: route.to_string(),
                        ..RouteTotals::default()
                    });
                    match name {
                        metric::ROWS_RECEIVED => totals.rows_received += value,
                        metric::ROWS_WRITTEN => totals.rows_written += value,
                        metric::ROWS_FAILED => totals.rows_failed += value,
                        metric::KAFKA_CONSUMER_LAG => add(&mut totals.kafka_lag, value),
                        metric::KAFKA_ASSIGNED_PARTITIONS => add(&mut totals.kafka_partitions, value),
                        metric::JETSTREAM_PENDING => add(&mut totals.jetstream_pending, value),
                        _ => add(&mut totals.amqp_unacked, value),
                    }
                }
            }
            if let Some(job) = job {
                let totals = jobs.entry(job.to_string()).or_insert_with(|| JobTotals {
                    job: job.to_string(),
                    ..JobTotals::default()
                });
                match name {
                    metric::JOB_ROWS_READ => totals.rows_read += value,
                    metric::JOB_ROWS_OUT => totals.rows_out += value,
                    metric::JOB_SPLITS_DONE => add(&mut totals.splits_done, value),
                    metric::JOB_SPLITS_TOTAL => add(&mut totals.splits_total, value),
                    metric::JOB_WATERMARK_LAG => totals.watermark_lag_seconds = Some(value),
                    _ => {}
                }
            }
        }
        let deferred = cores.values().map(|c| c.spool_deferred_records).sum();
        Snapshot {
            at,
            ready,
            cores: cores.into_values().collect(),
            routes: routes.into_values().collect(),
            jobs: jobs.into_values().collect(),
            spool_deferred_records: deferred,
        }
    }
}

/// One core's line of `shardgate top`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CoreLine {
    /// The core's index.
    pub core: usize,
    /// CPU busy, percent.
    pub busy_percent: f64,
    /// Rows received per second.
    pub received_per_s: f64,
    /// Rows written per second.
    pub written_per_s: f64,
    /// Rows forwarded per second.
    pub forwarded_per_s: f64,
    /// Rows failed (dead-lettered or refused) per second.
    pub errors_per_s: f64,
    /// Ingest rows in flight.
    pub in_flight: f64,
    /// Spool, MiB.
    pub spool_mib: f64,
    /// Spooled records waiting on disk for memory.
    pub deferred: f64,
    /// Write latency p99, milliseconds.
    pub write_p99_ms: f64,
    /// The totals the rates came from (the second snapshot's).
    pub totals: CoreTotals,
}

/// One route's line of `shardgate top`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RouteLine {
    /// The route's name.
    pub route: String,
    /// Rows received per second.
    pub received_per_s: f64,
    /// Rows written per second.
    pub written_per_s: f64,
    /// Rows dead-lettered or refused per second.
    pub dead_letters_per_s: f64,
    /// What waits at the source: Kafka lag, JetStream pending or RabbitMQ unacked.
    pub pending: Option<f64>,
    /// The totals the rates came from.
    pub totals: RouteTotals,
}

/// One job's line of `shardgate top`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobLine {
    /// The job's name.
    pub job: String,
    /// Rows read per second.
    pub read_per_s: f64,
    /// Results written per second.
    pub out_per_s: f64,
    /// Scan jobs: splits done of the run, percent.
    pub progress_percent: Option<f64>,
    /// The totals the rates came from.
    pub totals: JobTotals,
}

/// What `shardgate top` shows (and `top --once --json` prints): rates between two snapshots.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct View {
    /// Seconds between the snapshots.
    pub interval_s: f64,
    /// The gateway's `/ready`.
    pub ready: bool,
    /// One line per core.
    pub cores: Vec<CoreLine>,
    /// One line per route.
    pub routes: Vec<RouteLine>,
    /// One line per job.
    pub jobs: Vec<JobLine>,
    /// Spooled records waiting on disk for memory.
    pub spool_deferred_records: f64,
}

impl View {
    /// The rates from `before` to `after` (counters that went down — a restarted gateway —
    /// count from zero).
    pub fn between(before: &Snapshot, after: &Snapshot) -> View {
        let seconds = (after.at - before.at).max(1e-3);
        let rate = |now: f64, then: Option<f64>| {
            let then = then.filter(|t| *t <= now).unwrap_or(0.0);
            (now - then) / seconds
        };
        let cores = after
            .cores
            .iter()
            .map(|now| {
                let then = before.cores.iter().find(|c| c.core == now.core);
                CoreLine {
                    core: now.core,
                    busy_percent: now.busy * 100.0,
                    received_per_s: rate(now.rows_received, then.map(|t| t.rows_received)),
                    written_per_s: rate(now.rows_written, then.map(|t| t.rows_written)),
                    forwarded_per_s: rate(now.rows_forwarded, then.map(|t| t.rows_forwarded)),
                    errors_per_s: rate(now.rows_failed, then.map(|t| t.rows_failed)),
                    in_flight: now.in_flight,
                    spool_mib: now.spool_bytes / (1024.0 * 1024.0),
                    deferred: now.spool_deferred_records,
                    write_p99_ms: now.write_p99_seconds * 1000.0,
                    totals: now.clone(),
                }
            })
            .collect();
        let routes = after
            .routes
            .iter()
            .map(|now| {
                let then = before.routes.iter().find(|r| r.route == now.route);
                RouteLine {
                    route: now.route.clone(),
                    received_per_s: rate(now.rows_received, then.map(|t| t.rows_received)),
                    written_per_s: rate(now.rows_written, then.map(|t| t.rows_written)),
                    dead_letters_per_s: rate(now.rows_failed, then.map(|t| t.rows_failed)),
                    pending: now.kafka_lag.or(now.jetstream_pending).or(now.amqp_unacked),
                    totals: now.clone(),
                }
            })
            .collect();
        let jobs = after
            .jobs
            .iter()
            .map(|now| {
                let then = before.jobs.iter().find(|j| j.job == now.job);
                JobLine {
                    job: now.job.clone(),
                    read_per_s: rate(now.rows_read, then.map(|t| t.rows_read)),
                    out_per_s: rate(now.rows_out, then.map(|t| t.rows_out)),
                    progress_percent: match (now.splits_done, now.splits_total) {
                        (Some(done), Some(total)) if total > 0.0 => Some(done / total * 100.0),
                        _ => None,
                    },
                    totals: now.clone(),
                }
            })
            .collect();
        View {
            interval_s: seconds,
            ready: after.ready,
            cores,
            routes,
            jobs,
            spool_deferred_records: after.spool_deferred_records,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP shardgate_rows_written_total Rows confirmed by the database.
# TYPE shardgate_rows_written_total counter
shardgate_rows_written_total{core="0",table="ks.orders",source="orders"} 120
shardgate_rows_written_total{core="1",table="ks.orders",source="orders"} 80
shardgate_rows_written_total{core="1",table="ks.events",source="grpc"} 5
shardgate_rows_received_total{core="0",table="ks.orders",source="orders"} 121
shardgate_rows_failed_total{core="0",table="ks.orders",source="orders",code="invalid_json"} 1
shardgate_core_busy_ratio{core="1"} 0.25
shardgate_write_latency_seconds{core="0",table="ks.orders",source="orders",quantile="0.99"} 0.012
shardgate_write_latency_seconds{core="0",table="ks.orders",source="orders",quantile="0.5"} 0.002
shardgate_write_latency_seconds_count{core="0",table="ks.orders",source="orders"} 30
shardgate_kafka_consumer_lag{route="orders",topic="t",partition="0"} 7
shardgate_kafka_consumer_lag{route="orders",topic="t",partition="1"} 3
shardgate_amqp_unacked{source="rabbit"} 12
shardgate_job_splits_done{job="daily"} 3
shardgate_job_splits{job="daily"} 12
shardgate_rows_read_total{core="0",table="ks.a \"quoted\", b",rpc="get"} NaN
shardgate_spool_deferred_records{core="0"} 1
shardgate_spool_deferred_records{core="1"} 3
"#;

    #[test]
    fn a_snapshot_sums_per_core_route_and_job() {
        let samples = parse_prometheus_text(TEXT);
        assert_eq!(samples.len(), 17);
        assert_eq!(samples[14].label("table"), Some("ks.a \"quoted\", b"));
        let snapshot = Snapshot::of(&samples, 10.0, true);
        assert_eq!(snapshot.cores.len(), 2);
        assert_eq!(snapshot.cores[0].rows_written, 120.0);
        assert_eq!(snapshot.cores[1].rows_written, 85.0);
        assert_eq!(snapshot.cores[1].busy, 0.25);
        assert_eq!(snapshot.cores[0].write_p99_seconds, 0.012);
        assert_eq!(snapshot.cores[0].rows_failed, 1.0);
        let orders = snapshot.routes.iter().find(|r| r.route == "orders").expect("orders");
        assert_eq!(orders.rows_written, 200.0);
        assert_eq!(orders.kafka_lag, Some(10.0));
        let rabbit = snapshot.routes.iter().find(|r| r.route == "rabbit").expect("rabbit");
        assert_eq!(rabbit.amqp_unacked, Some(12.0));
        assert!(snapshot.routes.iter().all(|r| r.route != "grpc"));
        assert_eq!(snapshot.jobs[0].splits_done, Some(3.0));
        assert_eq!(snapshot.spool_deferred_records, 4.0);
        assert_eq!(snapshot.cores[1].spool_deferred_records, 3.0);
    }

    #[test]
    fn a_view_turns_two_snapshots_into_rates() {
        let samples = parse_prometheus_text(TEXT);
        let before = Snapshot::of(&samples, 10.0, true);
        let mut after = before.clone();
        after.at = 12.0;
        after.cores[0].rows_written += 100.0;
        after.routes[0].rows_failed += 6.0;
        let view = View::between(&before, &after);
        assert_eq!(view.cores[0].written_per_s, 50.0);
        assert_eq!(view.cores[1].written_per_s, 0.0);
        assert_eq!(view.cores[1].busy_percent, 25.0);
        assert_eq!(view.cores[0].write_p99_ms, 12.0);
        assert_eq!(view.routes[0].dead_letters_per_s, 3.0);
        assert_eq!(view.routes[0].pending, Some(10.0));
        assert_eq!(view.jobs[0].progress_percent, Some(25.0));
        // A restarted gateway's counters start again from zero.
        let mut restarted = before.clone();
        restarted.at = 11.0;
        restarted.cores[0].rows_written = 10.0;
        assert_eq!(View::between(&before, &restarted).cores[0].written_per_s, 10.0);
    }
}
