//! The ScyllaDB / Cassandra sink: one driver `Session` (built on the island, shared by every
//! core), the one schema lookup and prepare path (this file), statement text (`statement`),
//! table schemas (`schema`), bound rows (`bound`), retry policy (`retry`) and the one write engine
//! (`writer`) that routes, the ingest API and `shardgate replay` write through.
//!
//! Threads: `connect`, `table_schema` and `prepare_insert` run on the island at start-up (and on
//! a core when the ingest API meets a new table); `writer` runs on the core that owns the rows
//! (serialization and response parsing happen there; the connection's socket tasks live on the
//! island).
//!
//! Contract: a write is a success only when the cluster confirms it at the configured
//! consistency; transient failures (timeouts, unavailable, overloaded, lost connections) retry
//! with capped exponential backoff, never counting as success; permanent failures (the server
//! rejects the statement or value) are returned for dead-lettering.

pub mod bound;
pub mod retry;
pub mod schema;
pub mod statement;
pub mod writer;

use std::time::Duration;

use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::policies::load_balancing::DefaultPolicy;
use scylla::statement::prepared::PreparedStatement;

pub use self::schema::{RowValues, TableSchema};
use crate::config::ClusterConfig;

/// How long start-up waits for the first connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors at start-up: connecting, reading the schema, preparing.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// No contact point answered.
    #[error("cannot connect to the cluster at {contact_points}: {reason}")]
    Connect {
        /// Configured contact points.
        contact_points: String,
        /// Driver's error.
        reason: String,
    },
    /// The cluster answered but refused the gateway: its credentials or the TLS handshake.
    /// Retrying cannot help, so start-up stops at once.
    #[error("the cluster at {contact_points} refused the gateway ({hint}): {reason}")]
    Refused {
        /// Configured contact points.
        contact_points: String,
        /// Which keys to look at.
        hint: &'static str,
        /// Driver's error.
        reason: String,
    },
    /// The keyspace or table does not exist in the cluster.
    #[error("route `{route}`: table `{keyspace}.{table}` does not exist in the cluster")]
    TableNotFound {
        /// Route name.
        route: String,
        /// Keyspace as configured.
        keyspace: String,
        /// Table as configured.
        table: String,
    },
    /// The insert statement could not be prepared.
    #[error("cannot prepare `{statement}`: {reason}")]
    Prepare {
        /// The CQL text.
        statement: String,
        /// Driver's error.
        reason: String,
    },
}

/// Connects the session. Run on the island.
pub async fn connect(cluster: &ClusterConfig) -> Result<Session, SinkError> {
    let mut policy = DefaultPolicy::builder().token_aware(true);
    if let Some(dc) = &cluster.local_datacenter {
        // Failover stays permitted: with it off, a SimpleStrategy keyspace (common in tests and
        // single-DC clusters) makes the driver warn on every request. LOCAL_* consistency still
        // keeps writes in the local data center.
        policy = policy.prefer_datacenter(dc.clone()).permit_dc_failover(true);
    }
    let profile = ExecutionProfile::builder()
        .consistency(cluster.consistency)
        .request_timeout(Some(cluster.request_timeout))
        .load_balancing_policy(policy.build())
        .build();
    let mut builder = SessionBuilder::new()
        .known_nodes(&cluster.contact_points)
        .default_execution_profile_handle(profile.into_handle());
    if let Some(tls) = &cluster.tls {
        builder = builder.tls_context(Some(tls.clone()));
    }
    if let Some(credentials) = &cluster.credentials {
        builder = builder.user(&credentials.username, &credentials.password);
    }
    let build = builder.build();
    let connect_error = |reason: String| match refusal(&reason) {
        Some(hint) => SinkError::Refused {
            contact_points: cluster.contact_points.join(", "),
            hint,
            reason,
        },
        None => SinkError::Connect {
            contact_points: cluster.contact_points.join(", "),
            reason,
        },
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, build).await {
        Ok(Ok(session)) => Ok(session),
        Ok(Err(e)) => Err(connect_error(e.to_string())),
        Err(_) => Err(connect_error(format!(
            "no answer within {} s",
            CONNECT_TIMEOUT.as_secs()
        ))),
    }
}

/// Whether a driver's connection error is the cluster refusing the gateway rather than being
/// unreachable, and which keys to look at. The driver's errors carry the cause only as text.
pub fn refusal(reason: &str) -> Option<&'static str> {
    let reason = reason.to_ascii_lowercase();
    if ["authenticat", "password", "credentials", "auth_response"]
        .iter()
        .any(|word| reason.contains(word))
    {
        Some("check `cluster.auth.username` and `cluster.auth.password_file`")
    } else if ["certificate", "tls", "handshake", "alert"]
        .iter()
        .any(|word| reason.contains(word))
    {
        Some("the TLS handshake failed: check `cluster.tls` (`ca_file`, `cert_file`, `verify_hostname`) against the nodes' `client_encryption_options`")
    } else {
        None
    }
}

/// Reads a table's schema from the session's cluster state, refreshing it once if missing.
pub async fn table_schema(
    session: &Session,
    route: &str,
    keyspace: &str,
    table: &str,
) -> Result<TableSchema, SinkError> {
    let lookup = |session: &Session| cached_table_schema(session, keyspace, table);
    if let Some(schema) = lookup(session) {
        return Ok(schema);
    }
    // A table created moments ago may not be in the cached metadata yet.
    if let Err(e) = session.refresh_metadata().await {
        tracing::warn!(error = %e, "schema refresh failed");
    }
    lookup(session).ok_or_else(|| SinkError::TableNotFound {
        route: route.to_string(),
        keyspace: keyspace.to_string(),
        table: table.to_string(),
    })
}

/// A table's schema from the driver's cached metadata (no IO).
pub fn cached_table_schema(session: &Session, keyspace: &str, table: &str) -> Option<TableSchema> {
    let state = session.get_cluster_state();
    state
        .get_keyspace(keyspace)?
        .tables
        .get(table)
        .map(TableSchema::from_driver)
}

/// Prepares an insert. Writes carry explicit timestamps, so they are marked idempotent and the
/// driver may retry them.
pub async fn prepare_insert(session: &Session, statement: &str) -> Result<PreparedStatement, SinkError> {
    let mut prepared = session.prepare(statement).await.map_err(|e| SinkError::Prepare {
        statement: statement.to_string(),
        reason: e.to_string(),
    })?;
    prepared.set_is_idempotent(true);
    Ok(prepared)
}
