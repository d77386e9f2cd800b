//! The key Dovecot's oauth2 passdb validates JWT access tokens with, and the claims it
//! expects, so that a test-side token server can mint tokens Dovecot accepts.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::hmac;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// An HS256 signing key and the claims Dovecot checks.
#[derive(Clone, Serialize, Deserialize)]
pub struct OAuthKey {
    /// The shared HMAC secret.
    #[serde(with = "base64_bytes")]
    pub secret: Vec<u8>,
    /// Always `HS256`.
    pub alg: String,
    /// The `kid` Dovecot looks the key up by; tokens without `kid` use `default` too.
    pub kid: String,
    /// The only `iss` Dovecot accepts.
    pub issuer: String,
    /// Must appear in `aud` (Dovecot's `client_id`).
    pub audience: String,
    /// The claim that must equal the login name (Dovecot's `username_attribute`).
    pub username_claim: String,
    /// The folder given to Dovecot as `local_validation_key_dict = fs:posix:prefix=...`.
    pub key_dir: PathBuf,
}

impl std::fmt::Debug for OAuthKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuthKey")
            .field("secret", &"[redacted]")
            .field("alg", &self.alg)
            .field("kid", &self.kid)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("username_claim", &self.username_claim)
            .field("key_dir", &self.key_dir)
            .finish()
    }
}

impl OAuthKey {
    /// A fresh random key, written where Dovecot's dict looks it up:
    /// `<key_dir>/<azp or "default">/<alg>/<kid>`, holding the base64 secret.
    pub fn generate(key_dir: &Path) -> Result<OAuthKey> {
        let mut secret = vec![0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
            .map_err(|_| anyhow::anyhow!("no randomness for the OAuth2 signing key"))?;
        let key = OAuthKey {
            secret,
            alg: "HS256".into(),
            kid: "default".into(),
            issuer: "https://oauth.mailroom.test".into(),
            audience: "mailroom-dovecot".into(),
            username_claim: "sub".into(),
            key_dir: key_dir.to_path_buf(),
        };
        let file = key.key_file();
        fs::create_dir_all(file.parent().expect("key file has a folder"))?;
        fs::write(&file, STANDARD.encode(&key.secret))
            .with_context(|| format!("writing {}", file.display()))?;
        Ok(key)
    }

    /// The file holding the base64 secret for tokens without `azp`.
    pub fn key_file(&self) -> PathBuf {
        self.key_dir.join("default").join(&self.alg).join(&self.kid)
    }

    /// Signs `claims` as an HS256 JWT with this key.
    pub fn sign(&self, claims: &Value) -> String {
        sign_with(&self.secret, &self.kid, claims)
    }

    /// The claims of a valid access token for `user`, expiring after `ttl`.
    pub fn claims_for(&self, user: &str, ttl: Duration) -> Value {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        // Issued a little before now, as an identity provider whose clock is a little
        // behind the mail server's would: Dovecot refuses a token issued after its own
        // "now" (a CI run once saw a fresh token refused, cause unconfirmed).
        let mut claims = json!({
            "iss": self.issuer,
            "aud": self.audience,
            "sub": user,
            "iat": now.saturating_sub(30),
            "exp": now + ttl.as_secs(),
            "scope": "mail",
        });
        claims[self.username_claim.as_str()] = json!(user);
        claims
    }

    /// A valid access token for `user`, expiring after `ttl`.
    pub fn access_token(&self, user: &str, ttl: Duration) -> String {
        self.sign(&self.claims_for(user, ttl))
    }

    /// A token with the right claims signed by another key: Dovecot must refuse it.
    pub fn forged_token(&self, user: &str, ttl: Duration) -> String {
        let other: Vec<u8> = self.secret.iter().map(|b| b ^ 0x5a).collect();
        sign_with(&other, &self.kid, &self.claims_for(user, ttl))
    }
}

fn sign_with(secret: &[u8], kid: &str, claims: &Value) -> String {
    let header = json!({ "alg": "HS256", "typ": "JWT", "kid": kid });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let tag = hmac::sign(&key, signing_input.as_bytes());
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
}

mod base64_bytes {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_verifies_with_the_secret() {
        let token = sign_with(b"secret", "k", &json!({"sub": "alice"}));
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        let header: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
        assert_eq!(header["alg"], "HS256");
        assert_eq!(header["kid"], "k");
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"secret");
        let sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        hmac::verify(&key, format!("{}.{}", parts[0], parts[1]).as_bytes(), &sig).unwrap();
    }

    #[test]
    fn claims_carry_what_dovecot_checks() {
        let dir = tempfile::tempdir().unwrap();
        let key = OAuthKey::generate(dir.path()).unwrap();
        let claims = key.claims_for("alice", Duration::from_secs(60));
        assert_eq!(claims["iss"], key.issuer);
        assert_eq!(claims["aud"], key.audience);
        assert_eq!(claims[key.username_claim.as_str()], "alice");
        let stored = fs::read_to_string(key.key_file()).unwrap();
        assert_eq!(STANDARD.decode(stored).unwrap(), key.secret);
        assert!(!format!("{key:?}").contains(&STANDARD.encode(&key.secret)));
    }
}
