//! Who may call the gRPC API, and what each caller may do: principals known by a bearer token
//! (kept as its SHA-256, compared in constant time) or by their client certificate's name, each
//! with scopes (`admin`, `write:<keyspace>.<table>`, `read:<keyspace>.<table>`, `jobs:<job>`,
//! with `*` matching any run of characters). Pure, no IO: `config` builds [`Principals`],
//! `server::gate` authenticates every request into a [`Caller`] carried in its extensions, and
//! each RPC checks the [`Access`] it needs with [`check`] before doing anything.
//!
//! Invariants: no secret (a token, a header value) is ever kept, logged or echoed — only its
//! hash; a request without a [`Caller`] in its extensions is refused (deny by default), so an
//! RPC served without the gate in front cannot be reached by accident.
//!
//! Threads: any; [`Principals`] is shared read-only by every core.

pub mod jwt;

use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// A `*`-pattern over names (`*` matches any run of characters, everything else itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern(String);

impl Pattern {
    /// Whether `text` matches.
    pub fn matches(&self, text: &str) -> bool {
        glob(self.0.as_bytes(), text.as_bytes())
    }
}

/// `*`-glob matching, iterative with one backtrack point (linear in practice, never recursive).
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((star_p, star_t)) = star {
            p = star_p + 1;
            t = star_t + 1;
            star = Some((star_p, star_t + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// One thing a principal may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Everything.
    Admin,
    /// Write rows of tables matching `(keyspace, table)`: `Write*` RPCs, and `Execute` of a
    /// statement that changes that table (when `query.allow_writes`).
    Write(Pattern, Pattern),
    /// Read tables matching `(keyspace, table)`: `Get`, `Execute` / `ExecuteStream` of a SELECT,
    /// `PlanScan`, `Scan`.
    Read(Pattern, Pattern),
    /// Watch and control the jobs whose name matches.
    Jobs(Pattern),
}

/// Why a scope string is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadScope(String);

impl std::str::FromStr for Scope {
    type Err = BadScope;

    fn from_str(text: &str) -> Result<Scope, BadScope> {
        if text == "admin" {
            return Ok(Scope::Admin);
        }
        let expected = "`admin`, `write:<keyspace>.<table>`, `read:<keyspace>.<table>` or `jobs:<job>` \
                        (names of letters, digits, `_` and `*`)";
        let Some((kind, object)) = text.split_once(':') else {
            return Err(BadScope(expected.to_string()));
        };
        let name =
            |part: &str| !part.is_empty() && part.bytes().all(|c| c.is_ascii_alphanumeric() || b"_*".contains(&c));
        match kind {
            "write" | "read" => {
                let Some((keyspace, table)) = object.split_once('.') else {
                    return Err(BadScope(format!(
                        "`{kind}:` takes `<keyspace>.<table>`, as `{kind}:shop.*`"
                    )));
                };
                if !name(keyspace) || !name(table) {
                    return Err(BadScope(expected.to_string()));
                }
                let (keyspace, table) = (Pattern(keyspace.to_string()), Pattern(table.to_string()));
                Ok(match kind {
                    "write" => Scope::Write(keyspace, table),
                    _ => Scope::Read(keyspace, table),
                })
            }
            "jobs"
                if !object.is_empty()
                    && object
                        .bytes()
                        .all(|c| c.is_ascii_alphanumeric() || b"_*-.".contains(&c)) =>
            {
                Ok(Scope::Jobs(Pattern(object.to_string())))
            }
            _ => Err(BadScope(expected.to_string())),
        }
    }
}

/// What one call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access<'a> {
    /// Write rows of `keyspace.table`.
    Write(&'a str),
    /// Read `keyspace.table`.
    Read(&'a str),
    /// Watch or control job `name`.
    Job(&'a str),
    /// Only `admin` (a statement with no one table: a schema change, a BATCH).
    Admin,
    /// Any authenticated caller (`GetTopology`, `ListJobs`).
    Authenticated,
}

impl Access<'_> {
    /// The scope that would allow it, for the refusal's message.
    pub fn needed(&self) -> String {
        match self {
            Access::Write(table) => format!("write:{table}"),
            Access::Read(table) => format!("read:{table}"),
            Access::Job(name) => format!("jobs:{name}"),
            Access::Admin | Access::Authenticated => "admin".to_string(),
        }
    }
}

/// A caller known to the gateway.
#[derive(Debug)]
pub struct Principal {
    /// Its name (`ingest.auth.principal[].name`): in refusals, logs and metrics.
    pub name: String,
    /// What it may do.
    pub scopes: Vec<Scope>,
}

impl Principal {
    /// Whether a scope allows `access`.
    pub fn allows(&self, access: Access<'_>) -> bool {
        let table = |keyspace: &Pattern, table: &Pattern, name: &str| match name.split_once('.') {
            Some((k, t)) => keyspace.matches(k) && table.matches(t),
            None => false,
        };
        self.scopes.iter().any(|scope| match (scope, access) {
            (Scope::Admin, _) | (_, Access::Authenticated) => true,
            (Scope::Write(k, t), Access::Write(name)) | (Scope::Read(k, t), Access::Read(name)) => table(k, t, name),
            (Scope::Jobs(pattern), Access::Job(name)) => pattern.matches(name),
            _ => false,
        })
    }
}

/// How a principal proves who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// `authorization: Bearer <token>` with a token whose SHA-256 is this.
    Token([u8; 32]),
    /// A verified client certificate with this name (subject CN, or a DNS or URI SAN).
    Certificate(String),
}

/// The principals of `ingest.auth`, shared by every core.
#[derive(Debug, Default)]
pub struct Principals {
    entries: Vec<(Credential, Arc<Principal>)>,
    /// `ingest.auth.jwt`: bearer JWTs verified against a JWKS, when configured.
    jwt: Option<jwt::JwtVerifier>,
}

/// The SHA-256 of a token, as `token_sha256` keeps it.
pub fn token_sha256(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// [`token_sha256`] as `token_sha256` is written in the config: 64 lowercase hex digits.
pub fn token_sha256_hex(token: &str) -> String {
    token_sha256(token).iter().map(|b| format!("{b:02x}")).collect()
}

impl Principals {
    /// From (credential, principal) pairs; `config` has checked names and credentials unique.
    pub fn new(entries: Vec<(Credential, Principal)>) -> Principals {
        Principals {
            entries: entries.into_iter().map(|(c, p)| (c, Arc::new(p))).collect(),
            jwt: None,
        }
    }

    /// These principals, and callers with a JWT `verifier` accepts.
    pub fn with_jwt(mut self, verifier: jwt::JwtVerifier) -> Principals {
        self.jwt = Some(verifier);
        self
    }

    /// The principal whose token hash is `token`'s. Every token is compared, in constant time,
    /// whether or not an earlier one matched: the time taken says nothing of the tokens.
    pub fn by_token(&self, token: &str) -> Option<Arc<Principal>> {
        let hash = token_sha256(token);
        let mut found = None;
        for (credential, principal) in &self.entries {
            if let Credential::Token(expected) = credential {
                if bool::from(expected.ct_eq(&hash)) {
                    found = Some(Arc::clone(principal));
                }
            }
        }
        found
    }

    /// The principal of a certificate with one of `names` (its subject CN and SANs).
    pub fn by_certificate(&self, names: &[String]) -> Option<Arc<Principal>> {
        self.entries
            .iter()
            .find_map(|(credential, principal)| match credential {
                Credential::Certificate(name) if names.iter().any(|n| n == name) => Some(Arc::clone(principal)),
                _ => None,
            })
    }

    /// Whether any principal is known by a certificate.
    pub fn has_certificates(&self) -> bool {
        self.entries
            .iter()
            .any(|(c, _)| matches!(c, Credential::Certificate(_)))
    }
}

/// Why a request was not authenticated. Never holds the secret it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No `authorization` header and no certificate of a principal.
    NoCredentials,
    /// An `authorization` header that is not `Bearer <token>`.
    BadHeader,
    /// A bearer token of no principal.
    UnknownToken,
    /// A bearer JWT `ingest.auth.jwt` refused.
    Jwt(jwt::JwtProblem),
}

impl AuthFailure {
    /// The `reason` label of `shardgate_auth_failures_total`.
    pub fn label(self) -> &'static str {
        match self {
            AuthFailure::NoCredentials => "no_credentials",
            AuthFailure::BadHeader => "bad_header",
            AuthFailure::UnknownToken => "unknown_token",
            AuthFailure::Jwt(jwt::JwtProblem::Expired) => "jwt_expired",
            AuthFailure::Jwt(_) => "jwt_invalid",
        }
    }
}

impl std::fmt::Display for AuthFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AuthFailure::NoCredentials => {
                "no credentials: send `authorization: Bearer <token>` (or a client certificate of a principal)"
            }
            AuthFailure::BadHeader => "the `authorization` header is not `Bearer <token>`",
            AuthFailure::UnknownToken => "the bearer token is not one of `ingest.auth.principal`",
            AuthFailure::Jwt(problem) => problem.describe(),
        })
    }
}

/// Authenticates one request: its bearer token when it sends one, else the connection's
/// certificate principal (`certificate`), else none.
pub fn authenticate(
    principals: &Principals,
    authorization: Option<&[u8]>,
    certificate: Option<&Arc<Principal>>,
) -> Result<Arc<Principal>, AuthFailure> {
    let Some(header) = authorization else {
        return certificate.cloned().ok_or(AuthFailure::NoCredentials);
    };
    let token = std::str::from_utf8(header)
        .ok()
        .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or(AuthFailure::BadHeader)?;
    if let Some(principal) = principals.by_token(token) {
        return Ok(principal);
    }
    match &principals.jwt {
        Some(verifier) if jwt::JwtVerifier::looks_like_jwt(token) => {
            verifier.verify(token).map(Arc::new).map_err(AuthFailure::Jwt)
        }
        _ => Err(AuthFailure::UnknownToken),
    }
}

/// Who is calling, as the gate found it; in every request's extensions.
#[derive(Debug, Clone)]
pub enum Caller {
    /// `ingest.auth` is off: anyone who reaches the port may do anything.
    Anyone,
    /// An authenticated principal.
    Principal(Arc<Principal>),
}

/// A call its caller may not make.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("principal `{principal}` has no scope allowing `{needed}`")]
pub struct Denied {
    /// The caller's name.
    pub principal: String,
    /// The scope it lacks.
    pub needed: String,
}

/// Whether the caller in `extensions` may make a call needing `access`. A request without a
/// caller (not through the gate) is refused.
pub fn check(extensions: &tonic::Extensions, access: Access<'_>) -> Result<(), Denied> {
    check_caller(extensions.get::<Caller>(), access)
}

/// Like [`check`], for a caller taken from a request's extensions earlier (a stream's, checked
/// per message).
pub fn check_caller(caller: Option<&Caller>, access: Access<'_>) -> Result<(), Denied> {
    match caller {
        Some(caller) => caller.check(access),
        None => Err(Denied {
            principal: "(none: the request did not pass the gate)".to_string(),
            needed: access.needed(),
        }),
    }
}

impl Caller {
    /// Whether this caller may make a call needing `access`.
    pub fn check(&self, access: Access<'_>) -> Result<(), Denied> {
        match self {
            Caller::Anyone => Ok(()),
            Caller::Principal(principal) if principal.allows(access) => Ok(()),
            Caller::Principal(principal) => Err(Denied {
                principal: principal.name.clone(),
                needed: access.needed(),
            }),
        }
    }

    /// The caller of `extensions`, if the gate put one there.
    pub fn of(extensions: &tonic::Extensions) -> Option<Caller> {
        extensions.get::<Caller>().cloned()
    }
}

/// The names a client certificate (DER) goes by: its subject's common names, then its DNS and
/// URI subject-alternative names. Empty when it cannot be parsed (rustls verified it already).
pub fn certificate_names(der: &[u8]) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, certificate)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut names: Vec<String> = certificate
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_string))
        .collect();
    if let Ok(Some(alternatives)) = certificate.subject_alternative_name() {
        for name in &alternatives.value.general_names {
            match name {
                GeneralName::DNSName(dns) => names.push(dns.to_string()),
                GeneralName::URI(uri) => names.push(uri.to_string()),
                _ => {}
            }
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(scopes: &[&str]) -> Principal {
        Principal {
            name: "p".into(),
            scopes: scopes.iter().map(|s| s.parse().expect("scope")).collect(),
        }
    }

    /// Globs match whole names, `*` any run (empty included).
    #[test]
    fn patterns_match_whole_names() {
        let cases = [
            ("orders", "orders", true),
            ("orders", "orders2", false),
            ("ord*", "orders", true),
            ("*", "", true),
            ("*ers", "orders", true),
            ("o*d*s", "orders", true),
            ("o*x", "orders", false),
            ("a*a*a*b", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", false),
        ];
        for (pattern, text, expected) in cases {
            assert_eq!(Pattern(pattern.into()).matches(text), expected, "{pattern} ~ {text}");
        }
    }

    /// Each scope allows its own kind of access on matching names only; admin allows all.
    #[test]
    fn scopes_allow_their_access_only() {
        let writer = principal(&["write:shop.orders", "read:shop.*", "jobs:nightly_*"]);
        assert!(writer.allows(Access::Write("shop.orders")));
        assert!(!writer.allows(Access::Write("shop.payments")));
        assert!(!writer.allows(Access::Write("shop")));
        assert!(writer.allows(Access::Read("shop.payments")));
        assert!(!writer.allows(Access::Read("bank.payments")));
        assert!(writer.allows(Access::Job("nightly_rollup")));
        assert!(!writer.allows(Access::Job("hourly")));
        assert!(!writer.allows(Access::Admin));
        assert!(writer.allows(Access::Authenticated));
        let admin = principal(&["admin"]);
        assert!(admin.allows(Access::Admin) && admin.allows(Access::Write("x.y")));
        assert!(!principal(&[]).allows(Access::Authenticated));
    }

    /// Malformed scopes are refused with what is expected.
    #[test]
    fn malformed_scopes_are_refused() {
        for bad in [
            "",
            "root",
            "write:orders",
            "write:shop.",
            "read:.x",
            "write:sh op.x",
            "delete:shop.x",
            "jobs:",
        ] {
            assert!(bad.parse::<Scope>().is_err(), "{bad}");
        }
        assert_eq!(
            "jobs:nightly-1".parse::<Scope>(),
            Ok(Scope::Jobs(Pattern("nightly-1".into())))
        );
    }

    /// A token authenticates its principal; a wrong, absent or malformed one does not; with no
    /// header the connection's certificate principal is the caller.
    #[test]
    fn tokens_and_certificates_authenticate() {
        let principals = Principals::new(vec![
            (Credential::Token(token_sha256("s3cret")), principal(&["admin"])),
            (
                Credential::Certificate("app.example".into()),
                Principal {
                    name: "app".into(),
                    scopes: vec![],
                },
            ),
        ]);
        assert!(authenticate(&principals, Some(b"Bearer s3cret"), None).is_ok());
        assert_eq!(
            authenticate(&principals, Some(b"Bearer nope"), None).err(),
            Some(AuthFailure::UnknownToken)
        );
        assert_eq!(
            authenticate(&principals, Some(b"Basic xyz"), None).err(),
            Some(AuthFailure::BadHeader)
        );
        assert_eq!(
            authenticate(&principals, None, None).err(),
            Some(AuthFailure::NoCredentials)
        );
        let app = principals
            .by_certificate(&["x".into(), "app.example".into()])
            .expect("certificate principal");
        assert_eq!(
            authenticate(&principals, None, Some(&app)).map(|p| p.name.clone()),
            Ok("app".into())
        );
        assert!(!AuthFailure::UnknownToken.to_string().contains("nope"));
    }

    /// Without a caller in its extensions a request is refused, whatever it asks.
    #[test]
    fn a_request_without_a_caller_is_refused() {
        let extensions = tonic::Extensions::new();
        assert!(check(&extensions, Access::Authenticated).is_err());
        let mut extensions = tonic::Extensions::new();
        extensions.insert(Caller::Anyone);
        assert!(check(&extensions, Access::Admin).is_ok());
    }
}
