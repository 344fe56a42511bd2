//! Page tokens: what lets a client resume a read after the page it got, on any gateway that
//! shares the key, across restarts — and nothing else. A token carries the database's paging
//! state, the position inside a scan split (which of its ranges) and the fingerprint of the
//! request it belongs to, under an HMAC-SHA256 with the gateway's key: a token altered, forged,
//! or presented with another statement, other binds, another table or split is refused
//! (`BAD_PAGE_TOKEN`). Pure, but for [`Keys::load`].
//!
//! Layout: version (1 byte) | fingerprint (16) | range index (u32 BE) | paging state | MAC (16).

use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// Token format version.
const VERSION: u8 = 1;
/// Bytes of the request fingerprint kept in a token.
const FINGERPRINT_BYTES: usize = 16;
/// Bytes of the MAC kept in a token.
const MAC_BYTES: usize = 16;
/// Bytes before the paging state.
const HEADER_BYTES: usize = 1 + FINGERPRINT_BYTES + 4;
/// Shortest key accepted from a file.
pub const KEY_BYTES_MIN: usize = 32;

/// Where a read resumes: the range of its split and the database's paging state in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// Index of the token range inside the split (0 outside scans).
    pub range: u32,
    /// The database's paging state; empty = the range's start.
    pub paging_state: Vec<u8>,
}

/// Why a token is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a token of this format.
    #[error("the page token is malformed ({0})")]
    Malformed(&'static str),
    /// The MAC does not match: altered, or issued with another key.
    #[error(
        "the page token was not issued by a gateway with this `query.page_token_key_file` (altered, or another key)"
    )]
    Forged,
    /// A genuine token of another request.
    #[error("the page token belongs to another request (statement, binds, table, columns or split differ)")]
    OtherRequest,
}

/// The key page tokens are MAC'd with.
#[derive(Clone)]
pub struct Keys {
    key: Vec<u8>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(..)")
    }
}

impl Keys {
    /// A key from bytes (tests, and keys read from a file).
    pub fn new(key: Vec<u8>) -> Keys {
        Keys { key }
    }

    /// A random key for this process only.
    pub fn random() -> std::io::Result<Keys> {
        let mut key = vec![0; KEY_BYTES_MIN];
        getrandom::fill(&mut key).map_err(std::io::Error::other)?;
        Ok(Keys { key })
    }

    /// The key in `path`, created with a random one (mode 0600) when the file does not exist.
    /// A file shorter than [`KEY_BYTES_MIN`] bytes is an error naming it.
    pub fn load(path: &Path) -> std::io::Result<Keys> {
        match std::fs::read(path) {
            Ok(key) if key.len() >= KEY_BYTES_MIN => Ok(Keys { key }),
            Ok(key) => Err(std::io::Error::other(format!(
                "{} holds {} bytes; a page-token key needs at least {KEY_BYTES_MIN}",
                path.display(),
                key.len()
            ))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let keys = Keys::random()?;
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                match std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                {
                    Ok(mut file) => {
                        file.write_all(&keys.key)?;
                        file.sync_all()?;
                        Ok(keys)
                    }
                    // Another gateway on the same directory created it first: use theirs.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Keys::load(path),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// A token resuming the request with `fingerprint` at `position`.
    pub fn seal(&self, fingerprint: &Fingerprint, position: &Position) -> Vec<u8> {
        let mut token = Vec::with_capacity(HEADER_BYTES + position.paging_state.len() + MAC_BYTES);
        token.push(VERSION);
        token.extend_from_slice(&fingerprint.0);
        token.extend_from_slice(&position.range.to_be_bytes());
        token.extend_from_slice(&position.paging_state);
        let mac = self.mac(&token);
        token.extend_from_slice(&mac);
        token
    }

    /// The position a token of the request with `fingerprint` resumes at.
    pub fn open(&self, fingerprint: &Fingerprint, token: &[u8]) -> Result<Position, TokenError> {
        if token.len() < HEADER_BYTES + MAC_BYTES {
            return Err(TokenError::Malformed("too short"));
        }
        if token[0] != VERSION {
            return Err(TokenError::Malformed("unknown version"));
        }
        let (body, mac) = token.split_at(token.len() - MAC_BYTES);
        let mut check = self.hmac();
        check.update(body);
        check.verify_truncated_left(mac).map_err(|_| TokenError::Forged)?;
        if body[1..=FINGERPRINT_BYTES] != fingerprint.0 {
            return Err(TokenError::OtherRequest);
        }
        let mut range = [0; 4];
        range.copy_from_slice(&body[1 + FINGERPRINT_BYTES..HEADER_BYTES]);
        Ok(Position {
            range: u32::from_be_bytes(range),
            paging_state: body[HEADER_BYTES..].to_vec(),
        })
    }

    fn hmac(&self) -> Hmac<Sha256> {
        // HMAC takes a key of any length.
        match Hmac::<Sha256>::new_from_slice(&self.key) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC accepts keys of every length"),
        }
    }

    fn mac(&self, body: &[u8]) -> [u8; MAC_BYTES] {
        let mut mac = self.hmac();
        mac.update(body);
        let full = mac.finalize().into_bytes();
        let mut out = [0; MAC_BYTES];
        out.copy_from_slice(&full[..MAC_BYTES]);
        out
    }
}

/// What identifies a request for its tokens: a hash of every field that decides its rows
/// (statement, binds, table, columns, split), not of its page size or consistency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint([u8; FINGERPRINT_BYTES]);

/// Builds a [`Fingerprint`] from a request's fields, each length-prefixed so no two field lists
/// hash alike.
#[derive(Default)]
pub struct FingerprintBuilder(Sha256);

impl FingerprintBuilder {
    /// Starts a fingerprint of a request of `kind` (`get`, `execute`, `scan`).
    pub fn new(kind: &str) -> FingerprintBuilder {
        FingerprintBuilder::default().field(kind.as_bytes())
    }

    /// Adds a field.
    pub fn field(mut self, bytes: &[u8]) -> FingerprintBuilder {
        self.0.update((bytes.len() as u64).to_be_bytes());
        self.0.update(bytes);
        self
    }

    /// The fingerprint.
    pub fn finish(self) -> Fingerprint {
        let digest = self.0.finalize();
        let mut out = [0; FINGERPRINT_BYTES];
        out.copy_from_slice(&digest[..FINGERPRINT_BYTES]);
        Fingerprint(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fingerprint(cql: &str) -> Fingerprint {
        FingerprintBuilder::new("execute").field(cql.as_bytes()).finish()
    }

    #[test]
    fn a_token_resumes_its_own_request_only() {
        let keys = Keys::new(vec![7; 32]);
        let position = Position {
            range: 3,
            paging_state: vec![1, 2, 3, 4, 5],
        };
        let mine = fingerprint("SELECT * FROM ks.t");
        let token = keys.seal(&mine, &position);
        assert_eq!(keys.open(&mine, &token), Ok(position));
        assert_eq!(
            keys.open(&fingerprint("SELECT * FROM ks.u"), &token),
            Err(TokenError::OtherRequest)
        );
        let other_key = Keys::new(vec![8; 32]);
        assert_eq!(other_key.open(&mine, &token), Err(TokenError::Forged));
        for i in 0..token.len() {
            let mut altered = token.clone();
            altered[i] ^= 0x40;
            assert!(keys.open(&mine, &altered).is_err(), "byte {i} altered and accepted");
        }
        assert_eq!(keys.open(&mine, &token[..10]), Err(TokenError::Malformed("too short")));
    }

    #[test]
    fn fields_are_delimited() {
        let a = FingerprintBuilder::new("x").field(b"ab").field(b"c").finish();
        let b = FingerprintBuilder::new("x").field(b"a").field(b"bc").finish();
        assert_ne!(a, b);
    }

    #[test]
    fn a_key_file_is_created_once_and_reused() {
        let dir = std::env::temp_dir().join(format!("shardgate-key-{}", std::process::id()));
        let path = dir.join("page-token.key");
        let _ = std::fs::remove_file(&path);
        let first = Keys::load(&path).expect("created");
        let second = Keys::load(&path).expect("read");
        let fp = fingerprint("q");
        let position = Position {
            range: 0,
            paging_state: vec![9],
        };
        assert_eq!(second.open(&fp, &first.seal(&fp, &position)), Ok(position));
        std::fs::write(&path, b"short").expect("write");
        assert!(Keys::load(&path).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
