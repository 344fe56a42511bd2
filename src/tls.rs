//! TLS material from PEM files: the gRPC listeners' rustls `ServerConfig` (TLS 1.2 and 1.3,
//! ALPN `h2`, client certificates optional or required) and what the gateway's own clients
//! trust and present ([`ClientTls`]). ring is the one crypto provider (tonic's client side uses
//! it too). Reads files; every failure names the file's key (`cert_file`, …), the path and the
//! cause — checked by `shardgate check` as at start-up. Used by `app` (listeners), `config`
//! (checks) and `client` (channels).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A file that could not serve: its key (e.g. `cert_file`), its path and why.
#[derive(Debug, Clone, thiserror::Error)]
#[error("`{field}` = `{}`: {reason}", path.display())]
pub struct TlsError {
    /// The key naming the file, without its table (`cert_file`).
    pub field: &'static str,
    /// The path.
    pub path: PathBuf,
    /// What is wrong.
    pub reason: String,
}

/// What the listeners ask of clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCerts {
    /// No client certificate asked for.
    None,
    /// Verified when presented.
    Optional,
    /// Required and verified during the handshake.
    Required,
}

/// What a client of a TLS gateway trusts and presents (PEM bytes, as tonic takes them).
#[derive(Clone)]
pub struct ClientTls {
    /// CA certificates the gateway's certificate must chain to.
    pub ca_pem: Vec<u8>,
    /// Certificate chain and key to present, when client certificates are asked for.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("ClientTls")
            .field("ca_pem_bytes", &self.ca_pem.len())
            .field("identity", &self.identity.is_some())
            .finish()
    }
}

fn failed(field: &'static str, path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError {
        field,
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate of a PEM file (at least one).
pub fn certificates(field: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    parse_certificates(field, path, &read(field, path)?)
}

fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| failed(field, path, format!("cannot read it: {e}")))
}

/// Every certificate of `pem`, the contents of `path` (at least one).
fn parse_certificates(field: &'static str, path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| failed(field, path, format!("not PEM certificates: {e}")))?;
    if certificates.is_empty() {
        return Err(failed(
            field,
            path,
            "no `CERTIFICATE` block in it: a PEM certificate (chain) is expected",
        ));
    }
    Ok(certificates)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn private_key(field: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        failed(
            field,
            path,
            format!("no private key read from it ({e}): a PEM `PRIVATE KEY`, `RSA PRIVATE KEY` or `EC PRIVATE KEY` is expected"),
        )
    })
}

fn roots(field: &'static str, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for certificate in certificates(field, path)? {
        store
            .add(certificate)
            .map_err(|e| failed(field, path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(store)
}

/// The listeners' TLS: `cert_file` (chain) with `key_file` (which must be its key), client
/// certificates per `client_certs`, verified against `client_ca_file`.
pub fn server_config(
    cert_file: &Path,
    key_file: &Path,
    client_certs: ClientCerts,
    client_ca_file: Option<&Path>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certificates("cert_file", cert_file)?;
    let key = private_key("key_file", key_file)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| failed("cert_file", cert_file, e))?;
    let builder = match (client_certs, client_ca_file) {
        (ClientCerts::None, _) | (_, None) => builder.with_no_client_auth(),
        (asked, Some(ca)) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots("client_ca_file", ca)?), provider());
            let verifier = match asked {
                ClientCerts::Optional => verifier.allow_unauthenticated(),
                _ => verifier,
            };
            builder.with_client_cert_verifier(verifier.build().map_err(|e| {
                failed(
                    "client_ca_file",
                    ca,
                    format!("cannot verify client certificates with it: {e}"),
                )
            })?)
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        failed(
            "key_file",
            key_file,
            format!("does not serve `cert_file` = `{}`: {e}", cert_file.display()),
        )
    })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// What the gateway's own clients use: `ca_file`'s certificates as roots (default: those of
/// `cert_file`), and `identity` (certificate chain and key files) to present.
pub fn client_tls(
    cert_file: &Path,
    ca_file: Option<&Path>,
    identity: Option<(&Path, &Path)>,
) -> Result<ClientTls, TlsError> {
    let (field, ca) = match ca_file {
        Some(ca) => ("ca_file", ca),
        None => ("cert_file", cert_file),
    };
    // Read once; parsed to be sure they are certificates, and handed to tonic as PEM text.
    let ca_pem = std::fs::read(ca).map_err(|e| failed(field, ca, format!("cannot read it: {e}")))?;
    let parsed = CertificateDer::pem_slice_iter(&ca_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| failed(field, ca, format!("not PEM certificates: {e}")))?;
    if parsed.is_empty() {
        return Err(failed(
            field,
            ca,
            "no `CERTIFICATE` block in it: a PEM certificate (chain) is expected",
        ));
    }
    let identity = match identity {
        None => None,
        Some((cert, key)) => {
            let (cert_pem, key_pem) = (read("client_cert_file", cert)?, read("client_key_file", key)?);
            let chain = parse_certificates("client_cert_file", cert, &cert_pem)?;
            let private = PrivateKeyDer::from_pem_slice(&key_pem)
                .map_err(|e| failed("client_key_file", key, format!("no private key read from it: {e}")))?;
            rustls::sign::CertifiedKey::from_der(chain, private, &provider()).map_err(|e| {
                failed(
                    "client_key_file",
                    key,
                    format!("does not serve `client_cert_file`: {e}"),
                )
            })?;
            Some((cert_pem, key_pem))
        }
    };
    Ok(ClientTls { ca_pem, identity })
}
