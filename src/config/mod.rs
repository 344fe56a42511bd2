//! Configuration: raw serde structs read from TOML, then [`RawConfig::validate`] (pure, no IO)
//! turns them into the validated types the rest of the gateway uses.
//!
//! One file per TOML section, each with its raw table, its validated type and its `validate`
//! side by side (`cluster`, `runtime`, `ingest`, `route`, `source`, `dead_letter`, `job`,
//! `query`, and `kafka_security` / `nats_security` / `amqp_security` shared by every Kafka / NATS /
//! RabbitMQ client); `error` is
//! the one error type, `check` the validators sections share, `de` the TOML reading. This file
//! holds the top level: [`RawConfig`], [`Config`] and loading.
//!
//! Runs on the main thread before anything starts. Every error names the key, the bad value and
//! what is expected; unknown keys are errors (`deny_unknown_fields`). Connectivity and the
//! cluster schema are checked later, at start-up (`app`), never here.

mod admin;
mod amqp_security;
mod check;
mod cluster;
mod de;
mod dead_letter;
mod error;
mod ingest;
mod job;
mod kafka_security;
mod nats_security;
mod query;
mod route;
mod runtime;
mod source;
mod summary;
mod zmq_security;

pub use admin::{AdminConfig, RawAdmin};
pub use amqp_security::{AmqpSecurity, RawAmqpSecurity};
pub use check::redact_url;
pub use cluster::{ClusterConfig, RawCluster};
pub use dead_letter::{
    DeadLetterConfig, RawDeadLetter, RawKafkaDeadLetter, RawNatsDeadLetter, RawRabbitMqDeadLetter, RawTableDeadLetter,
};
pub use error::ConfigError;
pub use ingest::{IngestConfig, RawIngest, TlsConfig};
pub use job::{
    AggregateConfig, JobConfig, JobSinkConfig, MeasureConfig, MeasureKind, RawAggregate, RawJob, RawJobSink,
    RawJobSource, RawKafkaJobSink, RawNatsJobSink, RawRabbitMqJobSink, RawWindow, WindowConfig, WindowSpec,
};
pub use kafka_security::{KafkaSecurity, RawKafkaSecurity};
pub use nats_security::{NatsLogin, NatsSecurity, RawNatsSecurity};
pub use query::{QueryConfig, RawQuery};
pub use route::{
    AckMode, ColumnMapping, FieldRef, Format, ProtobufConfig, RawColumn, RawFlatBuffers, RawProtobuf, RawRoute,
    RawTarget, RouteConfig, TargetConfig, TimeUnit, TimestampConfig, TtlConfig,
};
pub use runtime::{RawRuntime, RuntimeConfig, SpoolConfig};
pub use source::{
    AmqpSourceConfig, JetStreamSourceConfig, KafkaSourceConfig, NatsSourceConfig, RawJetStreamSource, RawKafkaSource,
    RawNatsSource, RawRabbitMqSource, RawSource, RawZeroMqSource, SourceConfig, StartFrom, ZmqSocketKind,
    ZmqSourceConfig,
};
pub use zmq_security::{curve_key, curve_key_text, read_curve_secret_key, RawZmqSecurity, ZmqSecurity};

use std::path::Path;

use cluster::validate_cluster;
use ingest::validate_ingest;
use job::validate_job;
use query::validate_query;
use route::validate_route;
use runtime::validate_runtime;
use schemars::JsonSchema;
use serde::Deserialize;

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// How to reach the database cluster.
    pub cluster: ClusterConfig,
    /// Cores, island threads and per-core limits.
    pub runtime: RuntimeConfig,
    /// Source → table routes; at least one unless the ingest API is on.
    pub routes: Vec<RouteConfig>,
    /// The gRPC ingest API, if served.
    pub ingest: Option<IngestConfig>,
    /// The gRPC query API's defaults and limits (served with the ingest API, on its
    /// listeners).
    pub query: QueryConfig,
    /// The admin port (metrics, health), if served.
    pub admin: Option<AdminConfig>,
    /// Processing jobs (`shardgate job run`).
    pub jobs: Vec<JobConfig>,
}

impl Config {
    /// This gateway's stable name: `runtime.gateway_id`, else `<hostname>-<port>` of the
    /// ingest (else admin) listener when its port is fixed; `None` when neither gives one.
    /// Reads the host name, so call it at start-up, not from `validate`.
    pub fn gateway_id(&self) -> Option<String> {
        if let Some(id) = &self.runtime.gateway_id {
            return Some(id.clone());
        }
        let port = [
            self.ingest.as_ref().map(|i| i.listen.port()),
            self.admin.as_ref().map(|a| a.listen.port()),
        ]
        .into_iter()
        .flatten()
        .find(|&port| port != 0)?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let host: String = host
            .trim()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "._-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .take(48)
            .collect();
        let host = if host.is_empty() { "localhost".to_string() } else { host };
        Some(format!("{host}-{port}"))
    }

    /// Reads and validates a config file. Does no network IO.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates config text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        de::parse::<RawConfig>(text, origin)?.validate()
    }
}

/// Top level of a shardgate config file.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// `[cluster]`: how to reach the database.
    pub cluster: RawCluster,
    /// `[runtime]`: cores and limits; every key has a default.
    #[serde(default)]
    pub runtime: RawRuntime,
    /// `[[route]]`: one or more tables per entry, fed by one source.
    #[serde(default, rename = "route")]
    pub routes: Vec<RawRoute>,
    /// `[ingest]`: the gRPC ingest API. Absent: no gRPC port.
    #[serde(default)]
    pub ingest: Option<RawIngest>,
    /// `[admin]`: metrics and health endpoints. Absent: no admin port.
    #[serde(default)]
    pub admin: Option<RawAdmin>,
    /// `[query]`: the gRPC query API, served on the `[ingest]` listeners; every key has a
    /// default.
    #[serde(default)]
    pub query: Option<RawQuery>,
    /// `[[job]]`: processing jobs, run through the `[ingest]` listener by `shardgate job run`.
    #[serde(default, rename = "job")]
    pub jobs: Vec<RawJob>,
}

impl RawConfig {
    /// Validates without IO. Errors name the key, the value and what is expected.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let cluster = validate_cluster(self.cluster)?;
        let runtime = validate_runtime(self.runtime)?;
        let ingest = self.ingest.map(validate_ingest).transpose()?;
        if self.query.is_some() && ingest.is_none() {
            return Err(ConfigError::invalid(
                "query",
                "a table",
                "an `[ingest]` table too: the query API is served on its listeners",
            ));
        }
        let query = validate_query(
            self.query.unwrap_or_default(),
            runtime.spool.as_ref().map(|spool| spool.dir.as_path()),
        )?;
        let admin = self.admin.map(admin::validate_admin).transpose()?;
        if self.routes.is_empty() && ingest.is_none() {
            return Err(ConfigError::invalid(
                "route",
                "[]",
                "at least one `[[route]]` table, or an `[ingest]` table",
            ));
        }
        let mut routes = Vec::with_capacity(self.routes.len());
        for (index, raw) in self.routes.into_iter().enumerate() {
            let route = validate_route(index, raw)?;
            if routes.iter().any(|r: &RouteConfig| r.name == route.name) {
                return Err(ConfigError::invalid(
                    format!("route[{index}].name"),
                    &route.name,
                    "a name no other route uses",
                ));
            }
            if route.ack == AckMode::Spooled && runtime.spool.is_none() {
                return Err(ConfigError::invalid(
                    format!("route[{index}].ack"),
                    "spooled",
                    "`runtime.spool_dir` set to a directory for the per-core spools",
                ));
            }
            routes.push(route);
        }
        if let Some(IngestConfig {
            auth: Some(auth), tls, ..
        }) = &ingest
        {
            let own_certificate = tls.as_ref().is_some_and(|tls| tls.client_identity.is_some());
            if !self.jobs.is_empty() && auth.client_token.is_none() && !own_certificate {
                return Err(ConfigError::invalid(
                    "ingest.auth.client_token_file",
                    "absent",
                    "a file with the token of a principal allowed the jobs' tables (the jobs call this \
                     gateway's API as that principal), or `ingest.tls.client_cert_file` of a principal's certificate",
                ));
            }
        }
        if !self.jobs.is_empty() && ingest.is_none() {
            return Err(ConfigError::invalid(
                "job",
                format!("{} job(s)", self.jobs.len()),
                "an `[ingest]` table too: jobs read and write through its listener",
            ));
        }
        let mut jobs = Vec::with_capacity(self.jobs.len());
        for (index, raw) in self.jobs.into_iter().enumerate() {
            let job = validate_job(index, raw)?;
            if jobs.iter().any(|j: &JobConfig| j.name == job.name) {
                return Err(ConfigError::invalid(
                    format!("job[{index}].name"),
                    &job.name,
                    "a name no other job uses",
                ));
            }
            for (i, name) in job.stream.iter().enumerate() {
                match routes.iter().find(|r| &r.name == name) {
                    Some(RouteConfig {
                        source: SourceConfig::Kafka(_) | SourceConfig::JetStream(_),
                        ..
                    }) => {}
                    Some(_) => {
                        return Err(ConfigError::invalid(
                            format!("job[{index}].source.stream[{i}]"),
                            name,
                            "a Kafka or JetStream route (a stream job keeps each partition's offset or the \
                             stream's sequence with its state, which is how it never counts a message twice; \
                             RabbitMQ, NATS core and ZeroMQ cannot be read again from a position)",
                        ))
                    }
                    None => {
                        return Err(ConfigError::invalid(
                            format!("job[{index}].source.stream[{i}]"),
                            name,
                            "the name of a `[[route]]` in this config",
                        ))
                    }
                }
            }
            if let Some(name) = &job.replay {
                let key = format!("job[{index}].source.replay");
                match routes.iter().find(|r| &r.name == name) {
                    Some(RouteConfig {
                        dead_letter: DeadLetterConfig::Kafka { .. } | DeadLetterConfig::Table { .. },
                        ..
                    }) => {}
                    Some(_) => {
                        return Err(ConfigError::invalid(
                            key,
                            name,
                            "a route whose dead letters go to a Kafka topic or a table (a NATS subject keeps \
                             nothing to replay; RabbitMQ dead letters are shovelled back into the source queue)",
                        ))
                    }
                    None => {
                        return Err(ConfigError::invalid(
                            key,
                            name,
                            "the name of a `[[route]]` in this config",
                        ))
                    }
                }
            }
            jobs.push(job);
        }
        Ok(Config {
            cluster,
            runtime,
            routes,
            ingest,
            query,
            admin,
            jobs,
        })
    }
}

#[cfg(test)]
mod tests;
