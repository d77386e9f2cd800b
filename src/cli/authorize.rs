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
use crate::api::oauth2::{endpoints, scopes};
use crate::api::{AuthMethod, IncomingMailProvider, OAuth2Flow, OAuth2Provider};
use crate::credentials::http::post_form;
use crate::credentials::tokens::{
    self, Grant, REFRESH_TOKEN, TOKEN_REQUEST_TIMEOUT, read_grant, token_tls, updated_secret,
};

#[derive(clap::Args, Debug)]
pub struct AuthorizeArgs {
    /// The provider to authorize.
    pub name: String,
    /// Its namespace; the kubeconfig's namespace when absent.
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
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
    /// How long to wait for the sign-in, and then for the controller's test, in seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
}

pub async fn run(args: AuthorizeArgs) -> anyhow::Result<i32> {
    let (client, ns) = super::connect(args.namespace.as_deref()).await?;
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
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let secret_name = o.token_secret_ref.name.clone();
    let tls = token_tls()?;

    if args.revoke {
        revoke(&secrets, &secret_name, &o, &tls).await?;
        request_check(&providers, &args.name).await?;
        eprintln!("Removed the tokens of {ns}/{}.", args.name);
        return Ok(0);
    }
    if o.flow == OAuth2Flow::ClientCredentials {
        eprintln!(
            "{ns}/{} uses the ClientCredentials flow: the controller gets its tokens itself; nothing to authorize.",
            args.name
        );
        return Ok(0);
    }
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
    let client_secret = match &o.client_secret_ref {
        Some(r) => {
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
            Some(SecretString::from(value))
        }
        None => None,
    };
    let e = endpoints(&o);
    let token_url = e
        .token
        .clone()
        .context("spec.authentication.oauth2.tokenURL is required")?;
    let scope = scopes(&o, provider.spec.server.protocol).join(" ");
    let deadline = Instant::now() + Duration::from_secs(args.timeout);

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
            deadline,
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
            deadline,
        )
        .await?
    };
    store(&secrets, &secret_name, &grant).await?;
    eprintln!("Stored the tokens in Secret {ns}/{secret_name}.");
    let requested = request_check(&providers, &args.name).await?;
    if args.no_wait {
        return Ok(0);
    }
    eprintln!("Asked the controller for a test; waiting for it…");
    let pending = vec![((ns.clone(), args.name.clone()), requested)];
    let scope = Scope::namespace(client, &ns);
    wait_for_tests(&scope, pending, Duration::from_secs(args.timeout)).await
}

fn random_urlsafe(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    URL_SAFE_NO_PAD.encode(buf)
}

/// SHA-256, from the TLS library's own hash provider.
fn sha256(data: &[u8]) -> Vec<u8> {
    let suite = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256;
    let rustls::SupportedCipherSuite::Tls13(tls13) = suite else {
        unreachable!("a TLS 1.3 suite")
    };
    tls13.common.hash_provider.hash(data).as_ref().to_vec()
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
        ("scope", scope),
        ("state", state.as_str()),
        ("code_challenge", challenge.as_str()),
        ("code_challenge_method", "S256"),
    ];
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

/// Serves the loopback redirect until one carries the right state; returns the code.
async fn wait_for_code(listener: &TcpListener, state: &str) -> anyhow::Result<SecretString> {
    loop {
        let (mut conn, _) = listener.accept().await?;
        let mut buf = vec![0u8; 16 * 1024];
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
        let head = String::from_utf8_lossy(&buf[..len]).to_string();
        let target = head
            .lines()
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or_default()
            .to_string();
        let params: BTreeMap<String, String> = target
            .split_once('?')
            .map(|(_, q)| form_urlencoded_pairs(q))
            .unwrap_or_default();
        let (page, result) = if params.get("state").map(String::as_str) != Some(state) {
            ("This is not the sign-in mailroom is waiting for.", None)
        } else if let Some(error) = params.get("error") {
            let description = params.get("error_description").cloned().unwrap_or_default();
            (
                "Sign-in failed; see the terminal.",
                Some(Err(anyhow::anyhow!(
                    "the sign-in failed: {error}: {description}"
                ))),
            )
        } else if let Some(code) = params.get("code") {
            (
                "Signed in. You can close this window and return to the terminal.",
                Some(Ok(SecretString::from(code.clone()))),
            )
        } else {
            ("Waiting for the sign-in.", None)
        };
        let body = format!("<!doctype html><title>mailroom</title><p>{page}</p>\n");
        let _ = conn
            .write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            )
            .await;
        let _ = conn.shutdown().await;
        if let Some(result) = result {
            return result;
        }
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
    let (status, body) = post_form(tls, token_url, form, TOKEN_REQUEST_TIMEOUT)
        .await
        .map_err(anyhow::Error::msg)?;
    match read_grant(status, &body) {
        Grant::Tokens(t) => Ok(t),
        Grant::Refused { error, description } => {
            bail!("the token endpoint {token_url} refused: {error}: {description}")
        }
        Grant::Failed(message) => bail!("the token endpoint {token_url}: {message}"),
    }
}

#[derive(serde::Deserialize)]
struct DeviceAuthorization {
    device_code: String,
    user_code: String,
    #[serde(alias = "verification_url")]
    verification_uri: String,
    #[serde(default)]
    verification_uri_complete: Option<String>,
    #[serde(default)]
    interval: Option<u64>,
    #[serde(default)]
    expires_in: Option<u64>,
    #[serde(default)]
    message: Option<String>,
}

async fn device_flow(
    tls: &Arc<rustls::ClientConfig>,
    client_id: &str,
    client_secret: Option<&SecretString>,
    scope: &str,
    device_url: &str,
    token_url: &str,
    deadline: Instant,
) -> anyhow::Result<tokens::TokenResponse> {
    let form = [
        ("client_id", SecretString::from(client_id.to_string())),
        ("scope", SecretString::from(scope.to_string())),
    ];
    let (status, body) = post_form(tls, device_url, &form, TOKEN_REQUEST_TIMEOUT)
        .await
        .map_err(anyhow::Error::msg)?;
    if status != 200 {
        match read_grant(status, &body) {
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
    loop {
        if Instant::now() > deadline || Instant::now() > expires {
            bail!("the code expired before the sign-in finished: run the command again");
        }
        tokio::time::sleep(interval).await;
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
        let (status, body) = match post_form(tls, token_url, &form, TOKEN_REQUEST_TIMEOUT).await {
            Ok(answer) => answer,
            Err(message) => {
                eprintln!("(retrying: {message})");
                continue;
            }
        };
        match read_grant(status, &body) {
            Grant::Tokens(t) => return Ok(t),
            Grant::Refused { error, .. } if error == "authorization_pending" => {}
            Grant::Refused { error, .. } if error == "slow_down" => {
                interval += Duration::from_secs(5);
            }
            Grant::Refused { error, .. } if error == "expired_token" => {
                bail!("the code expired before the sign-in finished: run the command again")
            }
            Grant::Refused { error, .. } if error == "access_denied" => {
                bail!("the sign-in was declined (access_denied)")
            }
            Grant::Refused { error, description } => {
                bail!("the token endpoint {token_url} refused: {error}: {description}")
            }
            Grant::Failed(message) => bail!("the token endpoint {token_url}: {message}"),
        }
    }
}

/// Writes the tokens into the Secret, creating it (labelled as mailroom's) if missing;
/// on a conflict, re-reads and writes again.
async fn store(
    secrets: &Api<Secret>,
    name: &str,
    grant: &tokens::TokenResponse,
) -> anyhow::Result<()> {
    for _ in 0..5 {
        let current = secrets.get_opt(name).await?;
        let mut updated = updated_secret(current.as_ref(), grant, Timestamp::now());
        let result = match current {
            Some(_) => {
                secrets
                    .replace(name, &PostParams::default(), &updated)
                    .await
            }
            None => {
                updated.metadata.name = Some(name.to_string());
                secrets.create(&PostParams::default(), &updated).await
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

/// Removes the tokens: the whole Secret when mailroom made it, else its token keys; and
/// revokes the refresh token where the provider has an endpoint for it.
async fn revoke(
    secrets: &Api<Secret>,
    name: &str,
    o: &crate::api::OAuth2Spec,
    tls: &Arc<rustls::ClientConfig>,
) -> anyhow::Result<()> {
    let Some(secret) = secrets.get_opt(name).await? else {
        eprintln!("Secret {name} does not exist: no tokens to remove.");
        return Ok(());
    };
    let refresh = tokens::TokenSet::from_secret(&secret).refresh_token;
    if let (Some(url), Some(token)) = (endpoints(o).revocation, refresh) {
        let form = [("token", token)];
        match post_form(tls, &url, &form, TOKEN_REQUEST_TIMEOUT).await {
            Ok((200, _)) => eprintln!("Revoked the refresh token at {url}."),
            Ok((status, _)) => eprintln!("The revocation endpoint {url} answered HTTP {status}."),
            Err(message) => eprintln!("Could not revoke the refresh token: {message}"),
        }
    }
    if secret.labels().contains_key(tokens::TOKEN_LABEL) {
        secrets.delete(name, &Default::default()).await?;
    } else {
        let mut keys = serde_json::Map::new();
        for key in [
            REFRESH_TOKEN,
            tokens::ACCESS_TOKEN,
            tokens::EXPIRES_AT,
            tokens::SCOPE,
        ] {
            keys.insert(key.to_string(), serde_json::Value::Null);
        }
        secrets
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"data": keys})),
            )
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

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
}
