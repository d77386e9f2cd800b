//! OAuth2 tokens through faults, with a token endpoint that rotates the refresh token at
//! every refresh: the controller killed while it refreshes, and an API server that
//! refuses to store the new tokens (meanwhile, and when the controller stops). No token
//! is lost.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, Secret};
use kube::api::{Api, ListParams};
use mailroom::credentials::tokens;
use mailroom_testbed::TokenServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use crate::fleet::{self, reason};
use crate::support::answered;
use crate::support::{ALICE_AUTH, Controller, Env, alice_env, provider};

const CLIENT: &str = "mailroom-test-app";

/// A relay in front of the token server that the test steers: while it holds, each token
/// request waits at the door until the test lets it through or drops it, so that the
/// controller can be killed at a known point of a refresh.
struct Gate {
    addr: SocketAddr,
    hold: Arc<AtomicBool>,
    held: mpsc::UnboundedReceiver<oneshot::Sender<bool>>,
    /// Its own thread, so that the test's blocking calls never stall it.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Gate {
    fn start(upstream: SocketAddr) -> Gate {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let hold = Arc::new(AtomicBool::new(true));
        let (tx, held) = mpsc::unbounded_channel();
        let holding = hold.clone();
        runtime.spawn(async move {
            let listener = TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    continue;
                };
                let (holding, tx) = (holding.clone(), tx.clone());
                tokio::spawn(async move {
                    let _ = relay(conn, upstream, &holding, &tx).await;
                });
            }
        });
        Gate {
            addr,
            hold,
            held,
            runtime: Some(runtime),
        }
    }

    fn token_url(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    /// Whether requests wait for the test's word (true) or go straight through.
    fn set_hold(&self, hold: bool) {
        self.hold.store(hold, Ordering::SeqCst);
    }

    /// The next request held at the door; send `true` to let it through, `false` (or
    /// drop it) to drop it unanswered.
    async fn next(&mut self, within: Duration) -> oneshot::Sender<bool> {
        tokio::time::timeout(within, self.held.recv())
            .await
            .unwrap_or_else(|_| panic!("no token request within {within:?}"))
            .unwrap()
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Reads one HTTP request (headers and a Content-Length body, at most 64 KiB), waits for
/// the test if the gate holds, and relays it and the answer.
async fn relay(
    mut conn: TcpStream,
    upstream: SocketAddr,
    hold: &AtomicBool,
    held: &mpsc::UnboundedSender<oneshot::Sender<bool>>,
) -> std::io::Result<()> {
    let mut request = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        request.extend_from_slice(&chunk[..n]);
        if let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&request[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if request.len() >= end + 4 + length {
                break;
            }
        }
        if request.len() > 64 * 1024 {
            return Ok(());
        }
    }
    if hold.load(Ordering::SeqCst) {
        let (tx, rx) = oneshot::channel();
        if held.send(tx).is_err() || rx.await != Ok(true) {
            return Ok(());
        }
    }
    let mut up = TcpStream::connect(upstream).await?;
    up.write_all(&request).await?;
    let mut answer = Vec::new();
    up.read_to_end(&mut answer).await?;
    conn.write_all(&answer).await?;
    conn.shutdown().await
}

async fn token_secret(env: &Env) -> Secret {
    Api::<Secret>::namespaced(env.client.clone(), &env.ns)
        .get("alice-token")
        .await
        .unwrap()
}

fn refresh_token(secret: &Secret) -> String {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(tokens::REFRESH_TOKEN))
        .map(|b| String::from_utf8_lossy(&b.0).to_string())
        .unwrap_or_default()
}

fn rfc3339_in(secs: i64) -> String {
    k8s_openapi::jiff::Timestamp::now()
        .checked_add(k8s_openapi::jiff::SignedDuration::from_secs(secs))
        .unwrap()
        .to_string()
}

/// The Secret's refresh token is the one the token server accepts, the only one alice
/// has, and no refresh token was ever presented twice. A refresh may be on its way when
/// this is asked (storing kept tokens is a change of the Secret, which tests its providers
/// again, and each test here refreshes): the Secret has 10 s to hold the live token.
async fn one_good_token(env: &Env, server: &TokenServer, when: &str, logs: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stored = refresh_token(&token_secret(env).await);
    while server.live_refresh_tokens("alice") != [stored.clone()] && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        stored = refresh_token(&token_secret(env).await);
    }
    assert!(
        server.refresh_token_valid(&stored),
        "{when}: the token server no longer accepts the Secret's refresh token ({} token requests); controller logs:\n{logs}",
        server.token_requests()
    );
    assert_eq!(
        server.live_refresh_tokens("alice"),
        vec![stored.clone()],
        "{when}: alice has exactly the one refresh token the Secret holds; controller logs:\n{logs}"
    );
    assert!(
        server.reused_refresh_tokens().is_empty(),
        "{when}: a refresh token was presented twice (a refresh done twice); controller logs:\n{logs}"
    );
    stored
}

/// A token server whose access tokens live one minute, under the five the controller
/// wants in hand, so that every test refreshes, and every refresh rotates the refresh
/// token; and Secret `alice-token` holding alice's grant with an expired access token.
/// Returns the server and the Secret's refresh token.
async fn rotating_grant(env: &Env) -> (TokenServer, String) {
    let server = TokenServer::start(env.bed.oauth());
    server.register_client(CLIENT, None, None);
    server.set_access_ttl(Duration::from_secs(60));
    let refresh = server.grant("alice", CLIENT);
    let expired = env
        .bed
        .oauth()
        .access_token("alice", Duration::from_secs(1));
    env.token_secret(
        "alice-token",
        &[
            ("refresh_token", &refresh),
            ("access_token", &expired),
            ("expires_at", &rfc3339_in(-60)),
        ],
    )
    .await;
    (server, refresh)
}

#[tokio::test]
async fn a_controller_killed_around_a_token_refresh_loses_no_token_and_every_provider_recovers() {
    let env = alice_env("sigkill-oauth2").await;
    let (server, first_refresh) = rotating_grant(&env).await;
    let upstream: SocketAddr = server.url().trim_start_matches("http://").parse().unwrap();
    let mut gate = Gate::start(upstream);

    let d = env.bed.dovecot();
    let oauth = |mechanism: &str| {
        format!(
            "{{method: OAuth2, username: alice, oauth2: {{provider: Generic, clientId: {CLIENT}, tokenURL: '{}', tokenSecretRef: {{name: alice-token}}, saslMechanism: {mechanism}}}}}",
            gate.token_url()
        )
    };
    env.apply(&provider(
        "oauth-imap",
        "IMAP",
        d.imaps_port(),
        "Implicit",
        &oauth("XOAUTH2"),
        "",
    ));
    env.apply(&provider(
        "oauth-pop3",
        "POP3",
        d.pop3s_port(),
        "Implicit",
        &oauth("OAUTHBEARER"),
        "",
    ));
    let mut names = vec!["oauth-imap".to_string(), "oauth-pop3".to_string()];
    for i in 0..10 {
        let name = format!("burst-{i:02}");
        let (protocol, port) = if i % 2 == 0 {
            ("IMAP", d.imaps_port())
        } else {
            ("POP3", d.pop3s_port())
        };
        env.apply(&provider(&name, protocol, port, "Implicit", ALICE_AUTH, ""));
        names.push(name);
    }

    // 1. Killed while its refresh request is at the token endpoint's door: the endpoint
    // never saw it, so the refresh token in the Secret is still the good one.
    let mut first = env.controller_with(&["--per-host-concurrency", "2"]);
    let request = gate.next(Duration::from_secs(60)).await;
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    drop(request);
    eprintln!(
        "oauth2: killed the first controller at its first token request, after {} tests",
        first.tests()
    );
    assert_eq!(server.token_requests(), 0);
    assert!(server.refresh_token_valid(&first_refresh));
    assert_eq!(refresh_token(&token_secret(&env).await), first_refresh);

    gate.set_hold(false);
    let mut second = env.controller();
    for name in &names {
        env.wait_reason(name, "Connected", Duration::from_secs(60))
            .await;
    }
    // One refresh per test, two tests: the write-back of a rotated token is no change that
    // sets off another test (it once did, and with access tokens this short-lived each of
    // those tests refreshed and wrote back again, some 25 times a second). Nothing else
    // is due for minutes, so three quiet seconds say it.
    let quiet = Instant::now() + Duration::from_secs(3);
    while Instant::now() < quiet {
        assert_eq!(
            server.token_requests(),
            2,
            "one token request per test of the two OAuth2 providers:\n{}",
            second.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stored = one_good_token(&env, &server, "after the first restart", &second.logs()).await;
    assert_ne!(stored, first_refresh, "the refresh token was rotated");

    // 2. Killed just after it wrote a rotated refresh token back, before (or while) it
    // tests with the new access token.
    gate.set_hold(true);
    fleet::request_checks(&env, &["oauth-imap".to_string()], "after-write").await;
    let request = gate.next(Duration::from_secs(30)).await;
    request.send(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while refresh_token(&token_secret(&env).await) == stored {
        assert!(
            Instant::now() < deadline,
            "the rotated refresh token was never written back:\n{}",
            second.logs()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    second.child.kill().unwrap();
    second.child.wait().unwrap();
    let p = env.providers().get("oauth-imap").await.unwrap();
    eprintln!(
        "oauth2: killed the second controller just after the write-back; the test's status was {}written",
        if answered(&p, "after-write") {
            ""
        } else {
            "not "
        }
    );
    one_good_token(&env, &server, "after the second kill", &second.logs()).await;

    // Started again, it answers the request it may not have, and every later refresh
    // works from the token it stored.
    gate.set_hold(false);
    let third = env.controller();
    env.wait(
        "oauth-imap",
        "the after-write request answered, Connected",
        Duration::from_secs(60),
        |p| answered(p, "after-write") && reason(p) == "Connected",
    )
    .await;
    let oauth_names = ["oauth-imap".to_string(), "oauth-pop3".to_string()];
    fleet::request_checks(&env, &oauth_names, "after-restart").await;
    for name in &oauth_names {
        env.wait(
            name,
            "the after-restart request answered, Connected",
            Duration::from_secs(60),
            |p| answered(p, "after-restart") && reason(p) == "Connected",
        )
        .await;
    }
    let last = one_good_token(&env, &server, "at the end", &third.logs()).await;
    assert_ne!(
        last, stored,
        "the later tests refreshed (and rotated) again"
    );

    // Never revoked, never failed, on the way.
    let events: Api<Event> = Api::namespaced(env.client.clone(), &env.ns);
    let bad: Vec<String> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .filter(|r| r == "AuthorizationRevoked" || r == "TokenRefreshFailed")
        .collect();
    assert!(
        bad.is_empty(),
        "the providers went through {bad:?}:\n{}",
        third.logs()
    );
    eprintln!(
        "oauth2: {} token requests, the refresh token rotated each time, none lost",
        server.token_requests()
    );
}

/// Whether the API server refuses an update of `name` now (asked as a dry run, so that
/// nothing changes either way).
async fn update_refused(env: &Env, name: &str) -> bool {
    let api: Api<Secret> = Api::namespaced(env.client.clone(), &env.ns);
    let params = kube::api::PatchParams {
        dry_run: true,
        ..Default::default()
    };
    let patch = kube::api::Patch::Merge(serde_json::json!({
        "metadata": {"annotations": {"probe": "x"}}
    }));
    api.patch(name, &params, &patch).await.is_err()
}

/// Waits until updates of `name` are refused (`refused`) or taken again.
async fn until_updates(env: &Env, name: &str, refused: bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while update_refused(env, name).await != refused {
        assert!(
            Instant::now() < deadline,
            "the admission policy did not take effect"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Provider `oauth-imap`: alice over IMAPS with the grant of Secret `alice-token`.
fn oauth_imap(env: &Env, server: &TokenServer) -> String {
    oauth_alice(server, "oauth-imap", "IMAP", env.bed.dovecot().imaps_port())
}

/// Provider `name`: alice over `protocol` with implicit TLS on `port`, with the grant of
/// Secret `alice-token`.
fn oauth_alice(server: &TokenServer, name: &str, protocol: &str, port: u16) -> String {
    provider(
        name,
        protocol,
        port,
        "Implicit",
        &format!(
            "{{method: OAuth2, username: alice, oauth2: {{provider: Generic, clientId: {CLIENT}, tokenURL: '{}', tokenSecretRef: {{name: alice-token}}}}}}",
            server.token_url()
        ),
        "",
    )
}

/// Has the API server refuse every update of the token Secret `alice-token` (an admission
/// policy, as a cluster's policy engine or a full etcd would); returns the policy's name.
async fn refuse_token_writes(env: &Env) -> String {
    let policy = crate::hostile::refuse_updates(
        env,
        "refuse-token-writes",
        "{apiGroups: [''], apiVersions: [v1], operations: [UPDATE], resources: [secrets]}",
        "object.metadata.name != 'alice-token'",
        "token Secret writes refused by the test",
    );
    until_updates(env, "alice-token", true).await;
    policy
}

/// Removes the policy of [`refuse_token_writes`] and waits until updates are taken.
async fn allow_token_writes(env: &Env, policy: &str) {
    crate::hostile::remove_policy(env, policy);
    until_updates(env, "alice-token", false).await;
}

/// Provider `oauth-imap` tested once by a running controller while the API server refuses
/// to store the rotated tokens: Connected, with one token request, and the Secret still
/// holding the refresh token the grant retired. Returns the controller and the policy.
async fn first_refresh_refused(
    env: &Env,
    server: &TokenServer,
    first: &str,
) -> (Controller, String) {
    env.apply(&oauth_imap(env, server));
    let policy = refuse_token_writes(env).await;
    let controller = env.controller();
    env.wait_reason("oauth-imap", "Connected", Duration::from_secs(60))
        .await;
    assert_eq!(server.token_requests(), 1, "{}", controller.logs());
    assert_eq!(
        refresh_token(&token_secret(env).await),
        first,
        "the write was refused, yet the Secret changed"
    );
    assert!(!server.refresh_token_valid(first), "the grant rotated it");
    (controller, policy)
}

#[tokio::test]
async fn a_rotated_token_the_api_server_refuses_to_store_is_kept_and_stored_later() {
    let env = alice_env("oauth2-unsaved").await;
    // The Secret's refresh token dies at the first refresh.
    let (server, first) = rotating_grant(&env).await;
    let (controller, policy) = first_refresh_refused(&env, &server, &first).await;
    // The provider works, and its status says what is at risk, in the API server's words.
    let p = env.providers().get("oauth-imap").await.unwrap();
    let message = ready_message(&p);
    assert!(
        message.contains(
            "WARNING: the rotated OAuth2 tokens could not be stored in Secret \"alice-token\""
        ) && message.contains("token Secret writes refused by the test"),
        "{message}"
    );

    // The next test refreshes from the token kept in memory, not from the Secret's dead one.
    fleet::request_checks(&env, &["oauth-imap".to_string()], "still-refused").await;
    let p = env
        .wait(
            "oauth-imap",
            "the still-refused request answered",
            Duration::from_secs(30),
            |p| answered(p, "still-refused"),
        )
        .await;
    assert_eq!(reason(&p), "Connected", "{}", controller.logs());
    assert_eq!(server.token_requests(), 2);
    assert!(
        server.reused_refresh_tokens().is_empty(),
        "a refresh token was presented twice:\n{}",
        controller.logs()
    );

    // Writes taken again: the next test stores the kept tokens, and refreshes from them.
    allow_token_writes(&env, &policy).await;
    fleet::request_checks(&env, &["oauth-imap".to_string()], "allowed").await;
    let p = env
        .wait(
            "oauth-imap",
            "the allowed request answered",
            Duration::from_secs(30),
            |p| answered(p, "allowed"),
        )
        .await;
    assert_eq!(reason(&p), "Connected", "{}", controller.logs());
    assert!(
        !ready_message(&p).contains("WARNING"),
        "{}",
        ready_message(&p)
    );
    one_good_token(&env, &server, "once writes were taken", &controller.logs()).await;
    // Storing the kept tokens is a change of the Secret for the providers sharing it
    // (none here), not for the one whose test stored and used them: no test follows.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        server.token_requests(),
        3,
        "the provider was tested again for its own storing of the kept tokens:\n{}",
        controller.logs()
    );
}

/// The Ready condition's message.
fn ready_message(p: &mailroom::api::IncomingMailProvider) -> String {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.message.clone())
        .unwrap_or_default()
}

#[tokio::test]
async fn a_grant_revoked_while_its_rotated_token_is_unstored_is_authorization_revoked() {
    let env = alice_env("oauth2-unsaved-revoked").await;
    let (server, first) = rotating_grant(&env).await;
    let (controller, policy) = first_refresh_refused(&env, &server, &first).await;

    // The user revokes the grant while the rotated token lives only in memory: the Secret
    // still holds the token that grant retired, which is no sign of another writer.
    server.revoke_user("alice");
    fleet::request_checks(&env, &["oauth-imap".to_string()], "revoked").await;
    let p = env
        .wait(
            "oauth-imap",
            "the revoked request answered",
            Duration::from_secs(30),
            |p| answered(p, "revoked"),
        )
        .await;
    assert_eq!(
        reason(&p),
        "AuthorizationRevoked",
        "{}\n{}",
        ready_message(&p),
        controller.logs()
    );
    assert_eq!(
        server.token_requests(),
        2,
        "the refused refresh was retried as if someone else had rotated the token"
    );
    crate::hostile::remove_policy(&env, &policy);
}

#[tokio::test]
async fn a_stopping_controller_stores_the_rotated_token_it_could_not_store_before() {
    let env = alice_env("oauth2-unsaved-stop").await;
    let (server, first) = rotating_grant(&env).await;
    let (mut controller, policy) = first_refresh_refused(&env, &server, &first).await;

    // Writes taken again, but no test due before the controller is stopped (a rollout):
    // it stores the rotated tokens on its way out instead of taking them with it.
    allow_token_writes(&env, &policy).await;
    let status = controller.terminate(Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "exit after SIGTERM: {status:?}\n{}",
        controller.logs()
    );
    assert_eq!(
        server.token_requests(),
        1,
        "stopping stores the kept tokens; it asks for none"
    );
    one_good_token(
        &env,
        &server,
        "after the controller stopped",
        &controller.logs(),
    )
    .await;
}

/// Two providers share a token Secret whose writes are refused: both warn. Once writes
/// are taken and one provider's test stores the kept tokens, the other is tested too and
/// loses its warning at once, not at its next interval.
#[tokio::test]
async fn once_kept_tokens_are_stored_no_provider_sharing_them_keeps_the_warning() {
    let env = alice_env("oauth2-unsaved-shared").await;
    let (server, _first) = rotating_grant(&env).await;
    env.apply(&oauth_imap(&env, &server));
    let pop3s = env.bed.dovecot().pop3s_port();
    env.apply(&oauth_alice(&server, "oauth-pop3", "POP3", pop3s));
    let policy = refuse_token_writes(&env).await;
    let controller = env.controller();
    let warned = |p: &mailroom::api::IncomingMailProvider| {
        ready_message(p).contains("could not be stored in Secret \"alice-token\"")
    };
    for name in ["oauth-imap", "oauth-pop3"] {
        env.wait(
            name,
            "a warning about the unstored tokens",
            Duration::from_secs(60),
            warned,
        )
        .await;
    }

    allow_token_writes(&env, &policy).await;
    fleet::request_checks(&env, &["oauth-imap".to_string()], "allowed").await;
    env.wait(
        "oauth-pop3",
        "Connected without the warning, with no request of its own",
        Duration::from_secs(20),
        |p| reason(p) == "Connected" && !warned(p),
    )
    .await;
    assert!(
        server.reused_refresh_tokens().is_empty(),
        "a refresh token was presented twice:\n{}",
        controller.logs()
    );
}
