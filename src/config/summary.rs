//! What `shardgate check` prints after `valid`: one line per listener, route and job — what
//! `serve` would run with the config. No secret appears: URLs, which may carry a login, are left
//! out (routes and sinks are named by topic, subject, queue or table).

use super::dead_letter::DeadLetterConfig;
use super::route::{AckMode, Format};
use super::source::SourceConfig;
use super::Config;

impl Config {
    /// The summary's lines.
    pub fn summary(&self) -> Vec<String> {
        let mut lines = Vec::new();
        let cluster = &self.cluster;
        lines.push(format!(
            "database: {} (datacenter {}, consistency {:?}{}{})",
            cluster.contact_points.join(", "),
            cluster.local_datacenter.as_deref().unwrap_or("any"),
            cluster.consistency,
            if cluster.tls.is_some() { ", TLS" } else { "" },
            if cluster.credentials.is_some() { ", login" } else { "" },
        ));
        lines.push(match self.runtime.cores {
            Some(cores) => format!("cores: {cores}"),
            None => "cores: one per physical core it may run on".to_string(),
        });
        if let Some(ingest) = &self.ingest {
            lines.push(format!(
                "gRPC API: {} (core i also on port {} + i){}{}",
                ingest.listen,
                ingest.core_port_base,
                if ingest.tls.is_some() { ", TLS" } else { "" },
                if ingest.auth.is_some() { ", ingest.auth" } else { "" },
            ));
        }
        if let Some(admin) = &self.admin {
            lines.push(format!(
                "admin port: {} (/metrics, /v1/cores, /live, /ready){}{}",
                admin.listen,
                if admin.tls.is_some() { ", HTTPS" } else { "" },
                if admin.token_sha256.is_some() { ", token" } else { "" },
            ));
        }
        for route in &self.routes {
            let format = match &route.format {
                Format::Json => "JSON",
                Format::Protobuf(_) => "Protobuf",
                Format::FlatBuffers(_) => "FlatBuffers",
                Format::Text => "text",
                Format::Bytes => "bytes",
            };
            let acknowledged = !matches!(route.source, SourceConfig::Nats(_) | SourceConfig::Zmq(_));
            let ack = match (acknowledged, route.ack) {
                (true, AckMode::Written) => "acknowledged once written",
                (true, AckMode::Spooled) => "acknowledged once spooled",
                (false, AckMode::Written) => "no acknowledgement: at most once",
                (false, AckMode::Spooled) => "no acknowledgement: at most once, spooled first",
            };
            lines.push(format!(
                "route `{}`: {} → {} ({format}, {ack}); dead letters → {}",
                route.name,
                source_label(&route.source),
                route.tables_label(),
                dead_letter_label(&route.dead_letter),
            ));
        }
        for job in &self.jobs {
            let input = if let Some(route) = &job.replay {
                format!("replay of route `{route}`'s dead letters")
            } else if !job.stream.is_empty() {
                format!("stream over route(s) {}", job.stream.join(", "))
            } else if job.query.is_some() {
                "query".to_string()
            } else {
                format!("scan of {}", job.table)
            };
            let sinks: Vec<String> = job.sinks.iter().map(|s| s.label()).collect();
            let every = job
                .every
                .map(|every| format!(", every {} s", every.as_secs()))
                .unwrap_or_default();
            let output = if sinks.is_empty() {
                String::new()
            } else {
                format!(" → {}", sinks.join(", "))
            };
            let aggregate = if job.aggregate.is_some() { ", aggregated" } else { "" };
            lines.push(format!("job `{}`: {input}{aggregate}{output}{every}", job.name));
        }
        lines
    }
}

fn source_label(source: &SourceConfig) -> String {
    match source {
        SourceConfig::Kafka(kafka) => format!(
            "Kafka topic {} (group {}{})",
            kafka.topic,
            kafka.group_id,
            if kafka.security.is_some() { ", secured" } else { "" }
        ),
        SourceConfig::JetStream(js) => format!("JetStream stream {} (durable {})", js.stream, js.durable),
        SourceConfig::Amqp(amqp) => format!("RabbitMQ queue {} (prefetch {})", amqp.queue, amqp.prefetch),
        SourceConfig::Zmq(zmq) => format!("ZeroMQ {:?} {}", zmq.socket, zmq.endpoint),
        SourceConfig::Nats(nats) => format!("NATS subject {}", nats.subject),
    }
}

fn dead_letter_label(dead_letter: &DeadLetterConfig) -> String {
    match dead_letter {
        DeadLetterConfig::Kafka { topic, .. } => format!("Kafka topic {topic}"),
        DeadLetterConfig::Nats { subject, .. } => format!("NATS subject {subject}"),
        DeadLetterConfig::Amqp {
            exchange, routing_key, ..
        } => format!("RabbitMQ exchange `{exchange}` routing key {routing_key}"),
        DeadLetterConfig::Table { keyspace, table, .. } => format!("table {keyspace}.{table}"),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    /// Every route and job of the example configs has its line, naming its source, tables and
    /// dead-letter destination; no broker URL (which may carry a login) is printed.
    #[test]
    fn the_summary_names_every_route_and_job_and_no_url() {
        let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut examples = vec![repo.join("deploy/shardgate.example.toml")];
        for entry in std::fs::read_dir(repo.join("deploy/examples")).expect("examples") {
            examples.push(entry.expect("entry").path());
        }
        for path in examples {
            let config = Config::load(&path).expect("a valid example");
            let text = config.summary().join("\n");
            for route in &config.routes {
                let line = text
                    .lines()
                    .find(|l| l.starts_with(&format!("route `{}`", route.name)))
                    .unwrap_or_else(|| panic!("{}: no line for route {}", path.display(), route.name));
                assert!(line.contains(&route.tables_label()), "{line}");
                assert!(line.contains("dead letters → "), "{line}");
            }
            for job in &config.jobs {
                assert!(text.contains(&format!("job `{}`", job.name)), "{text}");
            }
            for url in ["amqp://", "amqps://", "nats://", "tls://", "@"] {
                assert!(!text.contains(url), "{}: a URL in the summary:\n{text}", path.display());
            }
            assert!(text.starts_with("database: "), "{text}");
        }
    }
}
