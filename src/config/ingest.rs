//! `[ingest]`: the gRPC ingest API's listeners and limits — the raw table, its validated form
//! and `validate`. Pure.

use schemars::JsonSchema;
use serde::Deserialize;

use super::check::{parse_socket_addr, read_secret};
use super::error::ConfigError;
use crate::auth::{Credential, Principal, Principals, Scope};
use crate::tls::{ClientCerts, ClientTls, TlsError};

/// `[ingest]`
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawIngest {
    /// Shared gRPC address every core accepts on, e.g. `127.0.0.1:50051`.
    pub listen: String,
    /// First per-core port: core `i` also listens on `core_port_base + i` (same host). 0 turns
    /// per-core ports off (the shard-aware client then falls back to the shared port).
    #[serde(default)]
    pub core_port_base: u16,
    /// Host published to clients for the per-core ports. Default: the host of `listen`.
    #[serde(default)]
    pub advertise_host: Option<String>,
    /// Largest accepted request message in bytes (1024 to 268435456); a larger one is refused
    /// `TOO_LARGE` naming this key, and a stream goes on with its next message.
    #[serde(default = "default_message_bytes_max")]
    pub message_bytes_max: usize,
    /// `[ingest.tls]`: TLS on the shared and every per-core port (TLS 1.2 and 1.3, ALPN `h2`).
    /// Absent: plaintext.
    #[serde(default)]
    pub tls: Option<RawTls>,
    /// `[ingest.auth]`: who may call the API and what each may do. Absent: anyone who reaches
    /// the ports may call every RPC.
    #[serde(default)]
    pub auth: Option<RawAuth>,
}

/// `[ingest.auth]`: every RPC on the shared and per-core ports is made by a principal — known
/// by a bearer token or by its client certificate — and checked against its scopes.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    /// `[[ingest.auth.principal]]`: at least one.
    #[serde(default, rename = "principal")]
    pub principals: Vec<RawPrincipal>,
    /// File holding the bearer token the gateway's own clients present (jobs inside `serve`,
    /// `shardgate job run`, `shardgate export`): one principal's token. Needed when jobs are
    /// configured unless the gateway's own client certificate names a principal.
    #[serde(default)]
    pub client_token_file: Option<String>,
    /// `[ingest.auth.jwt]`: callers may also present a JWT (`authorization: Bearer <jwt>`)
    /// signed by a key of a JWKS file; its scopes claim gives what it may do.
    #[serde(default)]
    pub jwt: Option<RawJwt>,
}

/// `[ingest.auth.jwt]`: bearer JWTs verified against a JWKS file (public keys: RSA, EC P-256 /
/// P-384, Ed25519). Checked: the signature (the key the header's `kid` names, in an algorithm
/// that key allows), `exp` (required) and `nbf`, `iss` and `aud`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawJwt {
    /// The JWKS document (`{"keys": [...]}`), e.g. saved from the identity provider's
    /// `jwks_uri`. Read at start-up and by `shardgate check`.
    pub jwks_file: String,
    /// The `iss` every token must carry.
    pub issuer: String,
    /// The value the token's `aud` must hold.
    pub audience: String,
    /// The claim holding the caller's scopes (`write:shop.*`, …): a space-separated string or
    /// an array of strings. Scopes shardgate does not know (`openid`) are ignored.
    #[serde(default = "default_scopes_claim")]
    pub scopes_claim: String,
    /// The claim naming the caller (`jwt:<value>` in refusals and logs).
    #[serde(default = "default_subject_claim")]
    pub subject_claim: String,
    /// Clock skew allowed on `exp` and `nbf`, seconds (0 to 300).
    #[serde(default = "default_leeway_s")]
    pub leeway_s: u64,
}

fn default_scopes_claim() -> String {
    "scope".into()
}

fn default_subject_claim() -> String {
    "sub".into()
}

fn default_leeway_s() -> u64 {
    30
}

/// `[[ingest.auth.principal]]`: one caller and its scopes.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawPrincipal {
    /// Its name, in refusals, logs and the `principal` of errors.
    pub name: String,
    /// The SHA-256 (64 hex digits) of its bearer token, e.g. from
    /// `printf %s "$TOKEN" | sha256sum`. The token itself is never in the config.
    #[serde(default)]
    pub token_sha256: Option<String>,
    /// Or: the name its client certificate goes by (subject CN, or a DNS or URI SAN); needs
    /// `ingest.tls.client_auth` = `optional` or `required`.
    #[serde(default)]
    pub certificate: Option<String>,
    /// What it may do: `admin`, `write:<keyspace>.<table>`, `read:<keyspace>.<table>`,
    /// `jobs:<job>`; `*` matches any run of characters (`write:shop.*`).
    pub scopes: Vec<String>,
}

/// `[ingest.tls]`: the listeners' certificate, client certificates, and what the gateway's own
/// clients (jobs inside `serve`, `shardgate job run`, `shardgate export`) trust and present.
/// PEM files only; read at start-up (and by `shardgate check`).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// The server certificate chain (leaf first), PEM.
    pub cert_file: String,
    /// Its private key (PKCS#8, PKCS#1 or SEC1), PEM.
    pub key_file: String,
    /// `none` (default): no client certificate asked; `optional`: one is verified against
    /// `client_ca_file` when a client presents it; `required`: a connection without a
    /// certificate of that CA is refused during the handshake.
    #[serde(default = "default_client_auth")]
    pub client_auth: String,
    /// CA certificates (PEM) client certificates must chain to; needed by `optional` and
    /// `required`.
    #[serde(default)]
    pub client_ca_file: Option<String>,
    /// CA certificates (PEM) the gateway's own clients verify its certificate with. Default: the
    /// system's roots are not used — without it, those clients trust `cert_file`'s last
    /// certificate (a self-signed or CA-ending chain).
    #[serde(default)]
    pub ca_file: Option<String>,
    /// Certificate chain (PEM) the gateway's own clients present when client certificates are
    /// asked for (`optional`, `required`); with `client_key_file`.
    #[serde(default)]
    pub client_cert_file: Option<String>,
    /// Private key (PEM) of `client_cert_file`.
    #[serde(default)]
    pub client_key_file: Option<String>,
}

fn default_client_auth() -> String {
    "none".into()
}

/// A validated `[ingest.tls]`: paths checked to hold what they should.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// Server certificate chain file.
    pub cert_file: std::path::PathBuf,
    /// Server key file.
    pub key_file: std::path::PathBuf,
    /// Client certificates asked for.
    pub client_auth: ClientCerts,
    /// CA file of client certificates.
    pub client_ca_file: Option<std::path::PathBuf>,
    /// CA file the gateway's own clients trust (default: the last certificate of `cert_file`).
    pub ca_file: Option<std::path::PathBuf>,
    /// The identity the gateway's own clients present: (certificate chain, key) files.
    pub client_identity: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

pub(super) fn default_message_bytes_max() -> usize {
    4 << 20
}

/// The gRPC ingest API's addresses and limits.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// Shared address every core accepts on.
    pub listen: std::net::SocketAddr,
    /// First per-core port (core `i` listens on `core_port_base + i`); 0 = none.
    pub core_port_base: u16,
    /// Host published for per-core endpoints.
    pub advertise_host: String,
    /// Largest accepted request message in bytes.
    pub message_bytes_max: usize,
    /// TLS on the listeners, if on.
    pub tls: Option<TlsConfig>,
    /// Principals and their scopes, if the API authenticates its callers.
    pub auth: Option<AuthConfig>,
}

/// A validated `[ingest.auth]`.
#[derive(Clone)]
pub struct AuthConfig {
    /// The principals, shared by every core's gate.
    pub principals: std::sync::Arc<Principals>,
    /// The token the gateway's own clients present (read from `client_token_file`).
    pub client_token: Option<String>,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        f.debug_struct("AuthConfig")
            .field("principals", &self.principals)
            .field("client_token", &self.client_token.as_ref().map(|_| "(set)"))
            .finish()
    }
}

impl IngestConfig {
    /// How the gateway's own clients (jobs, `job run`, `export`) reach its API: the shared
    /// address (loopback when it listens on every address) and TLS when the listeners use it.
    pub fn gateway_addr(&self) -> Result<crate::client::GatewayAddr, TlsError> {
        let mut address = self.listen;
        if address.ip().is_unspecified() {
            address.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        Ok(crate::client::GatewayAddr {
            address: address.to_string(),
            tls: self.tls.as_ref().map(TlsConfig::client_tls).transpose()?,
            token: self.auth.as_ref().and_then(|auth| auth.client_token.clone()),
        })
    }

    /// Address of core `core`'s own port, if per-core ports are on.
    pub fn core_addr(&self, core: usize) -> Option<std::net::SocketAddr> {
        if self.core_port_base == 0 {
            return None;
        }
        let port = u16::try_from(usize::from(self.core_port_base) + core).ok()?;
        Some(std::net::SocketAddr::new(self.listen.ip(), port))
    }
}

pub(super) fn validate_ingest(raw: RawIngest) -> Result<IngestConfig, ConfigError> {
    let listen = parse_socket_addr("ingest.listen", &raw.listen)?;
    if !(1024..=(256 << 20)).contains(&raw.message_bytes_max) {
        return Err(ConfigError::invalid(
            "ingest.message_bytes_max",
            raw.message_bytes_max,
            "bytes from 1024 to 268435456",
        ));
    }
    let advertise_host = raw.advertise_host.unwrap_or_else(|| listen.ip().to_string());
    let tls = raw.tls.map(validate_tls).transpose()?;
    let auth = raw.auth.map(|auth| validate_auth(auth, tls.as_ref())).transpose()?;
    Ok(IngestConfig {
        listen,
        core_port_base: raw.core_port_base,
        advertise_host,
        message_bytes_max: raw.message_bytes_max,
        tls,
        auth,
    })
}

fn validate_auth(raw: RawAuth, tls: Option<&TlsConfig>) -> Result<AuthConfig, ConfigError> {
    if raw.principals.is_empty() && raw.jwt.is_none() {
        return Err(ConfigError::invalid(
            "ingest.auth.principal",
            "[]",
            "at least one `[[ingest.auth.principal]]` (a name, `token_sha256` or `certificate`, and `scopes`), or an `[ingest.auth.jwt]` table",
        ));
    }
    let jwt = raw.jwt.map(validate_jwt).transpose()?;
    let mut entries: Vec<(Credential, Principal)> = Vec::with_capacity(raw.principals.len());
    for (index, raw) in raw.principals.into_iter().enumerate() {
        let key = |field: &str| format!("ingest.auth.principal[{index}].{field}");
        if raw.name.trim().is_empty() || entries.iter().any(|(_, p)| p.name == raw.name) {
            return Err(ConfigError::invalid(
                key("name"),
                &raw.name,
                "a name no other principal uses",
            ));
        }
        let credential = match (raw.token_sha256, raw.certificate) {
            (Some(hash), None) => Credential::Token(parse_sha256(&hash).ok_or_else(|| {
                ConfigError::invalid(
                    key("token_sha256"),
                    &hash,
                    "64 hex digits: the SHA-256 of the token, as `printf %s \"$TOKEN\" | sha256sum` prints it",
                )
            })?),
            (None, Some(name)) => {
                let asks = tls.is_some_and(|tls| tls.client_auth != ClientCerts::None);
                if !asks {
                    return Err(ConfigError::invalid(
                        key("certificate"),
                        &name,
                        "`ingest.tls.client_auth` = `optional` or `required` too: without it no client certificate is asked for",
                    ));
                }
                if name.trim().is_empty() {
                    return Err(ConfigError::invalid(
                        key("certificate"),
                        &name,
                        "the subject CN, DNS or URI name of the principal's client certificate",
                    ));
                }
                Credential::Certificate(name)
            }
            _ => {
                return Err(ConfigError::invalid(
                    key("token_sha256"),
                    "both or neither of `token_sha256` and `certificate`",
                    "exactly one of them: how the principal proves who it is",
                ))
            }
        };
        if entries.iter().any(|(c, _)| *c == credential) {
            let field = match credential {
                Credential::Token(_) => "token_sha256",
                Credential::Certificate(_) => "certificate",
            };
            return Err(ConfigError::invalid(
                key(field),
                "a credential another principal has",
                "one credential per principal",
            ));
        }
        if raw.scopes.is_empty() {
            return Err(ConfigError::invalid(
                key("scopes"),
                "[]",
                "at least one scope: `admin`, `write:<keyspace>.<table>`, `read:<keyspace>.<table>` or `jobs:<job>`",
            ));
        }
        let mut scopes = Vec::with_capacity(raw.scopes.len());
        for (i, scope) in raw.scopes.iter().enumerate() {
            let parsed = scope
                .parse::<Scope>()
                .map_err(|error| ConfigError::invalid(key(&format!("scopes[{i}]")), scope, error.to_string()))?;
            scopes.push(parsed);
        }
        entries.push((credential, Principal { name: raw.name, scopes }));
    }
    let mut principals = Principals::new(entries);
    if let Some(verifier) = jwt {
        principals = principals.with_jwt(verifier);
    }
    // The file is read now, as at start-up; its token must be a principal's. Never echoed.
    let client_token = match raw.client_token_file {
        None => None,
        Some(path) => {
            let key = "ingest.auth.client_token_file";
            let token = read_secret(key, &path, "a bearer token")?.trim().to_string();
            if token.is_empty() || principals.by_token(&token).is_none() {
                return Err(ConfigError::invalid(
                    key,
                    &path,
                    "a file whose token is one principal's (its SHA-256 in that principal's `token_sha256`)",
                ));
            }
            Some(token)
        }
    };
    Ok(AuthConfig {
        principals: std::sync::Arc::new(principals),
        client_token,
    })
}

fn validate_jwt(raw: RawJwt) -> Result<crate::auth::jwt::JwtVerifier, ConfigError> {
    for (field, value) in [
        ("issuer", &raw.issuer),
        ("audience", &raw.audience),
        ("scopes_claim", &raw.scopes_claim),
        ("subject_claim", &raw.subject_claim),
    ] {
        if value.trim().is_empty() {
            return Err(ConfigError::invalid(
                format!("ingest.auth.jwt.{field}"),
                value,
                "a non-empty string",
            ));
        }
    }
    if raw.leeway_s > 300 {
        return Err(ConfigError::invalid(
            "ingest.auth.jwt.leeway_s",
            raw.leeway_s,
            "seconds from 0 to 300",
        ));
    }
    let key = "ingest.auth.jwt.jwks_file";
    let text = std::fs::read_to_string(&raw.jwks_file)
        .map_err(|e| ConfigError::invalid(key, &raw.jwks_file, format!("a readable JWKS file ({e})")))?;
    let rules = crate::auth::jwt::JwtRules {
        issuer: raw.issuer,
        audience: raw.audience,
        scopes_claim: raw.scopes_claim,
        subject_claim: raw.subject_claim,
        leeway_s: raw.leeway_s,
    };
    crate::auth::jwt::JwtVerifier::new(&text, rules).map_err(|reason| ConfigError::invalid(key, &raw.jwks_file, reason))
}

/// 64 hex digits as 32 bytes.
pub(super) fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut bytes = [0u8; 32];
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(bytes)
}

fn validate_tls(raw: RawTls) -> Result<TlsConfig, ConfigError> {
    let client_auth = match raw.client_auth.as_str() {
        "none" => ClientCerts::None,
        "optional" => ClientCerts::Optional,
        "required" => ClientCerts::Required,
        other => {
            return Err(ConfigError::invalid(
                "ingest.tls.client_auth",
                other,
                "one of `none`, `optional`, `required`",
            ))
        }
    };
    if client_auth != ClientCerts::None && raw.client_ca_file.is_none() {
        return Err(ConfigError::invalid(
            "ingest.tls.client_ca_file",
            "absent",
            format!(
                "a PEM file of the CA client certificates chain to (`client_auth` = `{}`)",
                raw.client_auth
            ),
        ));
    }
    let client_identity = match (raw.client_cert_file, raw.client_key_file) {
        (Some(cert), Some(key)) => Some((cert.into(), key.into())),
        (None, None) => None,
        (Some(_), None) => {
            return Err(ConfigError::invalid(
                "ingest.tls.client_key_file",
                "absent",
                "the private key of `ingest.tls.client_cert_file`",
            ))
        }
        (None, Some(_)) => {
            return Err(ConfigError::invalid(
                "ingest.tls.client_cert_file",
                "absent",
                "the certificate of `ingest.tls.client_key_file`",
            ))
        }
    };
    let config = TlsConfig {
        cert_file: raw.cert_file.into(),
        key_file: raw.key_file.into(),
        client_auth,
        client_ca_file: raw.client_ca_file.map(Into::into),
        ca_file: raw.ca_file.map(Into::into),
        client_identity,
    };
    // The files are read now, as at start-up: `shardgate check` names a bad one.
    let named = |error: TlsError| {
        ConfigError::invalid(
            format!("ingest.tls.{}", error.field),
            error.path.display(),
            error.reason,
        )
    };
    config.server_config().map_err(named)?;
    config.client_tls().map_err(named)?;
    Ok(config)
}

impl TlsConfig {
    /// The listeners' rustls configuration.
    pub fn server_config(&self) -> Result<std::sync::Arc<rustls::ServerConfig>, TlsError> {
        crate::tls::server_config(
            &self.cert_file,
            &self.key_file,
            self.client_auth,
            self.client_ca_file.as_deref(),
        )
    }

    /// What the gateway's own clients trust and present.
    pub fn client_tls(&self) -> Result<ClientTls, TlsError> {
        crate::tls::client_tls(
            &self.cert_file,
            self.ca_file.as_deref(),
            self.client_identity.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
        )
    }
}
