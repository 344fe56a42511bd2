//! `security` of a `zeromq` route's socket: CURVE encryption with the gateway as the CURVE
//! server (its secret key from a file) and an allow-list of client public keys, enforced by a
//! ZAP handler (`bridge::zeromq`). The raw table, its validated form and `validate`; reads the
//! files it names, as start-up would.

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::Deserialize;

use super::check::read_secret;
use super::error::ConfigError;

/// `security` of a ZeroMQ source: CURVE. Keys are Z85 text (40 characters), as
/// `zmq_curve_keypair` and `shardgate curve-keypair` print them.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawZmqSecurity {
    /// A file holding the socket's CURVE secret key (Z85, one line). Senders connect with the
    /// matching public key as their server key.
    pub curve_secret_key_file: String,
    /// A file of the client public keys (Z85) allowed to send, one per line (`#` comments and
    /// blank lines skipped). A peer with any other key is refused during the handshake and
    /// counted in `shardgate_zeromq_peers_refused_total`.
    pub curve_client_keys_file: String,
}

/// A validated ZeroMQ `security`.
#[derive(Clone)]
pub struct ZmqSecurity {
    /// File of the CURVE secret key (read again when the socket opens).
    pub curve_secret_key_file: PathBuf,
    /// The allowed client public keys (binary, 32 bytes each).
    pub client_keys: Vec<[u8; 32]>,
}

impl std::fmt::Debug for ZmqSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZmqSecurity")
            .field("curve_secret_key_file", &self.curve_secret_key_file)
            .field("client_keys", &self.client_keys.len())
            .finish()
    }
}

/// The Z85 alphabet (ZeroMQ RFC 32).
const Z85: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#";

/// A CURVE key (40 Z85 characters) as its 32 bytes; `None` when it is not one.
pub fn curve_key(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 40 || !text.bytes().all(|b| Z85.contains(&b)) {
        return None;
    }
    let mut key = [0u8; 32];
    for (chunk, out) in text.as_bytes().chunks(5).zip(key.chunks_mut(4)) {
        let mut value: u64 = 0;
        for &c in chunk {
            value = value * 85 + Z85.iter().position(|&z| z == c)? as u64;
        }
        let value = u32::try_from(value).ok()?;
        out.copy_from_slice(&value.to_be_bytes());
    }
    Some(key)
}

/// A CURVE key's 32 bytes as Z85 text.
pub fn curve_key_text(key: &[u8; 32]) -> String {
    let mut text = String::with_capacity(40);
    for chunk in key.chunks(4) {
        let mut value = u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        let mut digits = [0u8; 5];
        for digit in digits.iter_mut().rev() {
            *digit = Z85[(value % 85) as usize];
            value /= 85;
        }
        text.extend(digits.iter().map(|&d| d as char));
    }
    text
}

/// Reads the secret key file at `key` (never echoing it) into its 32 bytes.
pub fn read_curve_secret_key(key: &str, path: &str) -> Result<[u8; 32], ConfigError> {
    let text = read_secret(key, path, "a CURVE secret key")?;
    curve_key(&text).ok_or_else(|| {
        ConfigError::invalid(
            key,
            path,
            "a file holding one CURVE secret key: 40 characters of Z85 text",
        )
    })
}

pub(super) fn validate_zmq_security(key: &str, raw: RawZmqSecurity) -> Result<ZmqSecurity, ConfigError> {
    let secret_key = format!("{key}.curve_secret_key_file");
    read_curve_secret_key(&secret_key, &raw.curve_secret_key_file)?;
    let clients_key = format!("{key}.curve_client_keys_file");
    let path = &raw.curve_client_keys_file;
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::invalid(
            &clients_key,
            path,
            format!("a readable file of client public keys ({e})"),
        )
    })?;
    let mut client_keys = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let key = curve_key(line).ok_or_else(|| {
            ConfigError::invalid(
                &clients_key,
                format!("{path}, line {}", number + 1),
                "one CURVE public key per line: 40 characters of Z85 text",
            )
        })?;
        client_keys.push(key);
    }
    if client_keys.is_empty() {
        return Err(ConfigError::invalid(
            &clients_key,
            path,
            "a file with at least one client public key (40 characters of Z85 text)",
        ));
    }
    Ok(ZmqSecurity {
        curve_secret_key_file: raw.curve_secret_key_file.into(),
        client_keys,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Z85 codec reads and writes the RFC's test vector and libzmq's keys alike.
    #[test]
    fn curve_keys_round_trip_through_z85() {
        // ZeroMQ RFC 32's example: 8 bytes as "HelloWorld".
        let mut padded = [0u8; 32];
        padded[..8].copy_from_slice(&[0x86, 0x4F, 0xD2, 0x6F, 0xB5, 0x59, 0xF7, 0x5B]);
        assert!(curve_key_text(&padded).starts_with("HelloWorld"));
        let pair = zmq::CurveKeyPair::new().expect("keypair");
        let text = curve_key_text(&pair.public_key);
        assert_eq!(zmq::z85_encode(&pair.public_key).expect("encode"), text);
        assert_eq!(curve_key(&text), Some(pair.public_key));
        assert_eq!(curve_key(&text[1..]), None, "39 characters");
        assert_eq!(curve_key(&format!("{}\"", &text[1..])), None, "outside the alphabet");
    }
}
