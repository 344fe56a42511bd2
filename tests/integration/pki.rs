//! A test PKI for the TLS and auth tests: a CA made here (rcgen) whose certificates are
//! written as PEM files, and the client side's [`ClientTls`] from them.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use shardgate::tls::ClientTls;

/// A CA whose certificates are written as PEM files in `dir`.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key")).expect("CA");
        TestCa { issuer }
    }

    /// Writes the CA certificate to `dir/<name>.pem`.
    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(format!("{name}.pem"));
        std::fs::write(&path, self.issuer.pem()).expect("write CA");
        path
    }

    /// Issues the gateway's server certificate (for `localhost` and `127.0.0.1`), written to
    /// `dir/server.pem` and `dir/server.key`.
    pub fn issue_server(&self, dir: &Path) -> (PathBuf, PathBuf) {
        self.issue(
            dir,
            "server",
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// Issues a certificate for `names` (DNS names or IP addresses) with `usage`, written to
    /// `dir/<file>.pem` and `dir/<file>.key`.
    pub fn issue(&self, dir: &Path, file: &str, names: &[&str], usage: ExtendedKeyUsagePurpose) -> (PathBuf, PathBuf) {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).expect("params");
        params.distinguished_name.push(DnType::CommonName, file);
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("signed");
        let (cert_path, key_path) = (dir.join(format!("{file}.pem")), dir.join(format!("{file}.key")));
        std::fs::write(&cert_path, cert.pem()).expect("write cert");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        (cert_path, key_path)
    }
}

/// What a client trusts (`ca`) and presents (`identity`: certificate and key files).
pub fn client_tls(ca: &Path, identity: Option<&(PathBuf, PathBuf)>) -> ClientTls {
    ClientTls {
        ca_pem: std::fs::read(ca).expect("CA"),
        identity: identity.map(|(cert, key)| (std::fs::read(cert).expect("cert"), std::fs::read(key).expect("key"))),
    }
}
