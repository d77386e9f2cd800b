//! `mailroom authorize NAME -n NS`: the "Authorize button". Runs the provider's OAuth2
//! flow with the caller's kube credentials — authorization code with PKCE (RFC 7636) and a
//! loopback redirect on 127.0.0.1 (RFC 8252), or the device code flow (RFC 8628) with
//! `--device` — stores the tokens in the provider's token Secret, asks the controller for
//! a test and waits for its verdict. `--revoke` removes the tokens (and calls the
//! provider's revocation endpoint where it has one). No password passes through mailroom.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use rand::RngCore as _;
use secrecy::SecretString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::retest::{Scope, request_check, wait_for_tests};
use crate::api::oauth2::{endpoints, plaintext_endpoints, scopes};
use crate::api::{AuthMethod, IncomingMailProvider, OAuth2Flow, OAuth2Provider};
use crate::credentials::http::{Response, post_form};
use crate::credentials::proxy::Loopback;
use crate::credentials::tokens::{
    self, Grant, REFRESH_TOKEN, TOKEN_REQUEST_TIMEOUT, read_grant, signed_in_secret, token_tls,
    token_tls_with,
};
use crate::probe::sha256;

#[derive(clap::Args, Debug)]
pub struct AuthorizeArgs {
    /// The provider to authorize.
    pub name: String,
    /// Its namespace; the kubeconfig's namespace when absent.
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    #[command(flatten)]
    pub kube: super::KubeArgs,
    /// Use the device code flow: sign in on another device with a code.
    #[arg(long)]
    pub device: bool,
    /// Remove the stored tokens (and revoke them where the provider allows).
    #[arg(long)]
    pub revoke: bool,
    /// Do not try to open a browser; only print the URL.
    #[arg(long)]
    pub no_browser: bool,
    /// Do not wait for the controller's test after storing the tokens.
    #[arg(long)]
    pub no_wait: bool,
    /// How long to wait for the sign-in, and then for the controller's test: seconds, or
    /// 90s, 5m, 1h [default: 300; with --device, the sign-in waits as long as its code is
    /// valid, which the server says]
    #[arg(long, value_parser = super::wait_seconds)]
    pub timeout: Option<u64>,
}

/// The TLS configuration for the provider's OAuth2 endpoints: the platform's roots, and
/// the certificates its `oauth2.caBundleRef` names, read from the cluster as the caller.
async fn endpoint_tls(
    client: &kube::Client,
    ns: &str,
    provider: &IncomingMailProvider,
) -> anyhow::Result<std::sync::Arc<rustls::ClientConfig>> {
    let bundle = provider.spec.authentication.oauth2.as_ref();
    let Some(r) = bundle.and_then(|o| o.ca_bundle_ref.as_ref()) else {
        return token_tls();
    };
    let mut fetched = crate::credentials::Fetched {
        namespace: ns.to_string(),
        ..Default::default()
    };
    super::check::fetch_from_cluster(client, &crate::credentials::bundle(r), &mut fetched)
        .await
        .context("spec.authentication.oauth2.caBundleRef")?;
    let pem = crate::credentials::oauth2_ca_bundle(&provider.spec, &fetched)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    token_tls_with(pem.as_deref()).map_err(|e| anyhow::anyhow!(e))
}

pub async fn run(args: AuthorizeArgs) -> anyhow::Result<i32> {
    let (client, ns) = super::connect(&args.kube, args.namespace.as_deref()).await?;
    let providers: Api<IncomingMailProvider> = Api::namespaced(client.clone(), &ns);
    let provider = providers
        .get(&args.name)
        .await
        .with_context(|| format!("reading IncomingMailProvider {ns}/{}", args.name))?;
    if provider.spec.authentication.method != AuthMethod::OAuth2 {
        bail!(
            "{ns}/{} uses authentication.method {:?}, not OAuth2: nothing to authorize",
            args.name,
            provider.spec.authentication.method
        );
    }
    let Some(o) = provider.spec.authentication.oauth2.clone() else {
        bail!("{ns}/{} has no spec.authentication.oauth2", args.name);
    };
    if !args.revoke && provider.being_deleted() {
        bail!(
            "{ns}/{} is being deleted (held by finalizers {}): nothing to authorize",
            args.name,
            provider.finalizers().join(", ")
        );
    }
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let secret_name = o.token_secret_ref.name.clone();

    if args.revoke {
        // Revoking at the server is best effort: a CA bundle that cannot be read must not
        // keep the tokens in the Secret.
        let tls = endpoint_tls(&client, &ns, &provider).await;
        if revoke(&secrets, &secret_name, &o, &tls).await? {
            request_check(&providers, &args.name).await?;
            eprintln!("Removed the tokens of {ns}/{}.", args.name);
        }
        return Ok(0);
    }
    plaintext_endpoints(&o, provider.spec.authentication.allow_unencrypted)
        .map_err(|message| anyhow::anyhow!("{ns}/{}: {message}", args.name))?;
    if o.flow == OAuth2Flow::ClientCredentials {
        eprintln!(
            "{ns}/{} uses the ClientCredentials flow: the controller gets its tokens itself; nothing to authorize.",
            args.name
        );
        return Ok(0);
    }
    let tls = endpoint_tls(&client, &ns, &provider).await?;
    // The tokens say who signed in, not which mailbox to log in to: without a login name
    // the provider could not use them, so say so before the sign-in, not after.
    if provider.spec.authentication.username.is_none() {
        let stored = secrets
            .get_opt(&secret_name)
            .await
            .with_context(|| format!("reading Secret {ns}/{secret_name}"))?;
        if stored.is_none_or(|s| tokens::TokenSet::from_secret(&s).username.is_none()) {
            bail!(
                "{ns}/{}: spec.authentication.username is not set, and Secret {secret_name:?} holds no `username` key: set spec.authentication.username to the mailbox's login name, then run this again",
                args.name
            );
        }
    }
    let client_secret = client_secret(&secrets, &ns, &o).await?;
    let e = endpoints(&o);
    let token_url = e
        .token
        .clone()
        .context("spec.authentication.oauth2.tokenURL is required")?;
    let scope = scopes(&o, provider.spec.server.protocol).join(" ");
    let wait = Duration::from_secs(args.timeout.unwrap_or(DEFAULT_TIMEOUT));

    let grant = if args.device || o.flow == OAuth2Flow::DeviceCode {
        if o.provider == OAuth2Provider::Google {
            bail!(
                "Google's device flow does not grant the https://mail.google.com/ scope: run without --device"
            );
        }
        let device_url = e.device_authorization.clone().context(
            "spec.authentication.oauth2.deviceAuthorizationURL is required for --device",
        )?;
        device_flow(
            &tls,
            &o.client_id,
            client_secret.as_ref(),
            &scope,
            &device_url,
            &token_url,
            args.timeout
                .map(|t| Instant::now() + Duration::from_secs(t)),
        )
        .await?
    } else {
        let auth_url = e
            .authorization
            .clone()
            .context("spec.authentication.oauth2.authorizationURL is required")?;
        code_flow(
            &tls,
            &o.client_id,
            client_secret.as_ref(),
            &scope,
            &auth_url,
            &token_url,
            o.provider,
            !args.no_browser,
            Instant::now() + wait,
        )
        .await?
    };
    store(&secrets, &secret_name, &grant).await?;
    eprintln!("Stored the tokens in Secret {ns}/{secret_name}.");
    if grant.refresh_token.is_none() {
        eprintln!(
            "warning: the token endpoint granted no refresh token, so the controller cannot renew the access token: {ns}/{} works until it expires{}, then needs this command again. Most servers grant one only for the offline_access scope (spec.authentication.oauth2.scopes).",
            args.name,
            grant
                .expires_in
                .map(|s| format!(" (in {s} s)"))
                .unwrap_or_default()
        );
    }
    // As it is now: the sign-in may have taken minutes.
    let suspended = match providers.get_opt(&args.name).await {
        Ok(Some(now)) => now.spec.suspend,
        _ => provider.spec.suspend,
    };
    if suspended {
        // The controller does not test a suspended provider: no verdict would come.
        eprintln!(
            "{ns}/{} is suspended (spec.suspend: true): it is tested with these tokens once it is resumed.",
            args.name
        );
        return Ok(0);
    }
    let requested = request_check(&providers, &args.name).await?;
    if args.no_wait {
        return Ok(0);
    }
    eprintln!("Asked the controller for a test; waiting for it…");
    let pending = vec![((ns.clone(), args.name.clone()), requested)];
    let scope = Scope::namespace(client, &ns);
    wait_for_tests(&scope, pending, std::time::Instant::now() + wait, wait).await
}

/// How long the sign-in (browser) and then the controller's test are waited for, in
/// seconds, without `--timeout`.
const DEFAULT_TIMEOUT: u64 = 300;

/// The client secret `clientSecretRef` names, if the provider has one.
async fn client_secret(
    secrets: &Api<Secret>,
    ns: &str,
    o: &crate::api::OAuth2Spec,
) -> anyhow::Result<Option<SecretString>> {
    let Some(r) = &o.client_secret_ref else {
        return Ok(None);
    };
    let s = secrets
        .get(&r.name)
        .await
        .with_context(|| format!("reading Secret {ns}/{} (clientSecretRef)", r.name))?;
    let value = s
        .data
        .as_ref()
        .and_then(|d| d.get(&r.key))
        .map(|b| String::from_utf8_lossy(&b.0).trim().to_string())
        .with_context(|| format!("Secret {ns}/{} has no key {:?}", r.name, r.key))?;
    Ok(Some(SecretString::from(value)))
}

fn random_urlsafe(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    URL_SAFE_NO_PAD.encode(buf)
}

/// The PKCE pair (RFC 7636 S256): verifier and challenge.
pub fn pkce() -> (SecretString, String) {
    let verifier = random_urlsafe(32);
    let challenge = URL_SAFE_NO_PAD.encode(sha256(verifier.as_bytes()));
    (SecretString::from(verifier), challenge)
}

fn query(pairs: &[(&str, &str)]) -> String {
    let form: Vec<(&str, SecretString)> = pairs
        .iter()
        .map(|(k, v)| (*k, SecretString::from(v.to_string())))
        .collect();
    crate::credentials::http::form_encode(&form).to_string()
}

#[allow(clippy::too_many_arguments)]
async fn code_flow(
    tls: &Arc<rustls::ClientConfig>,
    client_id: &str,
    client_secret: Option<&SecretString>,
    scope: &str,
    auth_url: &str,
    token_url: &str,
    provider: OAuth2Provider,
    open_browser: bool,
    deadline: Instant,
) -> anyhow::Result<tokens::TokenResponse> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("listening on 127.0.0.1 for the sign-in's redirect")?;
    let port = listener.local_addr()?.port();
    let redirect_uri = format!("http://127.0.0.1:{port}/");
    let state = random_urlsafe(16);
    let (verifier, challenge) = pkce();
    let mut params = vec![
        ("client_id", client_id),
        ("response_type", "code"),
        ("redirect_uri", redirect_uri.as_str()),
        ("state", state.as_str()),
        ("code_challenge", challenge.as_str()),
        ("code_challenge_method", "S256"),
    ];
    // No scopes (Generic, none given): the server's default, not an empty scope.
    if !scope.is_empty() {
        params.push(("scope", scope));
    }
    if provider == OAuth2Provider::Google {
        // A refresh token only comes with offline access and a consent prompt.
        params.push(("access_type", "offline"));
        params.push(("prompt", "consent"));
    }
    let sep = if auth_url.contains('?') { '&' } else { '?' };
    let url = format!("{auth_url}{sep}{}", query(&params));
    eprintln!("Open this URL in a browser and sign in:\n\n  {url}\n");
    let _ = std::io::stderr().flush();
    if open_browser {
        for opener in ["xdg-open", "open"] {
            if std::process::Command::new(opener)
                .arg(&url)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .is_ok()
            {
                break;
            }
        }
    }
    let code = tokio::time::timeout_at(deadline.into(), wait_for_code(&listener, &state))
        .await
        .map_err(|_| anyhow::anyhow!("no sign-in arrived within the timeout"))??;
    let mut form = vec![
        ("grant_type", SecretString::from("authorization_code")),
        ("code", code),
        ("redirect_uri", SecretString::from(redirect_uri)),
        ("client_id", SecretString::from(client_id.to_string())),
        ("code_verifier", verifier),
    ];
    if let Some(c) = client_secret {
        form.push(("client_secret", c.clone()));
    }
    exchange(tls, token_url, &form).await
}

/// Bound on a request head read from the loopback listener.
const MAX_REQUEST_HEAD: usize = 16 * 1024;
/// Each connection's time to send its request: browsers open preconnect sockets they
/// may never use.
const REQUEST_DEADLINE: Duration = Duration::from_secs(10);
/// Connections served at once; more wait in the listener's backlog.
const MAX_CONNECTIONS: usize = 32;

/// Serves the loopback redirect until one carries the right state; returns the code.
/// Each connection is served on its own, so an idle or slow one holds up no other.
async fn wait_for_code(listener: &TcpListener, state: &str) -> anyhow::Result<SecretString> {
    let state: Arc<str> = Arc::from(state);
    // Dropped with the wait (on the overall timeout too), which aborts what is left.
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept(), if conns.len() < MAX_CONNECTIONS => {
                let (conn, _) = accepted?;
                conns.spawn(serve_redirect(conn, state.clone()));
            }
            Some(served) = conns.join_next() => {
                if let Ok(Some(result)) = served {
                    return result;
                }
            }
        }
    }
}

/// Answers one connection; `Some` when it ends the wait.
async fn serve_redirect(
    mut conn: tokio::net::TcpStream,
    state: Arc<str>,
) -> Option<anyhow::Result<SecretString>> {
    let head = tokio::time::timeout(REQUEST_DEADLINE, read_head(&mut conn))
        .await
        .ok()?
        .ok()?;
    let reply = match request_target(&head) {
        Some(target) => redirect_reply(target, &state),
        None => Reply::page(
            "431 Request Header Fields Too Large",
            "The request is too large.",
        ),
    };
    let body = format!(
        "<!doctype html><title>mailroom</title><p>{}</p>\n",
        reply.page
    );
    let answer = format!(
        "HTTP/1.1 {}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        reply.status,
        body.len()
    );
    let _ = tokio::time::timeout(REQUEST_DEADLINE, async {
        conn.write_all(answer.as_bytes()).await?;
        conn.shutdown().await
    })
    .await;
    reply.outcome
}

/// Reads up to the blank line ending the head, the end of the stream or the bound.
async fn read_head(conn: &mut tokio::net::TcpStream) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; MAX_REQUEST_HEAD];
    let mut len = 0;
    while len < buf.len() {
        let n = conn.read(&mut buf[len..]).await?;
        if n == 0 {
            break;
        }
        len += n;
        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    buf.truncate(len);
    Ok(buf)
}

/// The request line's target; `None` when the bound cut the request line itself.
fn request_target(head: &[u8]) -> Option<&str> {
    let line = match head.iter().position(|&b| b == b'\n') {
        Some(end) => &head[..end],
        None if head.len() >= MAX_REQUEST_HEAD => return None,
        None => head,
    };
    let line = std::str::from_utf8(line).unwrap_or_default();
    Some(line.split_whitespace().nth(1).unwrap_or_default())
}

/// What the loopback listener answers, and whether the answer ends the wait.
struct Reply {
    status: &'static str,
    page: &'static str,
    outcome: Option<anyhow::Result<SecretString>>,
}

impl Reply {
    fn page(status: &'static str, page: &'static str) -> Self {
        Reply {
            status,
            page,
            outcome: None,
        }
    }
}

/// The answer to a request for `target`: only the redirect URI's path with the flow's
/// own state ends the wait.
fn redirect_reply(target: &str, state: &str) -> Reply {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if path != "/" {
        return Reply::page("404 Not Found", "Not found.");
    }
    let params = form_urlencoded_pairs(query);
    if params.get("state").map(String::as_str) != Some(state) {
        return Reply::page(
            "400 Bad Request",
            "This is not the sign-in mailroom is waiting for.",
        );
    }
    if let Some(error) = params.get("error") {
        let description = params.get("error_description").cloned().unwrap_or_default();
        return Reply {
            status: "200 OK",
            page: "Sign-in failed; see the terminal.",
            // The words came in a URL anyone could craft: no raw control characters
            // reach the terminal.
            outcome: Some(Err(anyhow::anyhow!(
                "the sign-in failed: {}: {}",
                crate::probe::printable(error),
                crate::probe::printable(&description)
            ))),
        };
    }
    match params.get("code") {
        Some(code) => Reply {
            status: "200 OK",
            page: "Signed in. You can close this window and return to the terminal.",
            outcome: Some(Ok(SecretString::from(code.clone()))),
        },
        None => Reply::page("200 OK", "Waiting for the sign-in."),
    }
}

fn form_urlencoded_pairs(q: &str) -> BTreeMap<String, String> {
    form_urlencoded::parse(q.as_bytes()).into_owned().collect()
}

async fn exchange(
    tls: &Arc<rustls::ClientConfig>,
    token_url: &str,
    form: &[(&str, SecretString)],
) -> anyhow::Result<tokens::TokenResponse> {
    let answer = post_riding_out(tls, token_url, form).await?;
    match read_grant(answer.status, &answer.body, form) {
        Grant::Tokens(t) => Ok(t),
        Grant::Refused { error, description } => {
            bail!("the token endpoint {token_url} refused: {error}: {description}")
        }
        Grant::Failed(message) => bail!("the token endpoint {token_url}: {message}"),
    }
}

/// Tries after the first, for a request made once per sign-in (the code exchange, the
/// device authorization), and the longest wait between two.
const RETRIES: u32 = 3;
const MOST_RETRY_WAIT: Duration = Duration::from_secs(30);

/// Posts `form`, asking again (after 1 s, 2 s, 4 s, or the server's `Retry-After` up to
/// 30 s) when no answer came or the endpoint answered 429 or 5xx: a gateway's passing
/// error must not cost a person the sign-in they just made, MFA and all. A code the first
/// request did redeem is refused as `invalid_grant` the second time, which says so.
async fn post_riding_out(
    tls: &Arc<rustls::ClientConfig>,
    url: &str,
    form: &[(&str, SecretString)],
) -> anyhow::Result<Response> {
    let mut wait = Duration::from_secs(1);
    for retry in 0..=RETRIES {
        let answer = post_form(tls, url, form, TOKEN_REQUEST_TIMEOUT, Loopback::Allowed).await;
        let (why, asked) = match answer {
            Ok(a) if a.status == 429 || a.status >= 500 => (
                format!("HTTP {}", a.status),
                a.retry_after.map(|r| r.delay(Timestamp::now())),
            ),
            Ok(a) => return Ok(a),
            Err(why) => (why, None),
        };
        if retry == RETRIES {
            bail!("{url} did not answer after {} tries: {why}", RETRIES + 1);
        }
        let pause = asked.unwrap_or(wait).min(MOST_RETRY_WAIT);
        eprintln!("{url}: {why}; trying again in {} s", pause.as_secs().max(1));
        tokio::time::sleep(pause).await;
        wait *= 2;
    }
    unreachable!("the last try returns")
}

#[derive(serde::Deserialize)]
struct DeviceAuthorization {
    device_code: String,
    user_code: String,
    #[serde(alias = "verification_url")]
    verification_uri: String,
    #[serde(default)]
    verification_uri_complete: Option<String>,
    /// Numbers, or strings holding them (as some servers send them).
    #[serde(default, deserialize_with = "tokens::interval_seconds")]
    interval: Option<u64>,
    #[serde(default, deserialize_with = "tokens::seconds")]
    expires_in: Option<u64>,
    #[serde(default)]
    message: Option<String>,
}

/// The longest wait between two polls after the token endpoint's trouble.
const MAX_POLL_BACKOFF: Duration = Duration::from_secs(60);

/// What one poll of the device flow's token endpoint means.
#[derive(Debug)]
enum Poll {
    Granted(tokens::TokenResponse),
    /// Not signed in yet.
    Pending,
    SlowDown,
    /// The endpoint's own trouble (HTTP 429 or 5xx, an answer that is not JSON): the user
    /// may have signed in already, so it is asked again, after `retry_after` if it said.
    Busy {
        why: String,
        retry_after: Option<Duration>,
    },
    Expired,
    /// The user declined: RFC 8628's `access_denied`, Microsoft's `authorization_declined`.
    Declined(String),
    /// Anything else ends the command.
    Failed(String),
}

/// Reads one poll's answer (RFC 8628 §3.5).
fn poll_outcome(
    answer: &Response,
    form: &[(&str, SecretString)],
    token_url: &str,
    now: Timestamp,
) -> Poll {
    let busy = |why: String| Poll::Busy {
        why,
        retry_after: answer.retry_after.map(|r| r.delay(now)),
    };
    if answer.status == 429 || answer.status >= 500 {
        return busy(format!("HTTP {}", answer.status));
    }
    match read_grant(answer.status, &answer.body, form) {
        Grant::Tokens(t) => Poll::Granted(t),
        Grant::Refused { error, .. } if error == "authorization_pending" => Poll::Pending,
        Grant::Refused { error, .. } if error == "slow_down" => Poll::SlowDown,
        Grant::Refused { error, .. } if error == "expired_token" => Poll::Expired,
        Grant::Refused { error, .. }
            if error == "access_denied" || error == "authorization_declined" =>
        {
            Poll::Declined(error)
        }
        Grant::Refused { error, description } => Poll::Failed(format!(
            "the token endpoint {token_url} refused: {error}: {description}"
        )),
        // Not JSON (a proxy's page, a cut-off answer): the endpoint's trouble.
        Grant::Failed(message)
            if serde_json::from_slice::<serde_json::Value>(&answer.body).is_err() =>
        {
            busy(message)
        }
        Grant::Failed(message) => {
            Poll::Failed(format!("the token endpoint {token_url}: {message}"))
        }
    }
}

async fn device_flow(
    tls: &Arc<rustls::ClientConfig>,
    client_id: &str,
    client_secret: Option<&SecretString>,
    scope: &str,
    device_url: &str,
    token_url: &str,
    limit: Option<Instant>,
) -> anyhow::Result<tokens::TokenResponse> {
    let mut form = vec![("client_id", SecretString::from(client_id.to_string()))];
    if !scope.is_empty() {
        form.push(("scope", SecretString::from(scope.to_string())));
    }
    // A confidential client authenticates here too (RFC 8628 §3.1), not only when it polls.
    if let Some(c) = client_secret {
        form.push(("client_secret", c.clone()));
    }
    let Response { status, body, .. } = post_riding_out(tls, device_url, &form).await?;
    if status != 200 {
        match read_grant(status, &body, &form) {
            Grant::Refused { error, description } => {
                bail!(
                    "the device authorization endpoint {device_url} refused: {error}: {description}"
                )
            }
            _ => bail!("the device authorization endpoint {device_url} answered HTTP {status}"),
        }
    }
    let d: DeviceAuthorization = serde_json::from_slice(&body)
        .with_context(|| format!("reading the answer of {device_url}"))?;
    match &d.message {
        Some(m) => eprintln!("{m}"),
        None => eprintln!(
            "To sign in, open {} and enter the code {}",
            d.verification_uri, d.user_code
        ),
    }
    eprintln!(
        "\n  URL:  {}\n  code: {}\n",
        d.verification_uri, d.user_code
    );
    if let Some(complete) = &d.verification_uri_complete {
        eprintln!("  (or open {complete})\n");
    }
    let _ = std::io::stderr().flush();
    let mut interval = Duration::from_secs(d.interval.unwrap_or(5).max(1));
    let expires = Instant::now() + Duration::from_secs(d.expires_in.unwrap_or(900));
    let device_code = SecretString::from(d.device_code);
    // The wait before the next poll: the interval, or longer after the endpoint's trouble.
    let mut wait = interval;
    let mut backoff = interval;
    loop {
        if Instant::now() > expires {
            bail!("the code expired before the sign-in finished: run the command again");
        }
        if limit.is_some_and(|l| Instant::now() > l) {
            bail!(
                "no sign-in within --timeout (the code is still valid for {} s): run the command again, with a longer --timeout or none",
                expires.saturating_duration_since(Instant::now()).as_secs()
            );
        }
        tokio::time::sleep(wait.min(expires.saturating_duration_since(Instant::now()))).await;
        let mut form = vec![
            (
                "grant_type",
                SecretString::from("urn:ietf:params:oauth:grant-type:device_code"),
            ),
            ("device_code", device_code.clone()),
            ("client_id", SecretString::from(client_id.to_string())),
        ];
        if let Some(c) = client_secret {
            form.push(("client_secret", c.clone()));
        }
        let poll = match post_form(
            tls,
            token_url,
            &form,
            TOKEN_REQUEST_TIMEOUT,
            Loopback::Allowed,
        )
        .await
        {
            Ok(answer) => poll_outcome(&answer, &form, token_url, Timestamp::now()),
            Err(why) => Poll::Busy {
                why,
                retry_after: None,
            },
        };
        match poll {
            Poll::Granted(t) => return Ok(t),
            Poll::Pending => {}
            Poll::SlowDown => interval += Duration::from_secs(5),
            Poll::Busy { why, retry_after } => {
                // Doubling from the interval, or what the server asked for (within the
                // code's life: the loop ends when it expires).
                backoff = (backoff * 2).min(MAX_POLL_BACKOFF);
                wait = retry_after.unwrap_or(backoff).max(interval);
                eprintln!("(retrying in {} s: {why})", wait.as_secs());
                continue;
            }
            Poll::Expired => {
                bail!("the code expired before the sign-in finished: run the command again")
            }
            Poll::Declined(error) => bail!("the sign-in was declined ({error})"),
            Poll::Failed(message) => bail!("{message}"),
        }
        // After slow_down too: the next poll waits the longer interval.
        wait = interval;
        backoff = interval;
    }
}

/// Writes the tokens into the Secret, creating it (labelled as mailroom's) if missing;
/// on a conflict, re-reads and writes again.
async fn store(
    secrets: &Api<Secret>,
    name: &str,
    grant: &tokens::TokenResponse,
) -> anyhow::Result<()> {
    let params = PostParams {
        field_manager: Some(tokens::AUTHORIZE_WRITER.into()),
        ..Default::default()
    };
    for _ in 0..5 {
        let current = secrets.get_opt(name).await?;
        let mut updated = signed_in_secret(current.as_ref(), grant, Timestamp::now());
        let result = match current {
            Some(_) => secrets.replace(name, &params, &updated).await,
            None => {
                updated.metadata.name = Some(name.to_string());
                secrets.create(&params, &updated).await
            }
        };
        match result {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(e).with_context(|| format!("writing Secret {name}")),
        }
    }
    bail!("Secret {name} kept changing while the tokens were stored")
}

/// Removes the tokens: the whole Secret when it is a token Secret holding nothing else,
/// else only its token keys (authorize labels a Secret it writes into, which may hold the
/// user's own data); and revokes the refresh token where the provider has an endpoint.
/// False when there was no Secret, so nothing to remove.
async fn revoke(
    secrets: &Api<Secret>,
    name: &str,
    o: &crate::api::OAuth2Spec,
    tls: &anyhow::Result<Arc<rustls::ClientConfig>>,
) -> anyhow::Result<bool> {
    let Some(secret) = secrets.get_opt(name).await? else {
        eprintln!("Secret {name} does not exist: no tokens to remove.");
        return Ok(false);
    };
    let refresh = tokens::TokenSet::from_secret(&secret).refresh_token;
    match (endpoints(o).revocation, refresh) {
        (Some(url), Some(token)) => {
            // RFC 7009 §2.1: the client identifies itself (and a confidential one
            // authenticates) as it does at the token endpoint.
            let mut form = vec![
                ("token", token),
                ("token_type_hint", SecretString::from("refresh_token")),
                ("client_id", SecretString::from(o.client_id.clone())),
            ];
            // Best effort: without it a public client's revocation still goes through.
            if let Ok(Some(secret)) = client_secret(secrets, "", o).await {
                form.push(("client_secret", secret));
            }
            let answer = match tls {
                Ok(tls) => {
                    post_form(tls, &url, &form, TOKEN_REQUEST_TIMEOUT, Loopback::Allowed).await
                }
                Err(e) => Err(format!("{e:#}")),
            };
            match answer {
                Ok(Response { status: 200, .. }) => {
                    eprintln!("Revoked the refresh token at {url}.")
                }
                Ok(Response { status, .. }) => {
                    eprintln!("The revocation endpoint {url} answered HTTP {status}.")
                }
                Err(message) => eprintln!("Could not revoke the refresh token: {message}"),
            }
        }
        (None, Some(_)) => eprintln!(
            "Note: this provider has no revocation endpoint (spec.authentication.oauth2.revocationURL), so the refresh token stays valid at the identity provider until it expires or is revoked there (for Microsoft Entra ID: revoke the user's sessions, or the app's consent)."
        ),
        _ => {}
    }
    const TOKEN_KEYS: [&str; 4] = [
        REFRESH_TOKEN,
        tokens::ACCESS_TOKEN,
        tokens::EXPIRES_AT,
        tokens::SCOPE,
    ];
    let only_tokens = secret
        .data
        .iter()
        .flatten()
        .all(|(key, _)| TOKEN_KEYS.contains(&key.as_str()));
    if tokens::is_token_secret(&secret) && only_tokens {
        secrets.delete(name, &Default::default()).await?;
    } else {
        let mut keys = serde_json::Map::new();
        for key in TOKEN_KEYS {
            keys.insert(key.to_string(), serde_json::Value::Null);
        }
        secrets
            .patch(
                name,
                &PatchParams {
                    field_manager: Some(tokens::AUTHORIZE_WRITER.into()),
                    ..Default::default()
                },
                &Patch::Merge(serde_json::json!({"data": keys})),
            )
            .await?;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn a_device_authorization_may_give_its_interval_and_expiry_as_strings() {
        let d: DeviceAuthorization = serde_json::from_str(
            r#"{"device_code":"dc","user_code":"ABCD","verification_uri":"https://microsoft.com/devicelogin","interval":"5","expires_in":"900"}"#,
        )
        .unwrap();
        assert_eq!((d.interval, d.expires_in), (Some(5), Some(900)));
        let d: DeviceAuthorization = serde_json::from_str(
            r#"{"device_code":"dc","user_code":"ABCD","verification_url":"https://www.google.com/device","interval":5}"#,
        )
        .unwrap();
        assert_eq!((d.interval, d.expires_in), (Some(5), None));
        // Not a number: the flow's default interval, rather than no sign-in at all.
        let d: DeviceAuthorization = serde_json::from_str(
            r#"{"device_code":"dc","user_code":"A","verification_uri":"u","interval":"soon"}"#,
        )
        .unwrap();
        assert_eq!(d.interval, None);
    }

    fn poll(status: u16, retry_after: Option<&str>, body: &str) -> Poll {
        let answer = Response {
            status,
            retry_after: retry_after.and_then(crate::credentials::http::RetryAfter::parse),
            body: body.as_bytes().to_vec(),
        };
        poll_outcome(&answer, &[], "https://t/token", Timestamp::now())
    }

    #[test]
    fn a_poll_answered_by_a_busy_endpoint_is_asked_again() {
        assert!(matches!(
            poll(429, Some("7"), r#"{"error":"temporarily_unavailable"}"#),
            Poll::Busy { retry_after: Some(d), .. } if d == Duration::from_secs(7)
        ));
        assert!(matches!(
            poll(503, None, "<html>Service Unavailable</html>"),
            Poll::Busy {
                retry_after: None,
                ..
            }
        ));
        assert!(matches!(poll(502, None, ""), Poll::Busy { .. }));
        // A proxy's page, or a cut-off answer, with any status.
        assert!(matches!(
            poll(200, None, "<html>sign in to the proxy</html>"),
            Poll::Busy { .. }
        ));
        assert!(matches!(poll(400, None, "{\"err"), Poll::Busy { .. }));
    }

    #[test]
    fn a_poll_is_read_as_rfc_8628_and_microsoft_answer_it() {
        let refused = |error: &str| poll(400, None, &format!(r#"{{"error":"{error}"}}"#));
        assert!(matches!(refused("authorization_pending"), Poll::Pending));
        assert!(matches!(refused("slow_down"), Poll::SlowDown));
        assert!(matches!(refused("expired_token"), Poll::Expired));
        for declined in ["access_denied", "authorization_declined"] {
            assert!(
                matches!(refused(declined), Poll::Declined(ref e) if e == declined),
                "{declined}"
            );
        }
        assert!(
            matches!(refused("invalid_client"), Poll::Failed(m) if m.contains("invalid_client"))
        );
        assert!(matches!(
            poll(200, None, r#"{"access_token":"at","expires_in":"3600"}"#),
            Poll::Granted(_)
        ));
        // JSON, but not a token answer: no use asking again.
        assert!(matches!(
            poll(200, None, r#"{"token":"x"}"#),
            Poll::Failed(_)
        ));
    }

    #[test]
    fn pkce_challenge_is_the_s256_of_the_verifier() {
        // RFC 7636 appendix B.
        assert_eq!(
            URL_SAFE_NO_PAD.encode(sha256(b"dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk")),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
        let (verifier, challenge) = pkce();
        assert_eq!(verifier.expose_secret().len(), 43);
        assert_eq!(
            challenge,
            URL_SAFE_NO_PAD.encode(sha256(verifier.expose_secret().as_bytes()))
        );
    }

    #[test]
    fn redirect_queries_decode() {
        let q = form_urlencoded_pairs("code=a%2Fb&state=x+y&error_description=AADSTS%3A%20no");
        assert_eq!(q["code"], "a/b");
        assert_eq!(q["state"], "x y");
        assert_eq!(q["error_description"], "AADSTS: no");
    }

    #[test]
    fn only_the_redirect_with_its_state_ends_the_wait() {
        let ends = |target: &str| redirect_reply(target, "s").outcome;
        let code = ends("/?code=c&state=s").unwrap().unwrap();
        assert_eq!(code.expose_secret(), "c");
        let failed = ends("/?error=access_denied&state=s").unwrap().unwrap_err();
        assert!(failed.to_string().contains("access_denied"), "{failed}");
        let crafted = ends("/?error=x%1B%5B2J&error_description=a%0Ab&state=s").unwrap();
        assert_eq!(
            crafted.unwrap_err().to_string(),
            "the sign-in failed: x\\u{1b}[2J: a\\nb"
        );
        for target in [
            "/?error=access_denied&state=x",
            "/?code=c&state=x",
            "/?code=c",
            "/",
            "/favicon.ico",
            "/favicon.ico?code=c&state=s",
            "",
        ] {
            assert!(ends(target).is_none(), "{target:?} ended the wait");
        }
        assert_eq!(redirect_reply("/favicon.ico", "s").status, "404 Not Found");
        assert_eq!(redirect_reply("/?state=x", "s").status, "400 Bad Request");
    }

    #[test]
    fn the_target_comes_from_a_whole_request_line() {
        assert_eq!(
            request_target(b"GET /?code=c HTTP/1.1\r\nHost: h\r\n\r\n"),
            Some("/?code=c")
        );
        // Cut by the bound after the request line: the line still counts.
        let mut long = b"GET /?code=c HTTP/1.1\r\nCookie: ".to_vec();
        long.resize(MAX_REQUEST_HEAD, b'a');
        assert_eq!(request_target(&long), Some("/?code=c"));
        // Cut inside the request line: no target.
        assert_eq!(request_target(&vec![b'a'; MAX_REQUEST_HEAD]), None);
    }

    const STATE: &str = "s7";
    /// Well under the per-connection deadline: an answer this late means a connection
    /// waited for another.
    const PROMPT: Duration = Duration::from_secs(3);

    async fn waiting() -> (
        std::net::SocketAddr,
        tokio::task::JoinHandle<anyhow::Result<SecretString>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let wait = tokio::spawn(async move { wait_for_code(&listener, STATE).await });
        (addr, wait)
    }

    /// Sends one GET and returns the whole answer.
    async fn get(addr: std::net::SocketAddr, target: &str) -> String {
        let exchange = async {
            let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
            let request = format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
            conn.write_all(request.as_bytes()).await.unwrap();
            let mut answer = String::new();
            conn.read_to_string(&mut answer).await.unwrap();
            answer
        };
        tokio::time::timeout(PROMPT, exchange)
            .await
            .unwrap_or_else(|_| panic!("GET {target}: no answer within {PROMPT:?}"))
    }

    async fn code_of(wait: tokio::task::JoinHandle<anyhow::Result<SecretString>>) -> String {
        let code = tokio::time::timeout(PROMPT, wait)
            .await
            .unwrap_or_else(|_| panic!("the wait did not end within {PROMPT:?}"))
            .unwrap()
            .unwrap();
        code.expose_secret().to_string()
    }

    #[tokio::test]
    async fn an_idle_connection_does_not_hold_up_the_redirect() {
        let (addr, wait) = waiting().await;
        // A browser's preconnect: opened first, never sends a byte.
        let _idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        let answer = get(addr, &format!("/?code=c1&state={STATE}")).await;
        assert!(answer.contains("Signed in."), "answer: {answer}");
        assert_eq!(code_of(wait).await, "c1");
    }

    #[tokio::test]
    async fn other_paths_get_404_and_the_wait_goes_on() {
        let (addr, wait) = waiting().await;
        let answer = get(addr, "/favicon.ico").await;
        assert!(answer.starts_with("HTTP/1.1 404 "), "answer: {answer}");
        assert!(!wait.is_finished());
        get(addr, &format!("/?code=c2&state={STATE}")).await;
        assert_eq!(code_of(wait).await, "c2");
    }

    #[tokio::test]
    async fn a_wrong_state_is_refused_and_the_wait_goes_on() {
        let (addr, wait) = waiting().await;
        let answer = get(addr, "/?code=forged&state=other").await;
        assert!(answer.starts_with("HTTP/1.1 400 "), "answer: {answer}");
        assert!(
            answer.contains("not the sign-in mailroom is waiting for"),
            "answer: {answer}"
        );
        assert!(!wait.is_finished());
        get(addr, &format!("/?code=c3&state={STATE}")).await;
        assert_eq!(code_of(wait).await, "c3");
    }

    #[tokio::test]
    async fn an_oversized_request_is_cut_off_and_the_wait_goes_on() {
        let (addr, wait) = waiting().await;
        let mut big = tokio::net::TcpStream::connect(addr).await.unwrap();
        // Past the bound, no line end at all; the connection stays open.
        big.write_all(&vec![b'a'; MAX_REQUEST_HEAD + 1024])
            .await
            .unwrap();
        let mut rest = Vec::new();
        let cut = tokio::time::timeout(PROMPT, big.read_to_end(&mut rest)).await;
        assert!(
            cut.is_ok(),
            "the oversized connection was not closed within {PROMPT:?}"
        );
        assert!(!wait.is_finished());
        get(addr, &format!("/?code=c4&state={STATE}")).await;
        assert_eq!(code_of(wait).await, "c4");
    }
}
