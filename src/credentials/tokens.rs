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
        self.access_token.is_some()
            && self
                .expires_at
                .is_none_or(|e| remaining(e, now) > Duration::from_secs(10))
    }

    /// Whether the access token can be used without refreshing.
    pub fn access_fresh(&self, now: Timestamp) -> bool {
        self.access_token.is_some()
            && self
                .expires_at
                .is_some_and(|e| remaining(e, now) > REFRESH_AHEAD)
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

/// The pure decision before a test.
pub fn plan(flow: OAuth2Flow, tokens: Option<&TokenSet>, now: Timestamp) -> Plan {
    if tokens.is_some_and(|t| t.access_fresh(now)) {
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
    #[serde(default)]
    pub expires_in: Option<u64>,
    #[serde(default)]
    pub scope: Option<String>,
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

/// Reads a token endpoint's answer.
pub fn read_grant(status: u16, body: &[u8]) -> Grant {
    if (200..300).contains(&status) {
        return match serde_json::from_slice::<TokenResponse>(body) {
            Ok(t) => Grant::Tokens(t),
            Err(_) => Grant::Failed(format!(
                "HTTP {status} without an access_token in a JSON body"
            )),
        };
    }
    if let Ok(e) = serde_json::from_slice::<ErrorBody>(body) {
        return Grant::Refused {
            error: e.error.chars().take(100).collect(),
            description: e
                .error_description
                .unwrap_or_default()
                .lines()
                .next()
                .unwrap_or_default()
                .chars()
                .take(300)
                .collect(),
        };
    }
    let excerpt: String = String::from_utf8_lossy(body).chars().take(200).collect();
    Grant::Failed(format!("HTTP {status}: {:?}", excerpt.trim()))
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

/// A grant between the token endpoint's answer and its write-back. Dropped before it is
/// settled (its test cancelled, as a stopping controller does after its drain), the grant
/// is kept as unsaved, for [`TokenManager::store_kept`]: a token endpoint that rotates
/// refresh tokens has already retired the one the Secret holds. Had the write landed,
/// the Secret holds other tokens than those the grant replaced, and it is dropped then.
struct Unsettled<'a> {
    manager: &'a TokenManager,
    namespace: &'a str,
    name: &'a str,
    replaced: &'a TokenSet,
    grant: &'a TokenResponse,
    armed: bool,
}

impl<'a> Unsettled<'a> {
    fn arm(
        manager: &'a TokenManager,
        namespace: &'a str,
        name: &'a str,
        replaced: &'a TokenSet,
        grant: &'a TokenResponse,
    ) -> Self {
        Unsettled {
            manager,
            namespace,
            name,
            replaced,
            grant,
            armed: true,
        }
    }

    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Unsettled<'_> {
    fn drop(&mut self) {
        if self.armed {
            tracing::warn!(secret = %self.name, "stopped before the new tokens were stored; keeping them to store before exit");
            self.manager.keep(
                self.namespace,
                self.name,
                self.replaced.clone(),
                self.grant.clone(),
            );
        }
    }
}

/// Held while one token Secret is refreshed.
type SecretLock = Arc<tokio::sync::Mutex<()>>;

/// Keeps access tokens fresh for the controller: refreshes ahead of expiry, writes rotated
/// refresh tokens back at once with optimistic concurrency, and never refreshes one
/// token Secret twice at once (a per-Secret async mutex; across replicas, the
/// resourceVersion check).
pub struct TokenManager {
    client: Client,
    tls: Arc<rustls::ClientConfig>,
    locks: Mutex<HashMap<(String, String), SecretLock>>,
    /// The token Secrets it rewrote, for the controller to tell from changes.
    own: Arc<OwnWrites>,
    /// Tokens granted whose write-back failed, by token Secret (namespace, name): kept
    /// and used until a write succeeds, since a token endpoint that rotates refresh
    /// tokens no longer takes the one the Secret still holds.
    unsaved: Mutex<HashMap<(String, String), Unsaved>>,
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
            unsaved: Mutex::default(),
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
        locks
            .entry((namespace.to_string(), name.to_string()))
            .or_default()
            .clone()
    }

    /// Makes sure `fetched` carries a fresh access token for `provider` (refreshing and
    /// writing the token Secret back if needed), or the reason there is none.
    pub async fn prepare(&self, provider: &IncomingMailProvider, mut fetched: Fetched) -> Fetched {
        fetched.provider = provider.name_any();
        let spec = &provider.spec;
        if spec.authentication.method != AuthMethod::OAuth2 {
            return fetched;
        }
        let Some(o) = &spec.authentication.oauth2 else {
            return fetched;
        };
        // Refused before any token is used, not only at the next refresh: an object
        // stored before the API server's rule says so at once.
        if let Err(message) = plaintext_endpoints(o, spec.authentication.allow_unencrypted) {
            fetched.token_problem = Some((Reason::InvalidSpec, message));
            return fetched;
        }
        let secret_name = o.token_secret_ref.name.clone();
        let cached = fetched.secrets.get(&secret_name).map(TokenSet::from_secret);
        if plan(o.flow, cached.as_ref(), Timestamp::now()) == Plan::Use {
            return fetched;
        }
        let namespace = fetched.namespace.clone();
        let lock = self.lock(&namespace, &secret_name);
        let _guard = lock.lock().await;
        match self
            .refresh(provider, o, &namespace, &secret_name, &fetched)
            .await
        {
            Ok(secret) => {
                fetched.secrets.insert(secret_name, secret);
            }
            Err(problem) => fetched.token_problem = Some(problem),
        }
        fetched
    }

    /// Forgets what it keeps (unsaved grants, its own writes) for Secrets no provider
    /// references any more.
    pub fn retain(&self, mut keep: impl FnMut(&str, &str) -> bool) {
        self.unsaved
            .lock()
            .unwrap()
            .retain(|(ns, name), _| keep(ns, name));
        self.own.retain(keep);
    }

    fn forget_unsaved(&self, namespace: &str, name: &str) {
        let key = (namespace.to_string(), name.to_string());
        self.unsaved.lock().unwrap().remove(&key);
    }

    /// The token Secret as a refresh should see it: with the tokens of an earlier grant
    /// whose write-back failed, stored now if the API server takes them, else only in
    /// memory.
    async fn with_unsaved(
        &self,
        api: &Api<Secret>,
        namespace: &str,
        name: &str,
        current: Option<Secret>,
    ) -> Option<Secret> {
        match self.store_unsaved(api, namespace, name, current).await {
            Kept::None(current) => current,
            Kept::Stored(stored) => Some(stored),
            Kept::Unstored(merged, e) => {
                tracing::warn!(secret = name, error = %e, "still cannot store the new tokens; using them from memory");
                Some(merged)
            }
        }
    }

    /// Tries to store the grant kept for the Secret over `current`. A kept grant is
    /// dropped once the Secret holds other tokens than those it replaced (`mailroom
    /// authorize`, another replica).
    async fn store_unsaved(
        &self,
        api: &Api<Secret>,
        namespace: &str,
        name: &str,
        current: Option<Secret>,
    ) -> Kept {
        let key = (namespace.to_string(), name.to_string());
        let kept = self.unsaved.lock().unwrap().get(&key).cloned();
        let Some(kept) = kept else {
            return Kept::None(current);
        };
        let held = current
            .as_ref()
            .map(TokenSet::from_secret)
            .unwrap_or_default();
        if !held.same_refresh_token(&kept.replaced) {
            self.forget_unsaved(namespace, name);
            return Kept::None(current);
        }
        let merged = updated_secret(current.as_ref(), &kept.grant, kept.granted_at);
        match self
            .write_back(api, namespace, name, current.as_ref(), &merged)
            .await
        {
            Ok(stored) => {
                self.forget_unsaved(namespace, name);
                tracing::info!(secret = name, "stored the tokens kept since a failed write");
                Kept::Stored(stored)
            }
            Err(e) => Kept::Unstored(merged, e),
        }
    }

    /// Tries once more, within `within` in all, to store every grant kept since a failed
    /// write: a stopping controller takes them with it, and a token endpoint that rotates
    /// refresh tokens no longer takes the one the Secret holds. Called once no test runs.
    pub async fn store_kept(&self, within: Duration) {
        let keys: Vec<_> = self.unsaved.lock().unwrap().keys().cloned().collect();
        if keys.is_empty() {
            return;
        }
        let store = async {
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
                    tracing::warn!(%namespace, secret = %name, %error, "could not store the new tokens before stopping");
                }
            }
        };
        if tokio::time::timeout(within, store).await.is_err() {
            tracing::warn!(
                "could not store the kept tokens within {:?} of stopping",
                within
            );
        }
        for (namespace, name) in self.unsaved.lock().unwrap().keys() {
            tracing::error!(
                %namespace,
                secret = %name,
                "stopping with OAuth2 tokens the API server did not store: if the token endpoint rotates refresh tokens, the Secret's is no longer valid; run `mailroom authorize` for the providers that use it"
            );
        }
    }

    /// Keeps a grant whose write-back failed with `error`. A grant already kept for the
    /// Secret was made from it, so the Secret still holds what that one replaced.
    fn keep_unsaved(
        &self,
        namespace: &str,
        name: &str,
        replaced: TokenSet,
        grant: TokenResponse,
        error: &kube::Error,
    ) {
        tracing::warn!(secret = name, %error, "could not store the new tokens; keeping them in memory");
        self.keep(namespace, name, replaced, grant);
    }

    /// Keeps a grant not stored yet (see [`Self::keep_unsaved`]).
    fn keep(&self, namespace: &str, name: &str, replaced: TokenSet, grant: TokenResponse) {
        let key = (namespace.to_string(), name.to_string());
        let mut unsaved = self.unsaved.lock().unwrap();
        let replaced = unsaved.get(&key).map_or(replaced, |k| k.replaced.clone());
        unsaved.insert(
            key,
            Unsaved {
                replaced,
                grant,
                granted_at: Timestamp::now(),
            },
        );
    }

    /// Writes `updated` over `current` (or creates it), marked as our own write.
    async fn write_back(
        &self,
        api: &Api<Secret>,
        namespace: &str,
        name: &str,
        current: Option<&Secret>,
        updated: &Secret,
    ) -> Result<Secret, kube::Error> {
        let pending = self
            .own
            .begin(namespace, name, current.and_then(|s| s.resource_version()));
        let written = match current {
            Some(_) => api.replace(name, &PostParams::default(), updated).await,
            None => {
                let mut fresh = updated.clone();
                fresh.metadata.name = Some(name.to_string());
                fresh.metadata.namespace = Some(namespace.to_string());
                api.create(&PostParams::default(), &fresh).await
            }
        };
        if let Ok(secret) = &written
            && let Some(after) = secret.resource_version()
        {
            pending.done(after);
        }
        written
    }

    /// Writes a grant back over `current` (see [`Self::write_back`]) and returns the
    /// Secret the test uses: stored, adopted from a newer write, or kept in memory.
    #[allow(clippy::too_many_arguments)]
    async fn store_grant(
        &self,
        api: &Api<Secret>,
        namespace: &str,
        secret_name: &str,
        current: Option<Secret>,
        used: &TokenSet,
        response: &TokenResponse,
        what: &str,
    ) -> Secret {
        let updated = updated_secret(current.as_ref(), response, Timestamp::now());
        match self
            .write_back(api, namespace, secret_name, current.as_ref(), &updated)
            .await
        {
            Ok(secret) => {
                tracing::info!(
                    secret = secret_name,
                    grant = what,
                    "stored a new access token"
                );
                secret
            }
            Err(kube::Error::Api(status)) if status.code == 409 => {
                // Changed (or created) meanwhile. If the refresh token is no longer
                // the one used, the newer one is kept and ours is used for this test
                // only; if it is, ours is written over it.
                let again = api.get_opt(secret_name).await.ok().flatten();
                if let Some(again) = &again
                    && !TokenSet::from_secret(again).same_refresh_token(used)
                {
                    self.forget_unsaved(namespace, secret_name);
                    let mut local = again.clone();
                    let data = local.data.get_or_insert_with(BTreeMap::new);
                    data.insert(
                        ACCESS_TOKEN.into(),
                        ByteString(response.access_token.expose_secret().as_bytes().to_vec()),
                    );
                    return local;
                }
                let retry = updated_secret(again.as_ref(), response, Timestamp::now());
                match self
                    .write_back(api, namespace, secret_name, again.as_ref(), &retry)
                    .await
                {
                    Ok(secret) => secret,
                    Err(e) => {
                        // Never a second round: it would redeem the refresh token
                        // this grant just replaced.
                        self.keep_unsaved(
                            namespace,
                            secret_name,
                            used.clone(),
                            response.clone(),
                            &e,
                        );
                        retry
                    }
                }
            }
            Err(e) => {
                self.keep_unsaved(namespace, secret_name, used.clone(), response.clone(), &e);
                updated
            }
        }
    }

    async fn refresh(
        &self,
        provider: &IncomingMailProvider,
        o: &OAuth2Spec,
        namespace: &str,
        secret_name: &str,
        fetched: &Fetched,
    ) -> Result<Secret, (Reason, String)> {
        let name = provider.name_any();
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let command = authorize_command(&name, namespace, o.flow);
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
            let current = self
                .with_unsaved(&api, namespace, secret_name, current)
                .await;
            let tokens = current.as_ref().map(TokenSet::from_secret);
            let now = Timestamp::now();
            let step = plan(o.flow, tokens.as_ref(), now);
            match step {
                Plan::Use => {
                    return Ok(current.expect("a usable token comes from a Secret"));
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
            if let Some(secret) = &current
                && !is_token_secret(secret)
            {
                // As when the token endpoint fails: the access token serves while valid.
                let message = unmarked(namespace, secret_name, &command);
                if tokens.as_ref().is_some_and(|t| t.access_valid(now)) {
                    tracing::warn!(%message, "not refreshing");
                    return Ok(current.expect("checked above"));
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
            let grant =
                match super::http::post_form(&self.tls, &token_url, &form, TOKEN_REQUEST_TIMEOUT)
                    .await
                {
                    Ok((status, body)) => read_grant(status, &body),
                    Err(message) => Grant::Failed(message),
                };
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
                            && !TokenSet::from_secret(again).same_refresh_token(&used)
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
                    return still_valid(current, &used, now, message);
                }
                Grant::Failed(message) => {
                    return still_valid(current, &used, now, format!("{what} failed: {message}"));
                }
            };
            // From here the grant exists only in this future: should the test be
            // cancelled (a stopping controller), it is kept to be stored before exit.
            let unsettled = Unsettled::arm(self, namespace, secret_name, &used, &response);
            let stored = self
                .store_grant(
                    &api,
                    namespace,
                    secret_name,
                    current,
                    &used,
                    &response,
                    what,
                )
                .await;
            unsettled.disarm();
            return Ok(stored);
        }
        Err((
            Reason::TokenRefreshFailed,
            format!("Secret {namespace}/{secret_name} kept changing while its token was refreshed"),
        ))
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
