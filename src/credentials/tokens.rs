//! OAuth2 tokens: what a token Secret holds, the login a test uses, and the token manager
//! that keeps the access token fresh.
//!
//! The token Secret (`oauth2.tokenSecretRef`) holds `refresh_token`, `access_token` and
//! `expires_at` (RFC 3339), and optionally `username` and `scope`; `mailroom authorize`
//! creates it, the controller refreshes and rewrites it. The decisions (is the cached
//! token good, refresh or not, what a token endpoint's answer means) are pure functions
//! of values, here; [`TokenManager`] (in `manager`) reads, calls them, and writes.

mod holds;
mod manager;
pub mod own_writes;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;
use secrecy::{ExposeSecret, SecretString};

use super::{CredentialError, Fetched, secret_text};
use crate::api::oauth2::scopes;
use crate::api::{
    AuthMethod, IncomingMailProvider, IncomingMailProviderSpec, OAuth2Flow, OAuth2Spec, Reason,
};
use crate::probe::{Login, printable};
pub use manager::TokenManager;

pub const REFRESH_TOKEN: &str = "refresh_token";
pub const ACCESS_TOKEN: &str = "access_token";
pub const EXPIRES_AT: &str = "expires_at";
pub const USERNAME: &str = "username";
pub const SCOPE: &str = "scope";
/// The label that marks a Secret as holding mailroom's OAuth2 tokens.
pub const TOKEN_LABEL: &str = "mailroom.dev/oauth2-tokens";
/// The field manager of the token manager's writes of refreshed tokens, which a controller
/// started afresh tells apart from a person's change of the Secret (`mailroom authorize`,
/// its `--revoke`, an edit), by managedFields: only those are news to test at once.
pub const REFRESH_WRITER: &str = "mailroom-token-refresh";
/// The field manager of `mailroom authorize`'s writes of a token Secret.
pub const AUTHORIZE_WRITER: &str = "mailroom-authorize";

/// An access token is refreshed when it has less than this left.
pub const REFRESH_AHEAD: Duration = Duration::from_secs(5 * 60);
/// The least time left for an access token to be used in a test.
const USABLE: Duration = Duration::from_secs(10);
/// Bound on one request to a token endpoint.
pub const TOKEN_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// The longest a token endpoint's `Retry-After` holds token requests back: more (hours,
/// or a date a year on) is taken for a mistake, and would outlive the tokens.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// The command that stores tokens for a provider.
pub fn authorize_command(name: &str, namespace: &str, flow: OAuth2Flow) -> String {
    let device = if flow == OAuth2Flow::DeviceCode {
        " --device"
    } else {
        ""
    };
    format!(
        "{} authorize {name} -n {namespace}{device}",
        crate::command_name()
    )
}

/// Whether a Secret is marked as holding mailroom's tokens (`mailroom authorize` marks
/// the ones it creates): only those does the controller write into, and `--revoke` deletes.
pub fn is_token_secret(secret: &Secret) -> bool {
    secret
        .labels()
        .get(TOKEN_LABEL)
        .is_some_and(|v| v == "true")
}

/// Why the controller does not write tokens into an existing Secret without
/// [`TOKEN_LABEL`]: whoever may edit a provider could otherwise have any Secret of the
/// namespace overwritten. `mailroom authorize`, run by someone who may write the Secret,
/// labels it; so can they by hand.
fn unmarked(namespace: &str, name: &str, command: &str) -> String {
    format!(
        "Secret {name:?} is not marked as holding mailroom's tokens (label {TOKEN_LABEL}), so the controller does not write refreshed tokens into it: if it is this provider's, label it (`kubectl label secret {name} -n {namespace} {TOKEN_LABEL}=true`) or run `{command}`"
    )
}

/// What a token Secret holds. `Debug` shows no token.
#[derive(Clone, Default)]
pub struct TokenSet {
    pub refresh_token: Option<SecretString>,
    pub access_token: Option<SecretString>,
    pub expires_at: Option<Timestamp>,
    pub username: Option<String>,
}

impl std::fmt::Debug for TokenSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSet")
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "[redacted]"),
            )
            .field(
                "access_token",
                &self.access_token.as_ref().map(|_| "[redacted]"),
            )
            .field("expires_at", &self.expires_at)
            .field("username", &self.username)
            .finish()
    }
}

fn value(secret: &Secret, key: &str) -> Option<String> {
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.clone())
        .or_else(|| {
            secret
                .string_data
                .as_ref()
                .and_then(|d| d.get(key))
                .map(|s| s.as_bytes().to_vec())
        })?;
    let text = String::from_utf8(bytes).ok()?;
    let text = text.trim().to_string();
    (!text.is_empty()).then_some(text)
}

impl TokenSet {
    pub fn from_secret(secret: &Secret) -> TokenSet {
        TokenSet {
            refresh_token: value(secret, REFRESH_TOKEN).map(SecretString::from),
            access_token: value(secret, ACCESS_TOKEN).map(SecretString::from),
            expires_at: value(secret, EXPIRES_AT).and_then(|t| t.parse().ok()),
            username: value(secret, USERNAME),
        }
    }

    /// Whether the access token is usable at `now` (with a few seconds for the test).
    pub fn access_valid(&self, now: Timestamp) -> bool {
        self.access_token.is_some() && self.expires_at.is_none_or(|e| remaining(e, now) > USABLE)
    }

    /// Whether the access token can be used without refreshing: it has more than
    /// `ahead` left (and at least what [`Self::access_valid`] asks).
    pub fn access_fresh(&self, now: Timestamp, ahead: Duration) -> bool {
        // An unknown expiry: the controller refreshes to learn it; one test run by a
        // person (no margin) uses the token, as `mailroom check` decided before asking.
        self.access_token.is_some()
            && self
                .expires_at
                .map_or(ahead.is_zero(), |e| remaining(e, now) > ahead.max(USABLE))
    }

    fn same_refresh_token(&self, other: &TokenSet) -> bool {
        match (&self.refresh_token, &other.refresh_token) {
            (Some(a), Some(b)) => a.expose_secret() == b.expose_secret(),
            (None, None) => true,
            _ => false,
        }
    }
}

fn remaining(expires_at: Timestamp, now: Timestamp) -> Duration {
    Duration::try_from(now.duration_until(expires_at)).unwrap_or_default()
}

/// What to do before a test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// The cached access token is good for a while.
    Use,
    /// Exchange the refresh token for a new access token.
    Refresh,
    /// App-only: get a token with the client secret.
    ClientCredentials,
    /// Nothing to work with: someone must run `mailroom authorize`.
    Required,
}

/// The pure decision before a test: a token with more than `ahead` left is used
/// ([`REFRESH_AHEAD`] for the controller).
pub fn plan(flow: OAuth2Flow, tokens: Option<&TokenSet>, now: Timestamp, ahead: Duration) -> Plan {
    // An app-only token of unknown expiry is not worth keeping: asking for a new one
    // retires nothing.
    let app_only = flow == OAuth2Flow::ClientCredentials;
    if tokens.is_some_and(|t| t.access_fresh(now, ahead) && (t.expires_at.is_some() || !app_only)) {
        return Plan::Use;
    }
    if app_only {
        return Plan::ClientCredentials;
    }
    match tokens {
        Some(t) if t.refresh_token.is_some() => Plan::Refresh,
        // A token without a known expiry and nothing to refresh it with: try it.
        Some(t) if t.access_valid(now) => Plan::Use,
        _ => Plan::Required,
    }
}

/// The plan when the mail server refused the cached access token that `step` would use:
/// a new one where there is a way to get it, rather than the refused one until it expires.
pub fn plan_after_rejection(step: Plan, flow: OAuth2Flow, tokens: Option<&TokenSet>) -> Plan {
    match step {
        Plan::Use if flow == OAuth2Flow::ClientCredentials => Plan::ClientCredentials,
        Plan::Use if tokens.is_some_and(|t| t.refresh_token.is_some()) => Plan::Refresh,
        other => other,
    }
}

/// A token endpoint's successful answer (RFC 6749 §5.1).
#[derive(Clone, serde::Deserialize)]
pub struct TokenResponse {
    #[serde(deserialize_with = "secret_string")]
    pub access_token: SecretString,
    #[serde(default, deserialize_with = "optional_secret_string")]
    pub refresh_token: Option<SecretString>,
    /// A number, or a string holding one (as some endpoints send it).
    #[serde(default, deserialize_with = "seconds")]
    pub expires_in: Option<u64>,
    /// Space-separated (some servers send a list instead).
    #[serde(default, deserialize_with = "scope_text")]
    pub scope: Option<String>,
}

/// `expires_in`: a number of seconds (some servers send a fraction), or a string holding
/// one. Anything else is an unknown expiry, with a warning: refused, it would throw away
/// the grant, and with it a rotated refresh token the endpoint has already retired.
pub(crate) fn seconds<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    named_seconds(d, "expires_in")
}

/// `interval` (of a device authorization), read as [`seconds`].
pub(crate) fn interval_seconds<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<u64>, D::Error> {
    named_seconds(d, "interval")
}

/// `scope`: a space-separated string (RFC 6749 §3.3), or a list, which some servers send;
/// anything else says nothing of the scope, and costs no grant.
fn scope_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let value = <Option<serde_json::Value> as serde::Deserialize>::deserialize(d)?;
    Ok(match value {
        Some(serde_json::Value::String(s)) => Some(s),
        Some(serde_json::Value::Array(items)) => Some(
            items
                .iter()
                .filter_map(|i| i.as_str())
                .collect::<Vec<_>>()
                .join(" "),
        ),
        _ => None,
    })
}

fn named_seconds<'de, D: serde::Deserializer<'de>>(
    d: D,
    field: &str,
) -> Result<Option<u64>, D::Error> {
    let value = <Option<serde_json::Value> as serde::Deserialize>::deserialize(d)?;
    let seconds = match &value {
        None | Some(serde_json::Value::Null) => return Ok(None),
        Some(serde_json::Value::Number(n)) => n.as_f64(),
        Some(serde_json::Value::String(t)) => t.trim().parse::<f64>().ok(),
        Some(_) => None,
    };
    match seconds.filter(|s| s.is_finite() && *s >= 0.0) {
        // Whole seconds, rounded down: a token is never taken to last longer than said.
        Some(s) => Ok(Some(s.min(u64::MAX as f64) as u64)),
        None => {
            let shown: String = value.map(|v| v.to_string()).unwrap_or_default();
            let shown: String = shown.chars().take(40).collect();
            tracing::warn!(
                "the token endpoint's {field} {shown} is not a number of seconds: taken as unknown"
            );
            Ok(None)
        }
    }
}

impl std::fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenResponse")
            .field("expires_in", &self.expires_in)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

fn secret_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SecretString, D::Error> {
    let text: String = serde::Deserialize::deserialize(d)?;
    Ok(SecretString::from(text))
}

fn optional_secret_string<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<SecretString>, D::Error> {
    let text: Option<String> = serde::Deserialize::deserialize(d)?;
    Ok(text.filter(|t| !t.is_empty()).map(SecretString::from))
}

/// What a token endpoint said.
#[derive(Debug)]
pub enum Grant {
    Tokens(TokenResponse),
    /// An RFC 6749 §5.2 error, such as `invalid_grant` with Microsoft's `AADSTS…` code in
    /// the description.
    Refused {
        error: String,
        description: String,
    },
    /// Anything else: the message for people (never a token).
    Failed(String),
}

/// Whether a token endpoint's refusal (its RFC 6749 §5.2 `error`) means that only a new
/// sign-in helps: the grant was revoked or expired (`invalid_grant`), or Microsoft Entra
/// wants the user back (`interaction_required` for MFA or Conditional Access, as with
/// AADSTS50076 and AADSTS50079; `consent_required`; `login_required`). Asking again
/// would only be refused again.
pub fn needs_sign_in(error: &str) -> bool {
    matches!(
        error,
        "invalid_grant" | "interaction_required" | "consent_required" | "login_required"
    )
}

/// Until when a token endpoint asked not to be called, if it did: HTTP 429 or 503 with a
/// `Retry-After` (capped at [`MAX_RETRY_AFTER`]), to the whole second after it.
pub fn not_before(
    status: u16,
    retry_after: Option<super::http::RetryAfter>,
    now: Timestamp,
) -> Option<Timestamp> {
    if !matches!(status, 429 | 503) {
        return None;
    }
    let delay = retry_after?.delay(now).min(MAX_RETRY_AFTER);
    if delay.is_zero() {
        return None;
    }
    let partial = i64::from(now.subsec_nanosecond() > 0);
    Timestamp::from_second(now.as_second() + delay.as_secs() as i64 + partial).ok()
}

#[derive(serde::Deserialize)]
struct ErrorBody {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

/// Reads a token endpoint's answer to `form`. The server's words are quoted in status,
/// Events and logs, so any value of the form that is a secret (a refresh token, a client
/// secret, a code) is cut out of them: some servers echo the token they refuse.
pub fn read_grant(status: u16, body: &[u8], form: &[(&str, SecretString)]) -> Grant {
    if (200..300).contains(&status) {
        return match serde_json::from_slice::<TokenResponse>(body) {
            Ok(t) => Grant::Tokens(t),
            // serde's words may quote a value, which may be a token: where, not what.
            Err(e) if e.is_data() => Grant::Failed(format!(
                "HTTP {status} with a JSON body mailroom cannot use (a field of the wrong type at line {}, column {})",
                e.line(),
                e.column()
            )),
            Err(_) => Grant::Failed(format!(
                "HTTP {status} without an access_token in a JSON body"
            )),
        };
    }
    if let Ok(e) = serde_json::from_slice::<ErrorBody>(body) {
        let description = e.error_description.unwrap_or_default();
        let first_line = description.lines().next().unwrap_or_default();
        // The endpoint's words go into status, Events and logs: control characters
        // escaped, so that an endpoint cannot forge a log line or drive a terminal.
        return Grant::Refused {
            error: printable(&scrub(&e.error, form))
                .chars()
                .take(100)
                .collect(),
            description: printable(&scrub(first_line, form))
                .chars()
                .take(300)
                .collect(),
        };
    }
    let text = String::from_utf8_lossy(body);
    // Tokens the endpoint sent in a form mailroom cannot read are not quoted: status,
    // Events and logs would show them.
    if ["access_token", "refresh_token", "id_token"]
        .iter()
        .any(|t| text.contains(t))
    {
        return Grant::Failed(format!(
            "HTTP {status} with a body that names tokens, in a form mailroom cannot read (not shown)"
        ));
    }
    let excerpt: String = scrub(&text, form).chars().take(200).collect();
    Grant::Failed(format!("HTTP {status}: {:?}", excerpt.trim()))
}

/// `text` with every secret value of `form` replaced by `[redacted]`. The fields that
/// are no secret (what is asked for, and by which client) stay, and so do values too
/// short to be a token, which would cut ordinary words.
fn scrub(text: &str, form: &[(&str, SecretString)]) -> String {
    const PUBLIC: [&str; 4] = ["grant_type", "client_id", "scope", "redirect_uri"];
    let mut out = text.to_string();
    for (name, value) in form {
        let value = value.expose_secret();
        if !PUBLIC.contains(name) && value.len() >= 8 {
            // As sent, and as a server may echo the form it received (`1%2F%2F0g…`).
            out = out.replace(value, "[redacted]");
            out = out.replace(&super::http::form_value(value), "[redacted]");
        }
    }
    out
}

/// The token Secret after a grant: the new tokens over the old keys; a refresh token the
/// server did not rotate is kept.
pub fn updated_secret(current: Option<&Secret>, grant: &TokenResponse, now: Timestamp) -> Secret {
    let mut secret = super::as_stored(current.cloned().unwrap_or_default());
    let data = secret.data.get_or_insert_with(BTreeMap::new);
    let mut put = |k: &str, v: &str| {
        data.insert(k.to_string(), ByteString(v.as_bytes().to_vec()));
    };
    put(ACCESS_TOKEN, grant.access_token.expose_secret());
    if let Some(r) = &grant.refresh_token {
        put(REFRESH_TOKEN, r.expose_secret());
    }
    let ttl = grant.expires_in.unwrap_or(3600);
    let mut expires = now
        .checked_add(SignedDuration::from_secs(ttl.min(365 * 86400) as i64))
        .unwrap_or(now);
    // `now` is this machine's clock, perhaps a laptop's running ahead (`mailroom
    // authorize`): an access token that states its own expiry in the server's clock (a
    // JWT's `exp`, as Microsoft's do) is not trusted past that.
    if let Some(exp) = jwt_expiry(grant.access_token.expose_secret()) {
        expires = expires.min(exp);
    }
    put(EXPIRES_AT, &expires.to_string());
    if let Some(s) = &grant.scope {
        put(SCOPE, s);
    }
    secret
        .metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert(TOKEN_LABEL.into(), "true".into());
    secret
}

/// The `exp` claim of an access token that is a JWT; `None` for an opaque one. Read as a
/// hint only: the signature is the mail server's business, not the client's.
fn jwt_expiry(token: &str) -> Option<Timestamp> {
    use base64::Engine as _;
    let mut parts = token.split('.');
    let (_, payload, _) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Timestamp::from_second(claims.get("exp")?.as_i64()?).ok()
}

/// The token Secret after a new sign-in (`mailroom authorize`): as [`updated_secret`],
/// but a sign-in replaces every token, so a refresh token (or scope) it did not grant is
/// removed rather than kept from an earlier sign-in, perhaps of another account.
pub fn signed_in_secret(current: Option<&Secret>, grant: &TokenResponse, now: Timestamp) -> Secret {
    let mut secret = updated_secret(current, grant, now);
    let data = secret.data.get_or_insert_with(BTreeMap::new);
    if grant.refresh_token.is_none() {
        data.remove(REFRESH_TOKEN);
    }
    if grant.scope.is_none() {
        data.remove(SCOPE);
    }
    secret
}

/// The provider's OAuth2 settings, if it logs in with OAuth2.
pub fn oauth2_of(provider: &IncomingMailProvider) -> Option<&OAuth2Spec> {
    let auth = &provider.spec.authentication;
    auth.oauth2
        .as_ref()
        .filter(|_| auth.method == AuthMethod::OAuth2)
}

/// The login for an OAuth2 provider: the token Secret's access token, or why there is
/// none. Pure: freshness is the token manager's business.
pub fn login(spec: &IncomingMailProviderSpec, objects: &Fetched) -> Result<Login, CredentialError> {
    let auth = &spec.authentication;
    let Some(o) = &auth.oauth2 else {
        return Err(CredentialError::Token {
            reason: Reason::InvalidSpec,
            message: "spec.authentication.oauth2 is required when method is OAuth2".into(),
        });
    };
    if let Some((reason, message)) = &objects.token_problem {
        return Err(CredentialError::Token {
            reason: *reason,
            message: message.clone(),
        });
    }
    let name = &o.token_secret_ref.name;
    let required = |what: &str| CredentialError::Token {
        reason: Reason::AuthorizationRequired,
        message: format!(
            "{what}: run `{}`",
            authorize_command(
                if objects.provider.is_empty() {
                    "<provider>"
                } else {
                    &objects.provider
                },
                &objects.namespace,
                o.flow,
            )
        ),
    };
    let Some(secret) = objects.secrets.get(name) else {
        return Err(required(&format!(
            "no OAuth2 tokens yet (Secret {:?} does not exist in namespace {:?})",
            name, objects.namespace
        )));
    };
    let tokens = TokenSet::from_secret(secret);
    let Some(token) = tokens.access_token else {
        return Err(required(&format!(
            "Secret {name:?} (spec.authentication.oauth2.tokenSecretRef) holds no access token"
        )));
    };
    let username = match (&auth.username, tokens.username) {
        (Some(u), _) => u.clone(),
        (None, Some(u)) => u,
        (None, None) => secret_text(
            secret,
            name,
            USERNAME,
            "spec.authentication.oauth2.tokenSecretRef (or set spec.authentication.username)",
        )?,
    };
    Ok(Login::OAuth2 {
        username,
        token,
        mechanism: o.sasl_mechanism,
        allow_unencrypted: auth.allow_unencrypted,
    })
}

/// The form of a token request (RFC 6749 §4.4 and §6). Values are secrets.
pub fn token_form(
    o: &OAuth2Spec,
    protocol: crate::api::Protocol,
    plan: Plan,
    refresh_token: Option<&SecretString>,
    client_secret: Option<&SecretString>,
) -> Vec<(&'static str, SecretString)> {
    let plain = |s: &str| SecretString::from(s.to_string());
    let mut form = Vec::new();
    match plan {
        Plan::ClientCredentials => form.push(("grant_type", plain("client_credentials"))),
        _ => {
            form.push(("grant_type", plain("refresh_token")));
            if let Some(r) = refresh_token {
                form.push(("refresh_token", r.clone()));
            }
        }
    }
    form.push(("client_id", plain(&o.client_id)));
    if let Some(c) = client_secret {
        form.push(("client_secret", c.clone()));
    }
    let scopes = scopes(o, protocol);
    if !scopes.is_empty() {
        form.push(("scope", plain(&scopes.join(" "))));
    }
    form
}

/// The TLS configuration for token endpoints: the platform's roots.
pub fn token_tls() -> anyhow::Result<Arc<rustls::ClientConfig>> {
    token_tls_with(None).map_err(|e| anyhow::anyhow!(e))
}

/// The TLS configuration for the OAuth2 endpoints of a provider: the platform's roots,
/// and the certificates of `spec.authentication.oauth2.caBundleRef` (PEM) where it has
/// one. The error says what is wrong with the bundle, naming the field.
pub fn token_tls_with(bundle: Option<&[u8]>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = platform_roots().clone();
    if let Some(pem) = bundle {
        const FIELD: &str = "spec.authentication.oauth2.caBundleRef";
        let mut added = 0;
        use rustls::pki_types::pem::PemObject as _;
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| format!("{FIELD}: not valid PEM: {e}"))?;
            roots.add(cert).map_err(|e| {
                format!("{FIELD}: a certificate that cannot be trusted as a CA: {e}")
            })?;
            added += 1;
        }
        if added == 0 {
            return Err(format!(
                "{FIELD}: holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
            ));
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(tls))
}

/// The platform's roots, read once (a few hundred files on some systems).
fn platform_roots() -> &'static rustls::RootCertStore {
    static ROOTS: std::sync::OnceLock<rustls::RootCertStore> = std::sync::OnceLock::new();
    ROOTS.get_or_init(|| {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(cert);
        }
        roots
    })
}

#[cfg(test)]
mod tests;
