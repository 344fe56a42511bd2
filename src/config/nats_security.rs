//! `security` of every NATS connection (a `jetstream` or `nats` route's source, a NATS dead
//! letter, a job's NATS sink): TLS (CA, client certificate) and one way to log in — user and
//! password, token, NKey seed or `.creds` file. The raw table, its validated form and
//! `validate`; reads the files it names, as start-up would.

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::Deserialize;

use super::check::{read_secret, validate_ca_file, validate_identity, validate_login};
use super::error::ConfigError;

/// `security`: TLS and a login towards a NATS server. Secrets come from files only.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawNatsSecurity {
    /// Require TLS (the client refuses a server that does not offer it). Implied by `ca_file`
    /// and `cert_file`; a server that requires TLS gets it either way.
    #[serde(default)]
    pub tls: bool,
    /// CA certificates (PEM) the server's certificate must chain to. Default: the system's
    /// trust store.
    #[serde(default)]
    pub ca_file: Option<String>,
    /// Client certificate (PEM) to present (servers with `verify: true`); with `key_file`.
    #[serde(default)]
    pub cert_file: Option<String>,
    /// Private key (PEM) of `cert_file`.
    #[serde(default)]
    pub key_file: Option<String>,
    /// User name; with `password_file`.
    #[serde(default)]
    pub username: Option<String>,
    /// A file holding the user's password (one line).
    #[serde(default)]
    pub password_file: Option<String>,
    /// A file holding an authorization token (one line).
    #[serde(default)]
    pub token_file: Option<String>,
    /// A file holding a user NKey seed (`SU…`), as `nk -gen user` writes it.
    #[serde(default)]
    pub nkey_seed_file: Option<String>,
    /// A `.creds` file (user JWT and NKey seed), as `nsc` writes it.
    #[serde(default)]
    pub creds_file: Option<String>,
}

/// How a connection logs in. `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub enum NatsLogin {
    /// User and password.
    Password {
        /// User name.
        username: String,
        /// Password.
        password: String,
    },
    /// An authorization token.
    Token(String),
    /// A user NKey seed.
    NKey(String),
    /// A `.creds` file, read when connecting.
    Creds(PathBuf),
}

impl std::fmt::Debug for NatsLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NatsLogin::Password { username, .. } => {
                write!(f, "Password {{ username: {username:?}, password: <redacted> }}")
            }
            NatsLogin::Token(_) => f.write_str("Token(<redacted>)"),
            NatsLogin::NKey(_) => f.write_str("NKey(<redacted>)"),
            NatsLogin::Creds(path) => write!(f, "Creds({})", path.display()),
        }
    }
}

/// A validated `security` of a NATS connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsSecurity {
    /// Refuse a connection without TLS.
    pub require_tls: bool,
    /// Roots the server's certificate must chain to.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key files.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// The login, if any.
    pub login: Option<NatsLogin>,
}

/// Validates `security` at config key `key` (e.g. `route[0].source.security`).
pub(super) fn validate_nats_security(key: &str, raw: RawNatsSecurity) -> Result<NatsSecurity, ConfigError> {
    let at = |field: &str| format!("{key}.{field}");
    if let Some(ca) = &raw.ca_file {
        validate_ca_file(&at("ca_file"), ca)?;
    }
    let identity = validate_identity(key, raw.cert_file, raw.key_file)?;
    let logins: Vec<&str> = [
        ("username", raw.username.is_some() || raw.password_file.is_some()),
        ("token_file", raw.token_file.is_some()),
        ("nkey_seed_file", raw.nkey_seed_file.is_some()),
        ("creds_file", raw.creds_file.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, given)| given.then_some(name))
    .collect();
    if logins.len() > 1 {
        return Err(ConfigError::invalid(
            at(logins[1]),
            "given",
            format!(
                "one way to log in; `{}` is given too (`username` + `password_file`, `token_file`, `nkey_seed_file` or `creds_file`)",
                logins[0]
            ),
        ));
    }
    let login = if let Some(path) = raw.token_file {
        Some(NatsLogin::Token(read_secret(
            &at("token_file"),
            &path,
            "an authorization token",
        )?))
    } else if let Some(path) = raw.nkey_seed_file {
        let seed = read_secret(&at("nkey_seed_file"), &path, "a user NKey seed")?;
        let seed = seed.trim().to_string();
        if !seed.starts_with("SU") || nkeys::KeyPair::from_seed(&seed).is_err() {
            return Err(ConfigError::invalid(
                at("nkey_seed_file"),
                &path,
                "a file holding a user NKey seed (`SU…`, as `nk -gen user` writes it)",
            ));
        }
        Some(NatsLogin::NKey(seed))
    } else if let Some(path) = raw.creds_file {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| ConfigError::invalid(at("creds_file"), &path, format!("a readable `.creds` file ({e})")))?;
        if !text.contains("BEGIN NATS USER JWT") || !text.contains("BEGIN USER NKEY SEED") {
            return Err(ConfigError::invalid(
                at("creds_file"),
                &path,
                "a `.creds` file holding a user JWT and its NKey seed",
            ));
        }
        Some(NatsLogin::Creds(PathBuf::from(path)))
    } else {
        validate_login(key, raw.username, raw.password_file)?
            .map(|(username, password)| NatsLogin::Password { username, password })
    };
    Ok(NatsSecurity {
        require_tls: raw.tls || raw.ca_file.is_some() || identity.is_some(),
        ca_file: raw.ca_file.map(PathBuf::from),
        identity,
        login,
    })
}
