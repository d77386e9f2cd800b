//! The token manager: keeps access tokens fresh for the controller (and for one test run
//! by `mailroom check`), refreshing ahead of expiry, writing rotated refresh tokens back
//! at once with optimistic concurrency, and keeping what it could not store.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use secrecy::{ExposeSecret, SecretString};

use super::holds::{Holds, Inputs};
use super::own_writes::OwnWrites;
use super::{
    Grant, OAuth2Spec, Plan, REFRESH_AHEAD, TOKEN_REQUEST_TIMEOUT, TokenResponse, TokenSet,
    authorize_command, is_token_secret, needs_sign_in, not_before, oauth2_of, plan,
    plan_after_rejection, read_grant, token_form, token_tls, token_tls_with, unmarked,
    updated_secret,
};
use crate::api::oauth2::{endpoints, plaintext_endpoints, scopes};
use crate::api::{IncomingMailProvider, OAuth2Flow, Reason};
use crate::credentials::proxy::Loopback;
use crate::credentials::{CredentialError, Fetched, ObjectKind, secret_text};

/// A grant not yet stored in its Secret.
#[derive(Clone)]
pub(super) struct Unsaved {
    /// The tokens the Secret holds, which the grant replaces.
    pub(super) replaced: TokenSet,
    pub(super) grant: TokenResponse,
    granted_at: Timestamp,
    /// Why it is not stored (the last write's error), for the provider's status.
    pub(super) why: String,
    /// Whether the grant replaced the Secret's refresh token (a rotating endpoint): only
    /// then is something lost, and said, if it is never stored. A grant that did not is
    /// kept all the same, so that tests use it rather than ask for another.
    rotated: bool,
}

/// Token Secret (namespace, name) to what is kept for it.
pub(super) type BySecret<T> = Arc<Mutex<HashMap<(String, String), T>>>;

pub(super) fn key(namespace: &str, name: &str) -> (String, String) {
    (namespace.to_string(), name.to_string())
}

/// Keeps a grant not stored yet. A grant already kept for the Secret was made from it,
/// so the Secret still holds what that one replaced.
pub(super) fn keep(
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
    // A grant that did not rotate the refresh token it redeemed keeps the earlier grant's:
    // that one, not the Secret's, is the token the endpoint still takes.
    let mut grant = grant;
    if grant.refresh_token.is_none() {
        grant.refresh_token = earlier.and_then(|k| k.grant.refresh_token.clone());
    }
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

/// The refusal of a token endpoint whose URL names this host itself (`localhost`, a
/// loopback or unspecified address, or one of its own), said before any request as a
/// spec to change; a name that resolves there is refused when the request connects.
fn own_host_endpoint(o: &OAuth2Spec) -> Option<String> {
    let url = endpoints(o).token?;
    let target = crate::credentials::http::parse_url(&url).ok()?;
    crate::credentials::proxy::names_this_host(&target).then(|| {
        format!(
            "spec.authentication.oauth2.tokenURL {url:?} names this pod's own address: {}",
            crate::credentials::proxy::LOOPBACK_REFUSED
        )
    })
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
    pub(super) unsaved: BySecret<Unsaved>,
    /// Whether token requests may go to this host's own loopback (see [`Loopback`]).
    loopback: Loopback,
    /// App-only (ClientCredentials) tokens whose token Secret is missing or not marked as
    /// mailroom's: such a grant replaces nothing, so memory is enough.
    app: BySecret<HashMap<String, Secret>>,
    /// Token requests in flight, each in a task of its own (see [`Self::exchange`]).
    exchanges: tokio_util::task::TaskTracker,
    /// The token endpoints' answers since [`Self::take_answers`] last ran, by result.
    answers: Mutex<HashMap<&'static str, u64>>,
    /// When not to call a token endpoint (it asked, or it failed a moment ago).
    holds: Holds,
    /// The access token the mail server last refused, by token Secret, and whether the
    /// next test refreshes rather than using it until it expires: yes for one taken from
    /// the cache, no for one granted for the test that was refused (a refresh per test
    /// would not cure a mailbox that refuses every token).
    rejected: BySecret<(SecretString, bool)>,
}

impl TokenManager {
    /// The token endpoints' answers since the last call, by result (`refreshed`,
    /// `failed`, `revoked`, `throttled`), for the metrics: counted as they come, so that a
    /// failed refresh shows while the old access token still serves, not only once the
    /// provider fails for want of one.
    pub fn take_answers(&self) -> Vec<(&'static str, u64)> {
        self.answers.lock().unwrap().drain().collect()
    }

    fn answered(&self, result: &'static str) {
        *self.answers.lock().unwrap().entry(result).or_default() += 1;
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
            answers: Mutex::default(),
            holds: Holds::default(),
            rejected: Arc::default(),
            loopback: Loopback::Refused,
        })
    }

    /// Token requests may go to this host's own loopback (see [`Loopback`]): for a person
    /// running `mailroom check`, or a controller told so.
    pub fn allowing_loopback(mut self) -> TokenManager {
        self.loopback = Loopback::Allowed;
        self
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
        self.prepare_ahead(provider, fetched, REFRESH_AHEAD, false)
            .await
    }

    /// As [`Self::prepare`], for a test a person asked for (`mailroom retest`): a token
    /// endpoint that failed a moment ago is asked again (the person may have fixed what
    /// stood between), unless it asked to wait.
    pub async fn prepare_asked(
        &self,
        provider: &IncomingMailProvider,
        fetched: Fetched,
    ) -> Fetched {
        self.prepare_ahead(provider, fetched, REFRESH_AHEAD, true)
            .await
    }

    /// As [`Self::prepare`], for one test run by a person (`mailroom check`): a token that
    /// is still valid is used rather than refreshed ahead of time, and a refresh token is
    /// redeemed only if the caller may store what replaces it (asked as a dry run), since
    /// a token endpoint that rotates refresh tokens retires the Secret's at once.
    pub async fn prepare_once(
        &self,
        provider: &IncomingMailProvider,
        mut fetched: Fetched,
    ) -> Fetched {
        if let Some(refusal) = self.may_not_store(provider, &fetched).await {
            fetched.token_problem = Some((Reason::TokenRefreshFailed, refusal));
            return fetched;
        }
        self.prepare_ahead(provider, fetched, Duration::ZERO, true)
            .await
    }

    /// Why a refresh for one test must not happen, if it must not: it would redeem the
    /// token Secret's refresh token, and the caller may not update that Secret.
    async fn may_not_store(
        &self,
        provider: &IncomingMailProvider,
        fetched: &Fetched,
    ) -> Option<String> {
        let o = oauth2_of(provider)?;
        let name = &o.token_secret_ref.name;
        let secret = fetched.secrets.get(name)?;
        let tokens = TokenSet::from_secret(secret);
        if o.flow == OAuth2Flow::ClientCredentials
            || tokens.access_valid(Timestamp::now())
            || tokens.refresh_token.is_none()
        {
            return None;
        }
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &fetched.namespace);
        let dry_run = PostParams {
            dry_run: true,
            ..Default::default()
        };
        match api.replace(name, &dry_run, secret).await {
            Err(kube::Error::Api(status)) if matches!(status.code, 401 | 403) => Some(format!(
                "the access token in Secret {name:?} has expired, and refreshing it would retire the Secret's refresh token, but you may not store the new one there ({}); the controller refreshes it at its next test: `{} retest {} -n {}` asks for one now",
                status.message,
                crate::command_name(),
                provider.name_any(),
                fetched.namespace
            )),
            _ => None,
        }
    }

    async fn prepare_ahead(
        &self,
        provider: &IncomingMailProvider,
        mut fetched: Fetched,
        ahead: Duration,
        asked: bool,
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
        if self.loopback == Loopback::Refused
            && let Some(message) = own_host_endpoint(o)
        {
            fetched.token_problem = Some((Reason::InvalidSpec, message));
            return fetched;
        }
        // So is a CA bundle for the endpoints that cannot be used (missing, not PEM), at
        // the test after it breaks, not at the next refresh, perhaps an hour later.
        let tls = match self.tls_for(provider, &fetched) {
            Ok(tls) => tls,
            Err(problem) => {
                fetched.token_problem = Some(problem);
                return fetched;
            }
        };
        let secret_name = o.token_secret_ref.name.clone();
        let namespace = fetched.namespace.clone();
        let at = key(&namespace, &secret_name);
        let in_memory = self.app_token(&at, o, spec.server.protocol);
        let cached = in_memory.as_ref().or(fetched.secrets.get(&secret_name));
        let tokens = cached.map(TokenSet::from_secret);
        let prompted = self.is_rejected(&at, tokens.as_ref());
        if plan(o.flow, tokens.as_ref(), Timestamp::now(), ahead) == Plan::Use && !prompted {
            if let Some(secret) = in_memory {
                fetched.secrets.insert(secret_name, secret);
            }
            return fetched;
        }
        let lock = self.lock(&namespace, &secret_name);
        let _guard = lock.lock().await;
        let refreshed = self
            .refresh(provider, o, tls, &secret_name, &fetched, ahead, asked)
            .await;
        // One refresh per refusal: an endpoint that answers with the same access token,
        // or a token Secret shared with a provider the token works for, is not asked again
        // at every test.
        if prompted && let Some(mark) = self.rejected.lock().unwrap().get_mut(&at) {
            mark.1 = false;
        }
        match refreshed {
            Ok(secret) => {
                // Another access token than the cache held: new for this test.
                let now_held = TokenSet::from_secret(&secret);
                fn access(t: Option<&TokenSet>) -> Option<&str> {
                    t?.access_token.as_ref().map(|a| a.expose_secret())
                }
                fetched.token_granted = access(Some(&now_held)) != access(tokens.as_ref());
                // An app-only token kept in memory has no version: none to count.
                fetched.token_source = secret.resource_version().map(|v| (secret_name.clone(), v));
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
        let now = Timestamp::now();
        self.app.lock().unwrap().retain(|(ns, name), kept| {
            drop_expired(kept, now);
            !kept.is_empty() && keep(ns, name)
        });
        self.rejected
            .lock()
            .unwrap()
            .retain(|(ns, name), _| keep(ns, name));
        self.own.retain(keep);
    }

    /// The app-only token kept for a token Secret, if it was granted for these settings:
    /// providers that name one Secret but another client, tenant or scope do not share
    /// it, and an edited spec does not keep the old one.
    pub(super) fn app_token(
        &self,
        at: &(String, String),
        o: &OAuth2Spec,
        protocol: crate::api::Protocol,
    ) -> Option<Secret> {
        if o.flow != OAuth2Flow::ClientCredentials {
            return None;
        }
        let app = self.app.lock().unwrap();
        app.get(at)?.get(&app_settings(o, protocol)).cloned()
    }

    pub(super) fn keep_app_token(
        &self,
        at: (String, String),
        o: &OAuth2Spec,
        protocol: crate::api::Protocol,
        secret: Secret,
    ) {
        let settings = app_settings(o, protocol);
        let mut app = self.app.lock().unwrap();
        let kept = app.entry(at).or_default();
        drop_expired(kept, Timestamp::now());
        kept.insert(settings, secret);
    }

    /// Notes that the mail server refused the access token of `fetched`'s test. One taken
    /// from the cache is refreshed before the next test, so that a revoked grant shows
    /// at once and a repaired one recovers, not at its expiry; one granted for that test
    /// is not (a refresh per test would not cure the mail server's refusal).
    pub fn rejected(&self, provider: &IncomingMailProvider, fetched: &Fetched) {
        let Some(o) = oauth2_of(provider) else {
            return;
        };
        let name = &o.token_secret_ref.name;
        let Some(token) = fetched
            .secrets
            .get(name)
            .and_then(|s| TokenSet::from_secret(s).access_token)
        else {
            return;
        };
        let mut rejected = self.rejected.lock().unwrap();
        let at = key(&fetched.namespace, name);
        // Refused again: what was decided for this token stands.
        if rejected
            .get(&at)
            .is_some_and(|(t, _)| t.expose_secret() == token.expose_secret())
        {
            return;
        }
        let refresh = !fetched.token_granted;
        if refresh {
            tracing::info!(secret = %name, "the mail server refused the cached access token; refreshing it before the next test");
        }
        rejected.insert(at, (token, refresh));
    }

    /// Whether `tokens` hold an access token the mail server refused that is to be
    /// refreshed; a mark for another token (refreshed since) is forgotten.
    pub(super) fn is_rejected(&self, at: &(String, String), tokens: Option<&TokenSet>) -> bool {
        let mut rejected = self.rejected.lock().unwrap();
        let Some((refused, refresh)) = rejected.get(at) else {
            return false;
        };
        let held = tokens.and_then(|t| t.access_token.as_ref());
        if held.is_some_and(|h| h.expose_secret() == refused.expose_secret()) {
            return *refresh;
        }
        rejected.remove(at);
        false
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
        // Dropped when the Secret is no longer what the grant replaced: another refresh
        // token (a new sign-in, another replica), no longer mailroom's to write (its label
        // removed), or, for a grant that replaced no refresh token, another access token
        // (someone refreshed since, with the same refresh token: theirs is newer).
        let now_held = TokenSet::from_secret(held);
        fn access(t: &TokenSet) -> Option<&str> {
            t.access_token.as_ref().map(|a| a.expose_secret())
        }
        if !now_held.same_refresh_token(&kept.replaced)
            || !is_token_secret(held)
            || (!kept.rotated && access(&now_held) != access(&kept.replaced))
        {
            self.forget_unsaved(namespace, name);
            return Kept::None(current);
        }
        let merged = updated_secret(Some(held), &kept.grant, kept.granted_at);
        // Stored at last after a warning: not marked as our own write, so that every
        // provider sharing the Secret is tested and its status loses the warning now,
        // not at its next interval.
        match self
            .write(api, namespace, name, held, &merged, !kept.rotated)
            .await
        {
            Ok(stored) => {
                self.forget_unsaved(namespace, name);
                tracing::info!(secret = name, "stored the tokens kept since a failed write");
                Kept::Stored(stored)
            }
            Err(e) => {
                self.note_unsaved(namespace, name, &e);
                Kept::Unstored(merged, e)
            }
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
                match api.get_opt(name).await {
                    Ok(current) => {
                        self.store_unsaved(&api, namespace, name, current).await;
                    }
                    Err(e) => self.note_unsaved(namespace, name, &e),
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
                let command = crate::command_name();
                tracing::error!(
                    %namespace,
                    secret = %name,
                    why = %kept.why,
                    "stopping with OAuth2 tokens the API server did not store: if the token endpoint rotates refresh tokens, the Secret's is no longer valid; run `{command} authorize` for the providers that use it"
                );
                format!(
                    "the rotated OAuth2 tokens could not be stored in Secret {namespace}/{name} ({}); if the token endpoint rotates refresh tokens, the one the Secret holds is no longer valid: run `{command} authorize` for the providers that use it",
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
    pub(super) async fn exchange(
        &self,
        tls: Arc<rustls::ClientConfig>,
        url: String,
        form: Vec<(&'static str, SecretString)>,
        at: (String, String),
        held: TokenSet,
    ) -> (Grant, Option<Timestamp>) {
        let unsaved = self.unsaved.clone();
        let loopback = self.loopback;
        let task = self.exchanges.spawn(async move {
            let (grant, not_before) = match crate::credentials::http::post_form(
                &tls,
                &url,
                &form,
                TOKEN_REQUEST_TIMEOUT,
                loopback,
            )
            .await
            {
                Ok(r) => (
                    read_grant(r.status, &r.body, &form),
                    not_before(r.status, r.retry_after, Timestamp::now()),
                ),
                Err(message) => (Grant::Failed(message), None),
            };
            if let Grant::Tokens(t) = &grant
                && rotates(&held, t)
            {
                keep(&unsaved, at, held, t.clone(), "not written yet".into());
            }
            (grant, not_before)
        });
        task.await.unwrap_or_else(|e| {
            (
                Grant::Failed(format!("the token request stopped: {e}")),
                None,
            )
        })
    }

    /// Writes `updated` over `current`; marked as our own write (no test of the providers
    /// sharing the Secret follows) when `own`.
    async fn write(
        &self,
        api: &Api<Secret>,
        namespace: &str,
        name: &str,
        current: &Secret,
        updated: &Secret,
        own: bool,
    ) -> Result<Secret, kube::Error> {
        let pending = own.then(|| self.own.begin(namespace, name, current.resource_version()));
        let params = PostParams {
            field_manager: Some(super::REFRESH_WRITER.into()),
            ..Default::default()
        };
        let written = api.replace(name, &params, updated).await;
        if let (Ok(secret), Some(pending)) = (&written, pending)
            && let Some(after) = secret.resource_version()
        {
            pending.done(after);
        }
        written
    }

    /// Writes a grant back over `current` (see [`Self::write`]) and returns the
    /// Secret the test uses: stored, adopted from a newer write, or kept in memory.
    /// `held` is the tokens `current` holds in the API server (not those of a grant kept
    /// in memory): another writer is told by a change from them.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn store_grant(
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
            .write(api, namespace, secret_name, current, &updated, true)
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
                            .write(api, namespace, secret_name, &again, &retry, true)
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

    /// The TLS configuration for `provider`'s OAuth2 endpoints: the platform's roots, and
    /// its `oauth2.caBundleRef` where it has one.
    fn tls_for(
        &self,
        provider: &IncomingMailProvider,
        fetched: &Fetched,
    ) -> Result<Arc<rustls::ClientConfig>, (Reason, String)> {
        match crate::credentials::oauth2_ca_bundle(&provider.spec, fetched) {
            Ok(None) => Ok(self.tls.clone()),
            Ok(Some(pem)) => {
                token_tls_with(Some(&pem)).map_err(|message| (Reason::InvalidSpec, message))
            }
            Err(e) => Err((e.reason(), e.to_string())),
        }
    }

    /// A usable token for `provider` from its token Secret, memory or the token endpoint
    /// (reached with `tls`), written back where it rotated.
    #[allow(clippy::too_many_arguments)]
    async fn refresh(
        &self,
        provider: &IncomingMailProvider,
        o: &OAuth2Spec,
        tls: Arc<rustls::ClientConfig>,
        secret_name: &str,
        fetched: &Fetched,
        ahead: Duration,
        asked: bool,
    ) -> Result<Secret, (Reason, String)> {
        let namespace = fetched.namespace.as_str();
        let name = provider.name_any();
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let command = authorize_command(&name, namespace, o.flow);
        let app_only = o.flow == OAuth2Flow::ClientCredentials;
        let protocol = provider.spec.server.protocol;
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
            let source = if in_memory {
                self.app_token(&key(namespace, secret_name), o, protocol)
            } else {
                current.clone()
            };
            let tokens = source.as_ref().map(TokenSet::from_secret);
            let now = Timestamp::now();
            let mut step = plan(o.flow, tokens.as_ref(), now, ahead);
            if self.is_rejected(&key(namespace, secret_name), tokens.as_ref()) {
                step = plan_after_rejection(step, o.flow, tokens.as_ref());
            }
            match step {
                Plan::Use => {
                    let source = source.expect("a usable token comes from a Secret or memory");
                    if app_only && ours {
                        // Fresher in the Secret (another replica's) than in memory: the
                        // next tests use it without coming here.
                        let at = key(namespace, secret_name);
                        self.keep_app_token(at, o, protocol, source.clone());
                    }
                    return Ok(source);
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
                protocol,
                step,
                used.refresh_token.as_ref(),
                client_secret.as_ref(),
            );
            let what = if step == Plan::ClientCredentials {
                "client credentials grant"
            } else {
                "refresh of the access token"
            };
            let client = (token_url.clone(), o.client_id.clone());
            let bundle = crate::credentials::oauth2_ca_bundle(&provider.spec, fetched)
                .ok()
                .flatten();
            let settings = format!("{:?} {}", o.flow, scopes(o, protocol).join(" "));
            let inputs = Inputs::of(client_secret.as_ref(), bundle.as_deref(), &settings);
            if let Some(why) = self.holds.why_not(&client, inputs, asked, now) {
                return still_valid(source, &used, now, format!("no {what} asked for: {why}"));
            }
            let (grant, not_before) = self
                .exchange(
                    tls.clone(),
                    token_url.clone(),
                    form,
                    key(namespace, secret_name),
                    held.clone(),
                )
                .await;
            if let Some(until) = not_before {
                tracing::warn!(secret = secret_name, ?grant, "token endpoint throttled");
                self.answered("throttled");
                let why = self.holds.asked(client.clone(), until);
                return still_valid(source, &used, now, format!("no {what} asked for: {why}"));
            }
            // Only a failure of the endpoint holds back the next request: a grant, or a
            // refusal of this refresh token, says the endpoint works.
            match &grant {
                Grant::Tokens(_) => self.holds.answered(&client),
                Grant::Refused { error, .. } if needs_sign_in(error) => {
                    self.holds.answered(&client)
                }
                Grant::Refused { error, description } => self.holds.failed(
                    client.clone(),
                    inputs,
                    &format!("{error}: {description}"),
                    Timestamp::now(),
                ),
                Grant::Failed(message) => {
                    self.holds
                        .failed(client.clone(), inputs, message, Timestamp::now())
                }
            }
            let response = match grant {
                Grant::Tokens(t) => {
                    self.answered("refreshed");
                    t
                }
                Grant::Refused { error, description } if needs_sign_in(&error) => {
                    // Another replica (or `mailroom authorize`) may have rotated the token
                    // meanwhile and be about to write it: look again for a moment. Only
                    // a refresh token gone is told so; a sign-in asked for is not.
                    let mut rotated = false;
                    let tries = if error == "invalid_grant" { 4 } else { 0 };
                    for _ in 0..tries {
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
                    self.answered("revoked");
                    tracing::warn!(secret = secret_name, %error, %description, "token endpoint refused the grant");
                    return Err((
                        Reason::AuthorizationRevoked,
                        format!(
                            "the token endpoint {token_url} refused the {what}: {error}: {description}; run `{command}` again"
                        ),
                    ));
                }
                Grant::Refused { error, description } => {
                    self.answered("failed");
                    let message = format!(
                        "the token endpoint {token_url} refused the {what}: {error}: {description}"
                    );
                    return still_valid(source, &used, now, message);
                }
                Grant::Failed(message) => {
                    self.answered("failed");
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

/// Drops the app-only tokens kept for one Secret that have expired: they serve no one,
/// and those of settings edited away (another client, tenant or scope) would otherwise
/// stay as long as the Secret's name is used.
fn drop_expired(kept: &mut HashMap<String, Secret>, now: Timestamp) {
    kept.retain(|_, token| TokenSet::from_secret(token).access_valid(now));
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
