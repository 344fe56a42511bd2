//! Validators several sections share: identifiers, addresses, URLs, subjects, topics, time
//! bounds, expressions. Pure; each error names the key, the value and what is expected.

use std::path::{Path, PathBuf};

use super::error::ConfigError;

/// Longest identifier Cassandra accepts for keyspaces and tables.
pub(super) const IDENTIFIER_LEN_MAX: usize = 48;

/// Checks a CQL identifier from config: letters, digits, underscore, not starting with a digit.
/// Statements quote identifiers, so case is kept as written.
pub(crate) fn validate_identifier(key: &str, value: &str) -> Result<(), ConfigError> {
    let mut chars = value.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !first_ok || !rest_ok || value.len() > IDENTIFIER_LEN_MAX {
        return Err(ConfigError::invalid(
            key,
            value,
            format!(
                "a CQL identifier: a letter or `_`, then letters, digits or `_`, at most {IDENTIFIER_LEN_MAX} characters"
            ),
        ));
    }
    Ok(())
}

/// `amqp://user:password@host` with the password hidden, for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            let user = credentials.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

pub(super) fn parse_socket_addr(key: &str, text: &str) -> Result<std::net::SocketAddr, ConfigError> {
    text.parse()
        .map_err(|_| ConfigError::invalid(key, text, "an IP address and port, for example `127.0.0.1:50051`"))
}

pub(super) fn bounded_ms(key: &str, value: u64) -> Result<u64, ConfigError> {
    if value == 0 || value > TIMEOUT_MS_MAX {
        return Err(ConfigError::invalid(
            key,
            value,
            format!("milliseconds from 1 to {TIMEOUT_MS_MAX}"),
        ));
    }
    Ok(value)
}

pub(super) const TIMEOUT_MS_MAX: u64 = 600_000;

pub(super) fn validate_host_port(key: &str, text: &str) -> Result<(), ConfigError> {
    let valid = text
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if !valid {
        return Err(ConfigError::invalid(
            key,
            text,
            "`host:port`, for example `127.0.0.1:9042`",
        ));
    }
    Ok(())
}

/// An `amqp://` or `amqps://` URL with a host.
pub(super) fn validate_amqp_url(key: &str, url: String) -> Result<String, ConfigError> {
    let rest = url.strip_prefix("amqp://").or_else(|| url.strip_prefix("amqps://"));
    let host = rest.map(|r| r.rsplit('@').next().unwrap_or(r)).unwrap_or("");
    if !host.is_empty() && !host.starts_with('/') {
        Ok(url)
    } else {
        Err(ConfigError::invalid(
            key,
            redact_url(&url),
            "an AMQP URL like `amqp://guest:guest@127.0.0.1:5672/%2f`",
        ))
    }
}

/// A `nats://host:port` URL (or a bare `host:port`).
pub(super) fn validate_nats_url(key: &str, url: String) -> Result<String, ConfigError> {
    let rest = url.strip_prefix("nats://").unwrap_or(&url);
    if rest.contains('@') {
        // Never echo it: the part before `@` may be a password or a token.
        return Err(ConfigError::invalid(
            key,
            "(a URL with credentials)",
            "a NATS URL without credentials: the `security` table takes the login, its secret from a file",
        ));
    }
    let valid = rest
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if valid {
        Ok(url)
    } else {
        Err(ConfigError::invalid(
            key,
            &url,
            "a NATS URL like `nats://127.0.0.1:4222`",
        ))
    }
}

/// A stream or consumer name: letters, digits, `-` and `_`.
pub(super) fn validate_nats_name(key: &str, name: &str) -> Result<(), ConfigError> {
    if !name.is_empty() && name.len() <= 255 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            key,
            name,
            "a name of letters, digits, `-` and `_` (at most 255)",
        ))
    }
}

/// A NATS subject: dot-separated non-empty tokens without whitespace.
pub(super) fn validate_subject(key: &str, subject: &str) -> Result<(), ConfigError> {
    if !subject.is_empty()
        && subject
            .split('.')
            .all(|t| !t.is_empty() && !t.contains(char::is_whitespace))
    {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            key,
            subject,
            "a NATS subject like `orders.created` (tokens separated by `.`, no spaces)",
        ))
    }
}

pub(super) fn join_brokers(key: &str, brokers: &[String]) -> Result<String, ConfigError> {
    if brokers.is_empty() {
        return Err(ConfigError::invalid(key, "[]", "at least one `host:port`"));
    }
    for broker in brokers {
        validate_host_port(key, broker)?;
    }
    Ok(brokers.join(","))
}

/// Kafka's own topic name rule: 1–249 of `[a-zA-Z0-9._-]`, not `.` or `..`.
pub(super) fn validate_topic(key: &str, topic: &str) -> Result<(), ConfigError> {
    let valid = !topic.is_empty()
        && topic.len() <= 249
        && topic != "."
        && topic != ".."
        && topic.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if !valid {
        return Err(ConfigError::invalid(
            key,
            topic,
            "a Kafka topic name: 1 to 249 of letters, digits, `.`, `_`, `-`",
        ));
    }
    Ok(())
}

/// Compiles a CEL expression once, so a syntax error names its key at start-up.
pub(super) fn validate_expression(key: &str, source: String) -> Result<String, ConfigError> {
    match crate::mapping::expr::Expr::compile(&source) {
        Ok(_) => Ok(source),
        Err(reason) => Err(ConfigError::invalid(
            key,
            &source,
            format!("a CEL expression ({reason})"),
        )),
    }
}

pub(super) fn default_true() -> bool {
    true
}

/// The first line of `path`: a secret (never echoed) — `what` says which, e.g. "the password
/// of `shardgate`".
pub(super) fn read_secret(key: &str, path: &str, what: &str) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::invalid(key, path, format!("a readable file holding {what} ({e})")))?;
    let secret = text.trim_end_matches(['\n', '\r']).to_string();
    if secret.is_empty() {
        return Err(ConfigError::invalid(
            key,
            path,
            format!("a file holding {what}; it is empty"),
        ));
    }
    Ok(secret)
}

/// A TLS client identity at table `key`: `cert_file` and `key_file`, both or neither, read and
/// checked to be a certificate chain and its private key.
pub(super) fn validate_identity(
    key: &str,
    cert_file: Option<String>,
    key_file: Option<String>,
) -> Result<Option<(PathBuf, PathBuf)>, ConfigError> {
    let at = |field: &str| format!("{key}.{field}");
    let (cert, private_file) = match (cert_file, key_file) {
        (Some(cert), Some(private_file)) => (cert, private_file),
        (None, None) => return Ok(None),
        (Some(_), None) => {
            return Err(ConfigError::invalid(
                at("key_file"),
                "absent",
                format!("the private key of `{}`", at("cert_file")),
            ))
        }
        (None, Some(_)) => {
            return Err(ConfigError::invalid(
                at("cert_file"),
                "absent",
                format!("the certificate of `{}`", at("key_file")),
            ))
        }
    };
    let named = |error: crate::tls::TlsError| ConfigError::invalid(at(error.field), error.path.display(), error.reason);
    let chain = crate::tls::certificates("cert_file", Path::new(&cert)).map_err(named)?;
    let private = crate::tls::private_key("key_file", Path::new(&private_file)).map_err(named)?;
    crate::tls::check_key_pair(chain, private).map_err(|reason| {
        ConfigError::invalid(
            at("key_file"),
            &private_file,
            format!("the private key of `cert_file` = `{cert}` ({reason})"),
        )
    })?;
    Ok(Some((PathBuf::from(cert), PathBuf::from(private_file))))
}

/// A user and the password `password_file` holds, at table `key` (both or neither).
pub(super) fn validate_login(
    key: &str,
    username: Option<String>,
    password_file: Option<String>,
) -> Result<Option<(String, String)>, ConfigError> {
    let at = |field: &str| format!("{key}.{field}");
    match (username, password_file) {
        (Some(username), Some(path)) if !username.is_empty() => {
            let password = read_secret(&at("password_file"), &path, &format!("the password of `{username}`"))?;
            Ok(Some((username, password)))
        }
        (Some(_), Some(_)) => Err(ConfigError::invalid(at("username"), "\"\"", "a user name")),
        (Some(_), None) => Err(ConfigError::invalid(
            at("password_file"),
            "absent",
            "a file holding the user's password",
        )),
        (None, Some(_)) => Err(ConfigError::invalid(
            at("username"),
            "absent",
            "the user whose password `password_file` holds",
        )),
        (None, None) => Ok(None),
    }
}

/// A CA file at `key` (`<table>.ca_file`): read and checked to hold PEM certificates.
pub(super) fn validate_ca_file(key: &str, path: &str) -> Result<(), ConfigError> {
    crate::tls::certificates("ca_file", Path::new(path))
        .map(|_| ())
        .map_err(|error| ConfigError::invalid(key, error.path.display(), error.reason))
}
