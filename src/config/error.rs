//! The one error type of configuration: a key path, the value found and what is expected
//! (or the TOML parser's message with its line). Pure.

use std::fmt;

/// A configuration error: which key, which value, what was expected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file `{path}`: {source}")]
    Read {
        /// Path given on the command line.
        path: String,
        /// Underlying IO error.
        source: std::io::Error,
    },
    /// TOML syntax error; toml's message carries the line and column.
    #[error("config file `{path}`: {message}")]
    Parse {
        /// Path given on the command line.
        path: String,
        /// The TOML parser's message (includes the location).
        message: String,
    },
    /// A key that does not exist, a required key that is missing, or a value of the wrong type.
    #[error("config file `{path}`{}: `{key}`: {message}", line.map(|l| format!(", line {l}")).unwrap_or_default())]
    Key {
        /// Path given on the command line.
        path: String,
        /// Full key path, for example `route[2].source.commit_interval_ms`.
        key: String,
        /// Line of the value in the file, when known.
        line: Option<usize>,
        /// What is wrong: the value as read and what is expected.
        message: String,
    },
    /// A value parsed but is not acceptable.
    #[error("`{key}` = `{value}`: {expected}")]
    Invalid {
        /// Dotted key path, for example `route[0].table`.
        key: String,
        /// The offending value as written.
        value: String,
        /// What is expected instead.
        expected: String,
    },
}

impl ConfigError {
    pub(crate) fn invalid(key: impl Into<String>, value: impl fmt::Display, expected: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            value: value.to_string(),
            expected: expected.into(),
        }
    }
}
