//! OAuth2 tokens: what a token Secret holds, the login a test uses, and the token manager
//! that keeps the access token fresh.
//!
//! The token Secret (`oauth2.tokenSecretRef`) holds `refresh_token`, `access_token` and
//! `expires_at` (RFC 3339), and optionally `username` and `scope`; `mailroom authorize`
//! creates it, the controller refreshes and rewrites it. The decisions (is the cached
//! token good, refresh or not, what a token endpoint's answer means) are pure functions
//! of values; [`TokenManager`] reads, calls them, and writes.

pub mod own_writes;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use secrecy::{ExposeSecret, SecretString};

use super::{CredentialError, Fetched, ObjectKind, secret_text};
use crate::api::oauth2::{endpoints, plaintext_endpoints, scopes};
use crate::api::{
    AuthMethod, IncomingMailProvider, IncomingMailProviderSpec, OAuth2Flow, OAuth2Spec, Reason,
};
use crate::probe::Login;
use own_writes::OwnWrites;

pub const REFRESH_TOKEN: &str = "refresh_token";
pub const ACCESS_TOKEN: &str = "access_token";
pub const EXPIRES_AT: &str = "expires_at";
pub const USERNAME: &str = "username";
pub const SCOPE: &str = "scope";
/// The label that marks a Secret as holding mailroom's OAuth2 tokens.
pub const TOKEN_LABEL: &str = "mailroom.dev/oauth2-tokens";

/// An access token is refreshed when it has less than this left.
pub const REFRESH_AHEAD: Duration = Duration::from_secs(5 * 60);
/// The least time left for an access token to be used in a test.
const USABLE: Duration = Duration::from_secs(10);
/// Bound on one request to a token endpoint.
pub const TOKEN_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// The command that stores tokens for a provider.
pub fn authorize_command(name: &str, namespace: &str, flow: OAuth2Flow) -> String {
    let device = if flow == OAuth2Flow::DeviceCode {
        " --device"
    } else {
        ""
    };
    format!("mailroom authorize {name} -n {namespace}{device}")
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
    if tokens.is_some_and(|t| t.access_fresh(now, ahead)) {
        return Plan::Use;
    }
    if flow == OAuth2Flow::ClientCredentials {
        return Plan::ClientCredentials;
    }
    match tokens {
        Some(t) if t.refresh_token.is_some() => Plan::Refresh,
        // A token without a known expiry and nothing to refresh it with: try it.
        Some(t) if t.access_valid(now) => Plan::Use,
        _ => Plan::Required,
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
    #[serde(default)]
    pub scope: Option<String>,
}

fn seconds<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum NumberOrText {
        Number(u64),
        Text(String),
    }
    match <Option<NumberOrText> as serde::Deserialize>::deserialize(d)? {
        None => Ok(None),
        Some(NumberOrText::Number(n)) => Ok(Some(n)),
        Some(NumberOrText::Text(t)) => t.trim().parse().map(Some).map_err(|_| {
            serde::de::Error::custom(format!("expires_in {t:?} is not a number of seconds"))
        }),
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
            Err(e) if e.is_data() => Grant::Failed(format!(
                "HTTP {status} with a JSON body mailroom cannot use: {}",
                scrub(&e.to_string(), form)
            )),
            Err(_) => Grant::Failed(format!(
                "HTTP {status} without an access_token in a JSON body"
            )),
        };
    }
    if let Ok(e) = serde_json::from_slice::<ErrorBody>(body) {
        let description = e.error_description.unwrap_or_default();
        let first_line = description.lines().next().unwrap_or_default();
        return Grant::Refused {
            error: scrub(&e.error, form).chars().take(100).collect(),
            description: scrub(first_line, form).chars().take(300).collect(),
        };
    }
    let excerpt: String = scrub(&String::from_utf8_lossy(body), form)
        .chars()
        .take(200)
        .collect();
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
    let mut secret = current.cloned().unwrap_or_default();
    let data = secret.data.get_or_insert_with(BTreeMap::new);
    if let Some(string_data) = secret.string_data.take() {
        for (k, v) in string_data {
            data.insert(k, ByteString(v.into_bytes()));
        }
    }
    let mut put = |k: &str, v: &str| {
        data.insert(k.to_string(), ByteString(v.as_bytes().to_vec()));
    };
    put(ACCESS_TOKEN, grant.access_token.expose_secret());
    if let Some(r) = &grant.refresh_token {
        put(REFRESH_TOKEN, r.expose_secret());
    }
    let ttl = grant.expires_in.unwrap_or(3600);
    let expires = now
        .checked_add(SignedDuration::from_secs(ttl.min(365 * 86400) as i64))
        .unwrap_or(now);
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
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(tls))
}

/// A grant not yet stored in its Secret.
#[derive(Clone)]
struct Unsaved {
    /// The tokens the Secret holds, which the grant replaces.
    replaced: TokenSet,
    grant: TokenResponse,
    granted_at: Timestamp,
    /// Why it is not stored (the last write's error), for the provider's status.
    why: String,
    /// Whether the grant replaced the Secret's refresh token (a rotating endpoint): only
    /// then is something lost, and said, if it is never stored. A grant that did not is
    /// kept all the same, so that tests use it rather than ask for another.
    rotated: bool,
}

/// Token Secret (namespace, name) to what is kept for it.
type BySecret<T> = Arc<Mutex<HashMap<(String, String), T>>>;

fn key(namespace: &str, name: &str) -> (String, String) {
    (namespace.to_string(), name.to_string())
}

/// Keeps a grant not stored yet. A grant already kept for the Secret was made from it,
/// so the Secret still holds what that one replaced.
fn keep(
    unsaved: &BySecret<Unsaved>,
    at: (String, String),
    replaced: TokenSet,
    grant: TokenResponse,
    why: String,
) {
    let mut unsaved = unsaved.lock().unwrap();
    let earlier = unsaved.get(&at);
    let rotated = rotates(&replaced, &grant) || earlier.is_some_and(|k| k.rotated);
    let replaced = earlier.map_or(replaced, |k| k.replaced.clone());
    unsaved.insert(
        at,
        Unsaved {
            replaced,
            grant,
            granted_at: Timestamp::now(),
            why,
            rotated,
        },
    );
}

/// Whether `grant` replaces the refresh token of `held` with another one.
fn rotates(held: &TokenSet, grant: &TokenResponse) -> bool {
    grant.refresh_token.as_ref().is_some_and(|new| {
        held.refresh_token
            .as_ref()
            .is_none_or(|old| old.expose_secret() != new.expose_secret())
    })
}

/// What became of the grant kept for a token Secret.
enum Kept {
    /// None is kept (any more): the Secret as read.
    None(Option<Secret>),
    /// Stored now: the Secret as written.
    Stored(Secret),
    /// Still not stored: the Secret as it should be, and why the write failed.
    Unstored(Secret, kube::Error),
}

/// Held while one token Secret is refreshed.
type SecretLock = Arc<tokio::sync::Mutex<()>>;

/// Keeps access tokens fresh for the controller: refreshes ahead of expiry, writes rotated
/// refresh tokens back at once with optimistic concurrency, and never refreshes one
/// token Secret twice at once (a per-Secret async mutex; across replicas, the
/// resourceVersion check). It never creates a Secret: `mailroom authorize` does, as the
/// user, so the controller needs no right to create Secrets.
pub struct TokenManager {
    client: Client,
    tls: Arc<rustls::ClientConfig>,
    locks: Mutex<HashMap<(String, String), SecretLock>>,
    /// The token Secrets it rewrote, for the controller to tell from changes.
    own: Arc<OwnWrites>,
    /// Tokens granted from a refresh token but not stored (yet), by token Secret: kept and
    /// used until a write succeeds, since a token endpoint that rotates refresh tokens no
    /// longer takes the one the Secret still holds. A grant is kept here the moment it
    /// arrives, and forgotten once written.
    unsaved: BySecret<Unsaved>,
    /// App-only (ClientCredentials) tokens whose token Secret is missing or not marked as
    /// mailroom's: such a grant replaces nothing, so memory is enough.
    app: BySecret<(String, Secret)>,
    /// Token requests in flight, each in a task of its own (see [`Self::exchange`]).
    exchanges: tokio_util::task::TaskTracker,
    /// Tokens obtained from the token endpoint since [`Self::take_refreshes`] last ran.
    refreshes: std::sync::atomic::AtomicU64,
}

impl TokenManager {
    /// How many tokens the endpoint granted since the last call (for the metrics).
    pub fn take_refreshes(&self) -> u64 {
        self.refreshes.swap(0, std::sync::atomic::Ordering::Relaxed)
    }

    pub fn new(client: Client) -> anyhow::Result<TokenManager> {
        Ok(TokenManager {
            client,
            tls: token_tls()?,
            locks: Mutex::new(HashMap::new()),
            own: Arc::default(),
            unsaved: Arc::default(),
            app: Arc::default(),
            exchanges: tokio_util::task::TaskTracker::new(),
            refreshes: Default::default(),
        })
    }

    /// The ledger of the token Secrets this manager rewrote.
    pub fn own_writes(&self) -> Arc<OwnWrites> {
        self.own.clone()
    }

    fn lock(&self, namespace: &str, name: &str) -> SecretLock {
        let mut locks = self.locks.lock().unwrap();
        locks.retain(|_, l| Arc::strong_count(l) > 1);
        locks.entry(key(namespace, name)).or_default().clone()
    }

    /// Makes sure `fetched` carries a fresh access token for `provider` (refreshing and
    /// writing the token Secret back if needed), or the reason there is none.
    pub async fn prepare(&self, provider: &IncomingMailProvider, fetched: Fetched) -> Fetched {
        self.prepare_ahead(provider, fetched, REFRESH_AHEAD).await
    }

    /// As [`Self::prepare`], for one test run by a person (`mailroom check`): a token that
    /// is still valid is used rather than refreshed ahead of time, and a refresh token is
    /// redeemed only if the caller may store what replaces it (asked as a dry run), since
    /// a token endpoint that rotates refresh tokens retires the Secret's at once.
    pub async fn prepare_once(&self, provider: &IncomingMailProvider, fetched: Fetched) -> Fetched {
        let Some(o) = oauth2_of(provider) else {
            return fetched;
        };
        let name = &o.token_secret_ref.name;
        let Some(secret) = fetched.secrets.get(name) else {
            return self.prepare_ahead(provider, fetched, Duration::ZERO).await;
        };
        let tokens = TokenSet::from_secret(secret);
        if o.flow == OAuth2Flow::ClientCredentials
            || tokens.access_valid(Timestamp::now())
            || tokens.refresh_token.is_none()
        {
            return self.prepare_ahead(provider, fetched, Duration::ZERO).await;
        }
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &fetched.namespace);
        let dry_run = PostParams {
            dry_run: true,
            ..Default::default()
        };
        if let Err(kube::Error::Api(status)) = api.replace(name, &dry_run, secret).await
            && matches!(status.code, 401 | 403)
        {
            let mut fetched = fetched;
            fetched.token_problem = Some((
                Reason::TokenRefreshFailed,
                format!(
                    "the access token in Secret {name:?} has expired, and refreshing it would retire the Secret's refresh token, but you may not store the new one there ({}); the controller refreshes it at its next test: `mailroom retest {} -n {}` asks for one now",
                    status.message,
                    provider.name_any(),
                    fetched.namespace
                ),
            ));
            return fetched;
        }
        self.prepare_ahead(provider, fetched, Duration::ZERO).await
    }

    async fn prepare_ahead(
        &self,
        provider: &IncomingMailProvider,
        mut fetched: Fetched,
        ahead: Duration,
    ) -> Fetched {
        fetched.provider = provider.name_any();
        let spec = &provider.spec;
        let Some(o) = oauth2_of(provider) else {
            return fetched;
        };
        // Refused before any token is used, not only at the next refresh: an object
        // stored before the API server's rule says so at once.
        if let Err(message) = plaintext_endpoints(o, spec.authentication.allow_unencrypted) {
            fetched.token_problem = Some((Reason::InvalidSpec, message));
            return fetched;
        }
        let secret_name = o.token_secret_ref.name.clone();
        let namespace = fetched.namespace.clone();
        let at = key(&namespace, &secret_name);
        let in_memory = self.app_token(&at, o, spec.server.protocol);
        let cached = in_memory.as_ref().or(fetched.secrets.get(&secret_name));
        let tokens = cached.map(TokenSet::from_secret);
        if plan(o.flow, tokens.as_ref(), Timestamp::now(), ahead) == Plan::Use {
            if let Some(secret) = in_memory {
                fetched.secrets.insert(secret_name, secret);
            }
            return fetched;
        }
        let lock = self.lock(&namespace, &secret_name);
        let _guard = lock.lock().await;
        match self
            .refresh(provider, o, &namespace, &secret_name, &fetched, ahead)
            .await
        {
            Ok(secret) => {
                fetched.secrets.insert(secret_name, secret);
            }
            Err(problem) => fetched.token_problem = Some(problem),
        }
        if let Some(kept) = self.unsaved.lock().unwrap().get(&at).filter(|k| k.rotated) {
            fetched.token_warning = Some(format!(
                "the rotated OAuth2 tokens could not be stored in Secret {:?} ({}): until a write succeeds they live only in this controller's memory, and the refresh token the Secret holds may no longer be valid",
                at.1, kept.why
            ));
        }
        fetched
    }

    /// Forgets what it keeps (unsaved grants, app-only tokens, its own writes) for
    /// Secrets no provider references any more.
    pub fn retain(&self, mut keep: impl FnMut(&str, &str) -> bool) {
        self.unsaved
            .lock()
            .unwrap()
            .retain(|(ns, name), _| keep(ns, name));
        self.app
            .lock()
            .unwrap()
            .retain(|(ns, name), _| keep(ns, name));
        self.own.retain(keep);
    }

    /// The app-only token kept for a token Secret, if it was granted for these settings:
    /// providers that name one Secret but another client, tenant or scope do not share
    /// it, and an edited spec does not keep the old one.
    fn app_token(
        &self,
        at: &(String, String),
        o: &OAuth2Spec,
        protocol: crate::api::Protocol,
    ) -> Option<Secret> {
        if o.flow != OAuth2Flow::ClientCredentials {
            return None;
        }
        let app = self.app.lock().unwrap();
        let (granted_for, secret) = app.get(at)?;
        (*granted_for == app_settings(o, protocol)).then(|| secret.clone())
    }

    fn keep_app_token(
        &self,
        at: (String, String),
        o: &OAuth2Spec,
        protocol: crate::api::Protocol,
        secret: Secret,
    ) {
        let settings = app_settings(o, protocol);
        self.app.lock().unwrap().insert(at, (settings, secret));
    }

    fn forget_unsaved(&self, namespace: &str, name: &str) {
        self.unsaved.lock().unwrap().remove(&key(namespace, name));
    }

    /// The token Secret as a refresh should see it, and the tokens the Secret really
    /// holds: with the tokens of an earlier grant whose write-back failed, stored now if
    /// the API server takes them, else only in memory.
    async fn with_unsaved(
        &self,
        api: &Api<Secret>,
        namespace: &str,
        name: &str,
        current: Option<Secret>,
    ) -> (Option<Secret>, TokenSet) {
        let held = |s: Option<&Secret>| s.map(TokenSet::from_secret).unwrap_or_default();
        match self
            .store_unsaved(api, namespace, name, current.clone())
            .await
        {
            Kept::None(current) => {
                let h = held(current.as_ref());
                (current, h)
            }
            Kept::Stored(stored) => {
                let h = held(Some(&stored));
                (Some(stored), h)
            }
            Kept::Unstored(merged, e) => {
                tracing::warn!(secret = name, error = %e, "still cannot store the new tokens; using them from memory");
                self.note_unsaved(namespace, name, &e);
                (Some(merged), held(current.as_ref()))
            }
        }
    }

    /// Tries to store the grant kept for the Secret over `current`. A kept grant is
    /// dropped once the Secret holds other tokens than those it replaced (`mailroom
    /// authorize`, another replica), or is gone (`mailroom authorize --revoke`).
    async fn store_unsaved(
        &self,
        api: &Api<Secret>,
        namespace: &str,
        name: &str,
        current: Option<Secret>,
    ) -> Kept {
        let kept = self
            .unsaved
            .lock()
            .unwrap()
            .get(&key(namespace, name))
            .cloned();
        let Some(kept) = kept else {
            return Kept::None(current);
        };
        let Some(held) = &current else {
            self.forget_unsaved(namespace, name);
            return Kept::None(current);
        };
        if !TokenSet::from_secret(held).same_refresh_token(&kept.replaced) {
            self.forget_unsaved(namespace, name);
            return Kept::None(current);
        }
        let merged = updated_secret(Some(held), &kept.grant, kept.granted_at);
        match self.write_back(api, namespace, name, held, &merged).await {
            Ok(stored) => {
                self.forget_unsaved(namespace, name);
                tracing::info!(secret = name, "stored the tokens kept since a failed write");
                Kept::Stored(stored)
            }
            Err(e) => Kept::Unstored(merged, e),
        }
    }

    /// Tries once more, within `within` in all, to store every grant kept since a failed
    /// write, once the token requests in flight have answered: a stopping controller
    /// takes them with it, and a token endpoint that rotates refresh tokens no longer
    /// takes the one the Secret holds. Called once no test runs. Returns what is still
    /// not stored, one line per token Secret.
    pub async fn store_kept(&self, within: Duration) -> Vec<String> {
        let store = async {
            self.exchanges.close();
            self.exchanges.wait().await;
            // Open again for a replica that leads again after a lost Lease.
            self.exchanges.reopen();
            let keys: Vec<_> = self.unsaved.lock().unwrap().keys().cloned().collect();
            for (namespace, name) in &keys {
                let lock = self.lock(namespace, name);
                let _guard = lock.lock().await;
                let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
                let failed = match api.get_opt(name).await {
                    Ok(current) => match self.store_unsaved(&api, namespace, name, current).await {
                        Kept::Unstored(_, e) => Some(e),
                        Kept::None(_) | Kept::Stored(_) => None,
                    },
                    Err(e) => Some(e),
                };
                if let Some(error) = failed {
                    self.note_unsaved(namespace, name, &error);
                }
            }
        };
        if tokio::time::timeout(within, store).await.is_err() {
            tracing::warn!(
                "could not store the kept tokens within {:?} of stopping",
                within
            );
        }
        let unsaved = self.unsaved.lock().unwrap();
        let mut left: Vec<String> = unsaved
            .iter()
            .filter(|(_, kept)| kept.rotated)
            .map(|((namespace, name), kept)| {
                tracing::error!(
                    %namespace,
                    secret = %name,
                    why = %kept.why,
                    "stopping with OAuth2 tokens the API server did not store: if the token endpoint rotates refresh tokens, the Secret's is no longer valid; run `mailroom authorize` for the providers that use it"
                );
                format!(
                    "the rotated OAuth2 tokens could not be stored in Secret {namespace}/{name} ({}); if the token endpoint rotates refresh tokens, the one the Secret holds is no longer valid: run `mailroom authorize` for the providers that use it",
                    kept.why
                )
            })
            .collect();
        left.sort();
        left
    }

    /// Records why the grant kept for a Secret is still not stored.
    fn note_unsaved(&self, namespace: &str, name: &str, error: &kube::Error) {
        if let Some(kept) = self.unsaved.lock().unwrap().get_mut(&key(namespace, name)) {
            kept.why = write_error(error);
        }
    }

    /// Asks the token endpoint for a grant, in a task of its own: a grant that redeems a
    /// refresh token is kept (as not stored yet) the moment it arrives, so that a test
    /// cancelled meanwhile (a stopping controller, after its drain) loses no token that a
    /// rotating endpoint has already replaced; [`Self::store_kept`] waits for these tasks.
    async fn exchange(
        &self,
        url: String,
        form: Vec<(&'static str, SecretString)>,
        at: (String, String),
        held: TokenSet,
    ) -> Grant {
        let (tls, unsaved) = (self.tls.clone(), self.unsaved.clone());
        let task = self.exchanges.spawn(async move {
            let grant = match super::http::post_form(&tls, &url, &form, TOKEN_REQUEST_TIMEOUT).await
            {
                Ok((status, body)) => read_grant(status, &body, &form),
                Err(message) => Grant::Failed(message),
            };
            if let Grant::Tokens(t) = &grant
                && rotates(&held, t)
            {
                keep(&unsaved, at, held, t.clone(), "not written yet".into());
            }
            grant
        });
        task.await
            .unwrap_or_else(|e| Grant::Failed(format!("the token request stopped: {e}")))
    }

    /// Writes `updated` over `current`, marked as our own write.
    async fn write_back(
        &self,
        api: &Api<Secret>,
        namespace: &str,
        name: &str,
        current: &Secret,
        updated: &Secret,
    ) -> Result<Secret, kube::Error> {
        let pending = self.own.begin(namespace, name, current.resource_version());
        let written = api.replace(name, &PostParams::default(), updated).await;
        if let Ok(secret) = &written
            && let Some(after) = secret.resource_version()
        {
            pending.done(after);
        }
        written
    }

    /// Writes a grant back over `current` (see [`Self::write_back`]) and returns the
    /// Secret the test uses: stored, adopted from a newer write, or kept in memory.
    /// `held` is the tokens `current` holds in the API server (not those of a grant kept
    /// in memory): another writer is told by a change from them.
    #[allow(clippy::too_many_arguments)]
    async fn store_grant(
        &self,
        api: &Api<Secret>,
        namespace: &str,
        secret_name: &str,
        current: &Secret,
        held: &TokenSet,
        response: &TokenResponse,
        what: &str,
    ) -> Secret {
        let updated = updated_secret(Some(current), response, Timestamp::now());
        let error = match self
            .write_back(api, namespace, secret_name, current, &updated)
            .await
        {
            Ok(secret) => {
                self.forget_unsaved(namespace, secret_name);
                tracing::info!(
                    secret = secret_name,
                    grant = what,
                    "stored a new access token"
                );
                return secret;
            }
            Err(kube::Error::Api(status)) if status.code == 409 => {
                // Changed meanwhile. If the refresh token is no longer the one held, the
                // newer one is kept and ours is used for this test only; if it is, ours
                // is written over it.
                match api.get_opt(secret_name).await {
                    Ok(Some(again)) if TokenSet::from_secret(&again).same_refresh_token(held) => {
                        let retry = updated_secret(Some(&again), response, Timestamp::now());
                        match self
                            .write_back(api, namespace, secret_name, &again, &retry)
                            .await
                        {
                            Ok(secret) => {
                                self.forget_unsaved(namespace, secret_name);
                                return secret;
                            }
                            // Never a second round: it would redeem the refresh token this
                            // grant just replaced.
                            Err(e) => e,
                        }
                    }
                    // Rotated by another writer, or deleted (`authorize --revoke`).
                    Ok(_) => {
                        self.forget_unsaved(namespace, secret_name);
                        let mut local = updated;
                        local.metadata.resource_version = None;
                        return local;
                    }
                    // Not known: kept, as after any failed write.
                    Err(e) => e,
                }
            }
            Err(e) => e,
        };
        tracing::warn!(secret = secret_name, %error, "could not store the new tokens; keeping them in memory");
        keep(
            &self.unsaved,
            key(namespace, secret_name),
            held.clone(),
            response.clone(),
            write_error(&error),
        );
        updated
    }

    async fn refresh(
        &self,
        provider: &IncomingMailProvider,
        o: &OAuth2Spec,
        namespace: &str,
        secret_name: &str,
        fetched: &Fetched,
        ahead: Duration,
    ) -> Result<Secret, (Reason, String)> {
        let name = provider.name_any();
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let command = authorize_command(&name, namespace, o.flow);
        let app_only = o.flow == OAuth2Flow::ClientCredentials;
        let Some(token_url) = endpoints(o).token else {
            return Err((
                Reason::InvalidSpec,
                "spec.authentication.oauth2.tokenURL is required for provider Generic".into(),
            ));
        };
        let client_secret = match &o.client_secret_ref {
            Some(r) => {
                let field = "spec.authentication.oauth2.clientSecretRef";
                let secret = fetched.secrets.get(&r.name).ok_or_else(|| {
                    let e = CredentialError::NotFound {
                        kind: ObjectKind::Secret,
                        name: r.name.clone(),
                        namespace: namespace.to_string(),
                        field,
                    };
                    (e.reason(), e.to_string())
                })?;
                Some(SecretString::from(
                    secret_text(secret, &r.name, &r.key, field)
                        .map_err(|e| (e.reason(), e.to_string()))?,
                ))
            }
            None => None,
        };
        // A few rounds: each re-reads the Secret, so a refresh done meanwhile by another
        // replica or by `mailroom authorize` is seen and not repeated.
        for _ in 0..5 {
            let current = api.get_opt(secret_name).await.map_err(|e| {
                (
                    Reason::TokenRefreshFailed,
                    format!("reading Secret {namespace}/{secret_name}: {e}"),
                )
            })?;
            let (current, held) = self
                .with_unsaved(&api, namespace, secret_name, current)
                .await;
            // App-only tokens replace nothing: kept in memory when the Secret is not
            // there to hold them, or not mailroom's to write.
            let ours = current.as_ref().is_some_and(is_token_secret);
            let in_memory = app_only && !ours;
            // What the test would use: the Secret, or the app-only token in memory.
            let protocol = provider.spec.server.protocol;
            let source = if in_memory {
                self.app_token(&key(namespace, secret_name), o, protocol)
            } else {
                current.clone()
            };
            let tokens = source.as_ref().map(TokenSet::from_secret);
            let now = Timestamp::now();
            let step = plan(o.flow, tokens.as_ref(), now, ahead);
            match step {
                Plan::Use => {
                    return Ok(source.expect("a usable token comes from a Secret or memory"));
                }
                Plan::Required => {
                    return Err((
                        Reason::AuthorizationRequired,
                        match &current {
                            None => format!(
                                "no OAuth2 tokens yet: Secret {secret_name:?} does not exist; run `{command}`"
                            ),
                            Some(_) => format!(
                                "Secret {secret_name:?} holds no refresh token and no valid access token; run `{command}`"
                            ),
                        },
                    ));
                }
                Plan::Refresh | Plan::ClientCredentials => {}
            }
            if !app_only && !ours {
                // As when the token endpoint fails: the access token serves while valid.
                let message = unmarked(namespace, secret_name, &command);
                if tokens.as_ref().is_some_and(|t| t.access_valid(now)) {
                    tracing::warn!(%message, "not refreshing");
                    return Ok(current.expect("a refresh token comes from a Secret"));
                }
                return Err((Reason::AuthorizationRequired, message));
            }
            let used = tokens.clone().unwrap_or_default();
            let form = token_form(
                o,
                provider.spec.server.protocol,
                step,
                used.refresh_token.as_ref(),
                client_secret.as_ref(),
            );
            let what = if step == Plan::ClientCredentials {
                "client credentials grant"
            } else {
                "refresh of the access token"
            };
            let grant = self
                .exchange(
                    token_url.clone(),
                    form,
                    key(namespace, secret_name),
                    held.clone(),
                )
                .await;
            let response = match grant {
                Grant::Tokens(t) => {
                    self.refreshes
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    t
                }
                Grant::Refused { error, description } if error == "invalid_grant" => {
                    // Another replica (or `mailroom authorize`) may have rotated the token
                    // meanwhile and be about to write it: look again for a moment.
                    let mut rotated = false;
                    for _ in 0..4 {
                        let again = api.get_opt(secret_name).await.ok().flatten();
                        if let Some(again) = &again
                            && !TokenSet::from_secret(again).same_refresh_token(&held)
                        {
                            rotated = true;
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    if rotated {
                        continue;
                    }
                    tracing::warn!(secret = secret_name, %error, %description, "token endpoint refused the grant");
                    return Err((
                        Reason::AuthorizationRevoked,
                        format!(
                            "the token endpoint {token_url} refused the {what}: {error}: {description}; run `{command}` again"
                        ),
                    ));
                }
                Grant::Refused { error, description } => {
                    let message = format!(
                        "the token endpoint {token_url} refused the {what}: {error}: {description}"
                    );
                    return still_valid(source, &used, now, message);
                }
                Grant::Failed(message) => {
                    return still_valid(source, &used, now, format!("{what} failed: {message}"));
                }
            };
            let secret = match current.filter(|_| ours) {
                Some(current) => {
                    self.store_grant(
                        &api,
                        namespace,
                        secret_name,
                        &current,
                        &held,
                        &response,
                        what,
                    )
                    .await
                }
                None => updated_secret(None, &response, now),
            };
            if app_only {
                // Stored or not, the token serves from memory while fresh: a Secret the
                // controller may not write must not cost a token request per test.
                self.forget_unsaved(namespace, secret_name);
                self.keep_app_token(key(namespace, secret_name), o, protocol, secret.clone());
            }
            return Ok(secret);
        }
        Err((
            Reason::TokenRefreshFailed,
            format!("Secret {namespace}/{secret_name} kept changing while its token was refreshed"),
        ))
    }
}

/// What an app-only token was granted for: token endpoint, client and scopes.
fn app_settings(o: &OAuth2Spec, protocol: crate::api::Protocol) -> String {
    format!(
        "{}\n{}\n{}",
        endpoints(o).token.unwrap_or_default(),
        o.client_id,
        scopes(o, protocol).join(" ")
    )
}

/// The provider's OAuth2 settings, if it logs in with OAuth2.
fn oauth2_of(provider: &IncomingMailProvider) -> Option<&OAuth2Spec> {
    let auth = &provider.spec.authentication;
    auth.oauth2
        .as_ref()
        .filter(|_| auth.method == AuthMethod::OAuth2)
}

/// A failed write, as status may quote it: the API server's message, or the error.
fn write_error(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => status.message.clone(),
        other => other.to_string(),
    }
}

/// A refresh that failed for want of an answer: the cached access token serves while it
/// is valid (the failure is logged); after that the provider is TokenRefreshFailed.
fn still_valid(
    current: Option<Secret>,
    used: &TokenSet,
    now: Timestamp,
    message: String,
) -> Result<Secret, (Reason, String)> {
    tracing::warn!(%message, "token refresh failed");
    match current {
        Some(secret) if used.access_valid(now) => Ok(secret),
        _ => Err((
            Reason::TokenRefreshFailed,
            format!("{message}; no valid access token is left"),
        )),
    }
}

#[cfg(test)]
mod tests;
