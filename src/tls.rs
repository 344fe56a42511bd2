//! TLS material from PEM files: the gRPC listeners' rustls `ServerConfig` (TLS 1.2 and 1.3,
//! ALPN `h2`, client certificates optional or required) and what the gateway's own clients
//! trust and present ([`ClientTls`]), and the database driver's rustls `ClientConfig`
//! ([`database_client_config`]). ring is the one crypto provider (tonic's client side and the
//! driver use it too). Reads files; every failure names the file's key (`cert_file`, …), the
//! path and the cause — checked by `shardgate check` as at start-up. Used by `app`
//! (listeners), `config` (checks) and `client` (channels).

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

/// Makes ring the process-wide rustls provider, for the libraries that build their TLS
/// configs from it (async-nats): two providers are compiled in (ring, and aws-lc-rs through
/// dependencies' default features), so rustls would not pick one itself. Idempotent.
pub fn install_crypto_provider() {
    // Err only when one is installed already, which is what is wanted.
    let _ = rustls::crypto::ring::default_provider().install_default();
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

/// An HTTPS listener's TLS (the admin port): `cert_file` with `key_file`, no client
/// certificates, ALPN `http/1.1`.
pub fn https_server_config(cert_file: &Path, key_file: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let config = server_config(cert_file, key_file, ClientCerts::None, None)?;
    let mut config = (*config).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A listener's TLS configuration that can be re-read from its files (SIGHUP): new
/// connections get the new one, open ones keep theirs; files that no longer read or match leave
/// the old one serving.
pub struct Reloadable {
    /// What the listener names itself in logs (`ingest.tls`, `admin`).
    pub name: &'static str,
    current: arc_swap::ArcSwap<ServerConfig>,
    load: Box<dyn Fn() -> Result<Arc<ServerConfig>, TlsError> + Send + Sync>,
}

impl Reloadable {
    /// Loads once now (the error is start-up's) and keeps `load` for [`Reloadable::reload`].
    pub fn new(
        name: &'static str,
        load: impl Fn() -> Result<Arc<ServerConfig>, TlsError> + Send + Sync + 'static,
    ) -> Result<Arc<Reloadable>, TlsError> {
        let current = arc_swap::ArcSwap::new(load()?);
        Ok(Arc::new(Reloadable {
            name,
            current,
            load: Box::new(load),
        }))
    }

    /// The configuration a new connection is served with.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current.load_full()
    }

    /// Re-reads the files; on an error the configuration in use stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        self.current.store((self.load)()?);
        Ok(())
    }
}

/// Re-reads every listener's certificate files each time the process gets SIGHUP, logging
/// what it did (a failure keeps the old files' configuration). Holding SIGHUP also keeps it
/// from stopping the process. Runs on the island until the process ends.
pub async fn reload_on_hangup(listeners: Vec<Arc<Reloadable>>) {
    let mut hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(hangups) => hangups,
        Err(error) => {
            tracing::warn!(%error, "cannot watch SIGHUP: certificates reload only on restart");
            return;
        }
    };
    while hangups.recv().await.is_some() {
        if listeners.is_empty() {
            tracing::info!("SIGHUP: no TLS listener to reload");
        }
        for listener in &listeners {
            match listener.reload() {
                Ok(()) => tracing::info!(listener = listener.name, "TLS certificate files reloaded (SIGHUP)"),
                Err(error) => tracing::warn!(
                    listener = listener.name,
                    %error,
                    "TLS certificate files not reloaded (SIGHUP); the previous ones stay in use"
                ),
            }
        }
    }
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
    parse_certificates(field, ca, &ca_pem)?;
    let identity = match identity {
        None => None,
        Some((cert, key)) => {
            let (cert_pem, key_pem) = (read("client_cert_file", cert)?, read("client_key_file", key)?);
            let chain = parse_certificates("client_cert_file", cert, &cert_pem)?;
            let private = PrivateKeyDer::from_pem_slice(&key_pem)
                .map_err(|e| failed("client_key_file", key, format!("no private key read from it: {e}")))?;
            check_key_pair(chain, private).map_err(|e| {
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

/// Whether `key` is the private key of `chain`'s first certificate; the mismatch otherwise.
pub fn check_key_pair(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Result<(), String> {
    rustls::sign::CertifiedKey::from_der(chain, key, &provider())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// What the gateway trusts and presents to the database: `ca_file`'s certificates as roots,
/// `identity` (certificate chain and key files) to present, and — unless `verify_hostname` is
/// false — the node's address checked against its certificate's names (the driver connects
/// by IP address, so that is an IP SAN). The chain is verified either way.
pub fn database_client_config(
    ca_file: &Path,
    identity: Option<(&Path, &Path)>,
    verify_hostname: bool,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let roots = Arc::new(roots("ca_file", ca_file)?);
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| failed("ca_file", ca_file, e))?;
    let builder = if verify_hostname {
        builder.with_root_certificates(roots)
    } else {
        let chain = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| failed("ca_file", ca_file, format!("cannot verify certificates with it: {e}")))?;
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ChainOnly(chain)))
    };
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(certificates("cert_file", cert)?, private_key("key_file", key)?)
            .map_err(|e| {
                failed(
                    "key_file",
                    key,
                    format!("does not serve `cert_file` = `{}`: {e}", cert.display()),
                )
            })?,
    };
    Ok(Arc::new(config))
}

/// Verifies the chain, the validity period and the signatures like rustls' own verifier, but
/// accepts a certificate whose names do not cover the address connected to
/// (`verify_hostname = false`).
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl rustls::client::danger::ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls_pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use rustls::{CertificateError, Error};
        // webpki checks the name last, after the chain to a root and the validity period.
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

    struct Files {
        dir: PathBuf,
    }

    impl Files {
        fn new(test: &str) -> Files {
            let dir = std::env::temp_dir().join(format!("shardgate-tls-{test}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("dir");
            Files { dir }
        }

        fn write(&self, name: &str, text: String) -> PathBuf {
            let path = self.dir.join(name);
            std::fs::write(&path, text).expect("write");
            path
        }
    }

    impl Drop for Files {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn ca() -> CertifiedIssuer<'static, KeyPair> {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "shardgate database test CA");
        CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("CA")
    }

    /// A full handshake in memory between `client` (connecting to 127.0.0.1, as the driver
    /// does) and a server presenting `cert_file` / `key_file`.
    fn handshake(client: Arc<rustls::ClientConfig>, cert_file: &Path, key_file: &Path) -> Result<(), rustls::Error> {
        let server = server_config(cert_file, key_file, ClientCerts::None, None).expect("server config");
        let name = rustls_pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        let mut client = rustls::ClientConnection::new(client, name).expect("client");
        let mut server = rustls::ServerConnection::new(server).expect("server");
        let mut wire = Vec::new();
        for _ in 0..10 {
            wire.clear();
            client.write_tls(&mut wire).expect("client writes");
            server.read_tls(&mut wire.as_slice()).expect("server reads");
            server.process_new_packets()?;
            wire.clear();
            server.write_tls(&mut wire).expect("server writes");
            client.read_tls(&mut wire.as_slice()).expect("client reads");
            client.process_new_packets()?;
            if !client.is_handshaking() && !server.is_handshaking() {
                return Ok(());
            }
        }
        panic!("handshake did not finish");
    }

    /// `verify_hostname` decides only whether the node's address must be among the
    /// certificate's names; the chain to `ca_file` is verified either way.
    #[test]
    fn database_tls_verifies_the_chain_always_and_the_address_unless_told_not_to() {
        let files = Files::new("database");
        let ours = ca();
        let ca_file = files.write("ca.pem", ours.pem());
        let issue = |names: &[&str], file: &str| {
            let key = KeyPair::generate().expect("key");
            let params =
                CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).expect("params");
            let cert = params.signed_by(&key, &ours).expect("signed");
            (
                files.write(&format!("{file}.pem"), cert.pem()),
                files.write(&format!("{file}.key"), key.serialize_pem()),
            )
        };
        let (with_ip, with_ip_key) = issue(&["127.0.0.1"], "with-ip");
        let (dns_only, dns_only_key) = issue(&["db1.example"], "dns-only");
        let rogue = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).expect("self-signed");
        let rogue_cert = files.write("rogue.pem", rogue.cert.pem());
        let rogue_key = files.write("rogue.key", rogue.signing_key.serialize_pem());
        let client = |verify_hostname| database_client_config(&ca_file, None, verify_hostname).expect("client");

        handshake(client(true), &with_ip, &with_ip_key).expect("an IP SAN matches");
        let refused = handshake(client(true), &dns_only, &dns_only_key).expect_err("the address is not named");
        assert!(refused.to_string().contains("not valid for name"), "{refused}");
        handshake(client(false), &dns_only, &dns_only_key).expect("names not checked");
        for verify_hostname in [true, false] {
            let refused = handshake(client(verify_hostname), &rogue_cert, &rogue_key).expect_err("unknown issuer");
            assert!(refused.to_string().contains("UnknownIssuer"), "{refused}");
        }
    }
}
