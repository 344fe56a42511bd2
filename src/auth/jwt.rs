//! Bearer JWTs (RFC 7519) verified against the public keys of a JWKS file: the signature with
//! the key the header's `kid` names (or the file's only key), the algorithm the key allows
//! (never one of another family, never HMAC), `exp` (required) and `nbf` with a leeway, `iss`
//! and `aud` as configured; the caller's scopes come from one claim (a space-separated string,
//! as OAuth 2 writes `scope`, or an array of strings), the name from another. Pure; the file is
//! read by `config`. Threads: any (shared read-only by every core).

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use super::{Principal, Scope};

/// One key of the JWKS: its id, the algorithms it verifies, the key.
struct Key {
    id: Option<String>,
    algorithms: Vec<Algorithm>,
    key: DecodingKey,
}

/// Verifies JWTs for `ingest.auth.jwt`.
pub struct JwtVerifier {
    keys: Vec<Key>,
    issuer: String,
    audience: String,
    scopes_claim: String,
    subject_claim: String,
    leeway_s: u64,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("keys", &self.keys.len())
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish()
    }
}

/// What the verifier checks besides the signature.
#[derive(Debug, Clone)]
pub struct JwtRules {
    /// The `iss` a token must carry.
    pub issuer: String,
    /// An `aud` a token must carry.
    pub audience: String,
    /// The claim holding the scopes.
    pub scopes_claim: String,
    /// The claim naming the caller.
    pub subject_claim: String,
    /// Clock skew allowed on `exp` and `nbf`, seconds.
    pub leeway_s: u64,
}

/// Why a JWT was refused. Never holds the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtProblem {
    /// Not three base64url parts with a JSON header and claims.
    Malformed,
    /// Its `kid` (or, without one, the file's keys) names no usable key.
    UnknownKey,
    /// An algorithm its key does not allow.
    WrongAlgorithm,
    /// The signature does not verify.
    BadSignature,
    /// Past `exp` (plus the leeway).
    Expired,
    /// Before `nbf` (less the leeway).
    NotYetValid,
    /// Another `iss`.
    WrongIssuer,
    /// No matching `aud`.
    WrongAudience,
    /// `exp`, or the subject claim, is missing.
    MissingClaim,
}

impl JwtProblem {
    /// What is wrong, for the refusal.
    pub fn describe(self) -> &'static str {
        match self {
            JwtProblem::Malformed => "the JWT is malformed",
            JwtProblem::UnknownKey => "the JWT's `kid` names no key of `ingest.auth.jwt.jwks_file`",
            JwtProblem::WrongAlgorithm => "the JWT's `alg` is not one its key verifies",
            JwtProblem::BadSignature => "the JWT's signature does not verify with its key",
            JwtProblem::Expired => "the JWT has expired (`exp`)",
            JwtProblem::NotYetValid => "the JWT is not valid yet (`nbf`)",
            JwtProblem::WrongIssuer => "the JWT's `iss` is not `ingest.auth.jwt.issuer`",
            JwtProblem::WrongAudience => "the JWT's `aud` does not hold `ingest.auth.jwt.audience`",
            JwtProblem::MissingClaim => "the JWT lacks `exp` or its subject claim",
        }
    }
}

/// The algorithms a key of this kind verifies when the JWK names none.
fn family_algorithms(parameters: &AlgorithmParameters) -> Option<Vec<Algorithm>> {
    use Algorithm::*;
    match parameters {
        AlgorithmParameters::RSA(_) => Some(vec![RS256, RS384, RS512, PS256, PS384, PS512]),
        AlgorithmParameters::EllipticCurve(_) => Some(vec![ES256, ES384]),
        AlgorithmParameters::OctetKeyPair(_) => Some(vec![EdDSA]),
        // A shared secret is not a public key: refused.
        AlgorithmParameters::OctetKey(_) => None,
    }
}

impl JwtVerifier {
    /// From a JWKS document; the error says which key is unusable and why.
    pub fn new(jwks: &str, rules: JwtRules) -> Result<JwtVerifier, String> {
        let set: JwkSet = serde_json::from_str(jwks).map_err(|e| format!("not a JWKS document ({e})"))?;
        if set.keys.is_empty() {
            return Err("a JWKS with at least one key (`keys` is empty)".to_string());
        }
        let mut keys = Vec::with_capacity(set.keys.len());
        for (index, jwk) in set.keys.iter().enumerate() {
            let named = |what: String| format!("keys[{index}]: {what}");
            let Some(family) = family_algorithms(&jwk.algorithm) else {
                return Err(named(
                    "a shared-secret (`oct`) key; only public keys (RSA, EC, OKP) verify tokens".to_string(),
                ));
            };
            let algorithms = match &jwk.common.key_algorithm {
                Some(named_alg) => {
                    let algorithm: Algorithm = named_alg
                        .to_string()
                        .parse()
                        .map_err(|_| named(format!("`alg` = `{named_alg}` is not a signature algorithm")))?;
                    if !family.contains(&algorithm) {
                        return Err(named(format!("`alg` = `{named_alg}` does not fit the key's type")));
                    }
                    vec![algorithm]
                }
                None => family,
            };
            let key = DecodingKey::from_jwk(jwk).map_err(|e| named(format!("not a usable key ({e})")))?;
            keys.push(Key {
                id: jwk.common.key_id.clone(),
                algorithms,
                key,
            });
        }
        Ok(JwtVerifier {
            keys,
            issuer: rules.issuer,
            audience: rules.audience,
            scopes_claim: rules.scopes_claim,
            subject_claim: rules.subject_claim,
            leeway_s: rules.leeway_s,
        })
    }

    /// Whether `token` is shaped like a JWT (three dot-separated parts), so that it is checked
    /// here rather than as an opaque token.
    pub fn looks_like_jwt(token: &str) -> bool {
        token.split('.').count() == 3 && token.starts_with("eyJ")
    }

    /// The principal a valid token names: `jwt:<subject>` with the token's scopes that parse
    /// (others, such as `openid`, are ignored).
    pub fn verify(&self, token: &str) -> Result<Principal, JwtProblem> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| JwtProblem::Malformed)?;
        let key = match &header.kid {
            Some(kid) => self.keys.iter().find(|k| k.id.as_deref() == Some(kid.as_str())),
            None if self.keys.len() == 1 => self.keys.first(),
            None => None,
        }
        .ok_or(JwtProblem::UnknownKey)?;
        if !key.algorithms.contains(&header.alg) {
            return Err(JwtProblem::WrongAlgorithm);
        }
        let mut validation = Validation::new(header.alg);
        validation.leeway = self.leeway_s;
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, &key.key, &validation)
            .map_err(|error| classify(error.kind()))?;
        let claims = data.claims;
        let subject = claims
            .get(&self.subject_claim)
            .and_then(serde_json::Value::as_str)
            .ok_or(JwtProblem::MissingClaim)?;
        let scopes: Vec<Scope> = match claims.get(&self.scopes_claim) {
            Some(serde_json::Value::String(text)) => text.split_whitespace().filter_map(|s| s.parse().ok()).collect(),
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .filter_map(serde_json::Value::as_str)
                .filter_map(|s| s.parse().ok())
                .collect(),
            _ => Vec::new(),
        };
        Ok(Principal {
            name: format!("jwt:{subject}"),
            scopes,
        })
    }
}

fn classify(kind: &jsonwebtoken::errors::ErrorKind) -> JwtProblem {
    use jsonwebtoken::errors::ErrorKind;
    match kind {
        ErrorKind::InvalidSignature | ErrorKind::Crypto(_) => JwtProblem::BadSignature,
        ErrorKind::ExpiredSignature => JwtProblem::Expired,
        ErrorKind::ImmatureSignature => JwtProblem::NotYetValid,
        ErrorKind::InvalidIssuer => JwtProblem::WrongIssuer,
        ErrorKind::InvalidAudience => JwtProblem::WrongAudience,
        ErrorKind::MissingRequiredClaim(_) => JwtProblem::MissingClaim,
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => JwtProblem::WrongAlgorithm,
        _ => JwtProblem::Malformed,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use base64::Engine;

    /// A P-256 signing key (PKCS#8 DER) and its JWK with `kid`.
    pub(crate) fn es256_key(kid: &str) -> (Vec<u8>, serde_json::Value) {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let point = pair.public_key_raw();
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let jwk = serde_json::json!({
            "kty": "EC", "crv": "P-256", "kid": kid, "use": "sig",
            "x": b64(&point[1..33]), "y": b64(&point[33..65]),
        });
        (pair.serialize_der(), jwk)
    }

    pub(crate) fn sign(der: &[u8], kid: &str, claims: &serde_json::Value) -> String {
        let mut header = jsonwebtoken::Header::new(Algorithm::ES256);
        header.kid = Some(kid.to_string());
        jsonwebtoken::encode(&header, claims, &jsonwebtoken::EncodingKey::from_ec_der(der)).expect("sign")
    }

    fn rules() -> JwtRules {
        JwtRules {
            issuer: "https://issuer.test".into(),
            audience: "shardgate".into(),
            scopes_claim: "scope".into(),
            subject_claim: "sub".into(),
            leeway_s: 5,
        }
    }

    fn now() -> i64 {
        chrono::Utc::now().timestamp()
    }

    /// A token of the JWKS's key verifies and carries its scopes; expired, wrongly signed,
    /// other-issuer, other-audience, unknown-kid and HMAC-forged tokens are each refused with
    /// their own reason.
    #[test]
    fn jwts_verify_against_the_jwks_and_nothing_else() {
        let (der, jwk) = es256_key("k1");
        let (other_der, _) = es256_key("k1");
        let verifier = JwtVerifier::new(&serde_json::json!({ "keys": [jwk] }).to_string(), rules()).expect("jwks");
        let claims = |exp: i64, iss: &str, aud: &str| serde_json::json!({"sub": "etl", "iss": iss, "aud": aud, "exp": exp, "scope": "openid write:shop.* read:shop.orders"});
        let good = sign(&der, "k1", &claims(now() + 300, "https://issuer.test", "shardgate"));
        assert!(JwtVerifier::looks_like_jwt(&good));
        let principal = verifier.verify(&good).expect("valid");
        assert_eq!(principal.name, "jwt:etl");
        assert!(principal.allows(super::super::Access::Write("shop.orders")));
        assert!(!principal.allows(super::super::Access::Write("bank.accounts")));
        assert!(principal.allows(super::super::Access::Read("shop.orders")));
        assert!(!principal.allows(super::super::Access::Read("shop.users")));
        let cases = [
            (
                sign(&der, "k1", &claims(now() - 60, "https://issuer.test", "shardgate")),
                JwtProblem::Expired,
            ),
            (
                sign(
                    &other_der,
                    "k1",
                    &claims(now() + 300, "https://issuer.test", "shardgate"),
                ),
                JwtProblem::BadSignature,
            ),
            (
                sign(&der, "k1", &claims(now() + 300, "https://evil.test", "shardgate")),
                JwtProblem::WrongIssuer,
            ),
            (
                sign(&der, "k1", &claims(now() + 300, "https://issuer.test", "other")),
                JwtProblem::WrongAudience,
            ),
            (
                sign(&der, "k2", &claims(now() + 300, "https://issuer.test", "shardgate")),
                JwtProblem::UnknownKey,
            ),
        ];
        for (token, problem) in cases {
            assert_eq!(verifier.verify(&token).map(|p| p.name), Err(problem));
        }
        // HS256 "signed" with the public key's text: another family, refused before any MAC.
        let mut header = jsonwebtoken::Header::new(Algorithm::HS256);
        header.kid = Some("k1".into());
        let forged = jsonwebtoken::encode(
            &header,
            &claims(now() + 300, "https://issuer.test", "shardgate"),
            &jsonwebtoken::EncodingKey::from_secret(b"public"),
        )
        .expect("encode");
        assert_eq!(
            verifier.verify(&forged).map(|p| p.name),
            Err(JwtProblem::WrongAlgorithm)
        );
        assert_eq!(
            verifier.verify("eyJ.not.jwt").map(|p| p.name),
            Err(JwtProblem::Malformed)
        );
        // A JWKS holding a shared secret is refused, naming the key.
        let oct = serde_json::json!({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}).to_string();
        assert!(JwtVerifier::new(&oct, rules()).expect_err("oct").starts_with("keys[0]"));
    }
}
