//! Reading the TOML text into [`RawConfig`] so that every error names the full key path
//! (`route[2].source.commit_interval_ms`), the value and what is expected.
//!
//! `serde_path_to_error` tracks the path while serde walks the structs. Tagged tables
//! (`[route.source]`, `[route.dead_letter]`, selected by `kind`) are read by hand through
//! [`tagged`] and [`variant`]: serde's derived internally tagged enums buffer their content and
//! lose the path inside them. A nested path travels to the top inside the error message behind
//! [`NESTED_PATH_MARK`] and is joined to the outer path by [`parse`]. Runs on the main thread.

use serde::de::{DeserializeOwned, Error as _};
use serde::Deserializer;

use super::error::ConfigError;

/// Opens and closes a key path carried inside a nested error message.
const NESTED_PATH_MARK: char = '\u{1f}';

/// Parses config text into the raw structs; `origin` names the file in errors.
pub(super) fn parse<T: DeserializeOwned>(text: &str, origin: &str) -> Result<T, ConfigError> {
    let deserializer = toml::Deserializer::parse(text).map_err(|error| ConfigError::Parse {
        path: origin.to_string(),
        message: error.to_string(),
    })?;
    serde_path_to_error::deserialize(deserializer).map_err(|error| {
        let outer = error.path().to_string();
        let inner = error.into_inner();
        let line = inner.span().map(|span| line_of(text, span.start));
        let (nested, message) = split_nested(inner.message());
        ConfigError::Key {
            path: origin.to_string(),
            key: join_paths(&outer, nested),
            message: plain_expectations(message),
            line,
        }
    })
}

/// Reads a table tagged by `kind`: the kind and the rest of the table.
pub(super) fn tagged<'de, D: Deserializer<'de>>(deserializer: D) -> Result<(String, toml::Table), D::Error> {
    let mut table = <toml::Table as serde::Deserialize>::deserialize(deserializer)?;
    match table.remove("kind") {
        Some(toml::Value::String(kind)) => Ok((kind, table)),
        Some(other) => Err(D::Error::custom(format!(
            "{}`kind` = {other}: expected a string",
            nested_mark("kind")
        ))),
        None => Err(D::Error::missing_field("kind")),
    }
}

/// Deserializes one variant's table, keeping the key path of an error inside it.
pub(super) fn variant<T: DeserializeOwned, E: serde::de::Error>(table: toml::Table) -> Result<T, E> {
    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        let (nested, message) = split_nested(inner.message());
        let path = join_paths(&path, nested);
        if path.is_empty() {
            E::custom(message)
        } else {
            E::custom(format!("{}{message}", nested_mark(&path)))
        }
    })
}

/// The error for a `kind` none of `kinds` names.
pub(super) fn unknown_kind<E: serde::de::Error>(kind: &str, kinds: &'static [&'static str]) -> E {
    E::custom(format!(
        "{}unknown kind `{kind}`, expected one of {}",
        nested_mark("kind"),
        kinds.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")
    ))
}

fn nested_mark(path: &str) -> String {
    format!("{NESTED_PATH_MARK}{path}{NESTED_PATH_MARK}")
}

/// Splits a message into the nested path it carries (if any) and the message proper.
fn split_nested(message: &str) -> (&str, &str) {
    message
        .strip_prefix(NESTED_PATH_MARK)
        .and_then(|rest| rest.split_once(NESTED_PATH_MARK))
        .unwrap_or(("", message))
}

/// `route[2].source` + `commit_interval_ms` = `route[2].source.commit_interval_ms`. serde's
/// root path prints as `.`.
fn join_paths(outer: &str, inner: &str) -> String {
    let outer = if outer == "." { "" } else { outer };
    match (outer.is_empty(), inner.is_empty()) {
        (_, true) => outer.to_string(),
        (true, false) => inner.to_string(),
        (false, false) if inner.starts_with('[') => format!("{outer}{inner}"),
        (false, false) => format!("{outer}.{inner}"),
    }
}

/// serde names Rust types in expectations (`expected u64`); say what a TOML user writes.
fn plain_expectations(message: &str) -> String {
    let mut text = message.to_string();
    for (rust, plain) in [
        ("expected u16", "expected a whole number from 0 to 65535"),
        ("expected u32", "expected a whole number from 0 to 4294967295"),
        (
            "expected u64",
            "expected a whole number (not a string; units are in the key's name)",
        ),
        (
            "expected usize",
            "expected a whole number (not a string; units are in the key's name)",
        ),
        ("expected i64", "expected a whole number"),
        ("expected i32", "expected a whole number"),
        ("expected a boolean", "expected `true` or `false`"),
        ("expected a string", "expected a string in quotes"),
    ] {
        if let Some(rest) = text.strip_suffix(rust) {
            text = format!("{rest}{plain}");
            break;
        }
    }
    text
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset).map_or(0, |before| before.matches('\n').count()) + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_paths_join_outer_paths() {
        assert_eq!(
            join_paths("route[2].source", "commit_interval_ms"),
            "route[2].source.commit_interval_ms"
        );
        assert_eq!(
            join_paths("route[0].source", "brokers[1]"),
            "route[0].source.brokers[1]"
        );
        assert_eq!(join_paths(".", "cluster"), "cluster");
        assert_eq!(join_paths("route", "[1]"), "route[1]");
        let message = format!("{}x\"", nested_mark("a.b"));
        assert_eq!(split_nested(&message), ("a.b", "x\""));
        assert_eq!(split_nested("plain"), ("", "plain"));
    }

    #[test]
    fn rust_type_names_become_plain_words() {
        assert_eq!(
            plain_expectations("invalid type: string \"1s\", expected u64"),
            "invalid type: string \"1s\", expected a whole number (not a string; units are in the key's name)"
        );
        assert_eq!(plain_expectations("missing field `topic`"), "missing field `topic`");
    }
}
