//! OAuth2: manifests the API server refuses, XOAUTH2 and OAUTHBEARER against the bed's
//! Dovecot (which validates the bed's JWT access tokens), and the controller keeping
//! tokens fresh against the bed's test authorization server.

use std::time::Duration;

use mailroom::api::{Protocol, Reason, SaslMechanism, TlsMode};
use mailroom::probe::{self, Login, Target, Trust};
use secrecy::SecretString;

use crate::support::Env;

fn manifest(spec: &str) -> String {
    format!(
        "apiVersion: mailroom.dev/v1alpha1\nkind: IncomingMailProvider\nmetadata:\n  name: bad\nspec:\n  server: {{host: outlook.office365.com, protocol: IMAP}}\n{spec}"
    )
}

#[tokio::test]
async fn invalid_oauth2_manifests_are_rejected_with_the_field_named() {
    let env = Env::new("oauth2-invalid").await;
    let oauth = |block: &str| {
        format!(
            "  authentication:\n    method: OAuth2\n    oauth2: {{clientId: app, tokenSecretRef: {{name: t}}, {block}}}\n"
        )
    };
    let cases: Vec<(&str, String, &[&str])> = vec![
        (
            "OAuth2 without oauth2",
            "  authentication: {method: OAuth2}\n".into(),
            &["spec.authentication.oauth2", "oauth2 is required"],
        ),
        (
            "ClientCredentials with Google",
            oauth("provider: Google, flow: ClientCredentials, clientSecretRef: {name: s}"),
            &["spec.authentication.oauth2.flow", "Google"],
        ),
        (
            "a scope of 600 characters",
            oauth(&format!("provider: Google, scopes: [{}]", "s".repeat(600))),
            &["spec.authentication.oauth2.scopes[0]", "512"],
        ),
        (
            "DeviceCode with Google",
            oauth("provider: Google, flow: DeviceCode"),
            &["spec.authentication.oauth2.flow", "Google"],
        ),
        (
            "Generic without tokenURL",
            oauth("provider: Generic"),
            &[
                "spec.authentication.oauth2.tokenURL",
                "tokenURL is required",
            ],
        ),
        (
            "ClientCredentials without clientSecretRef",
            oauth("provider: Microsoft, tenant: contoso.com, flow: ClientCredentials"),
            &[
                "spec.authentication.oauth2.clientSecretRef",
                "clientSecretRef is required",
            ],
        ),
        (
            "ClientCredentials with tenant common",
            oauth(
                "provider: Microsoft, tenant: common, flow: ClientCredentials, clientSecretRef: {name: s}",
            ),
            &["spec.authentication.oauth2.tenant", "tenant id or domain"],
        ),
        (
            "ClientCredentials with tenant consumers",
            oauth(
                "provider: Microsoft, tenant: consumers, flow: ClientCredentials, clientSecretRef: {name: s}",
            ),
            &["spec.authentication.oauth2.tenant", "tenant id or domain"],
        ),
        (
            "unknown SASL mechanism",
            oauth("provider: Microsoft, saslMechanism: PLAIN"),
            &["spec.authentication.oauth2.saslMechanism", "XOAUTH2"],
        ),
        (
            "token without TLS",
            format!("  tls: {{mode: None}}\n{}", oauth("provider: Microsoft")),
            &["spec.authentication.allowUnencrypted", "without TLS"],
        ),
        (
            "token endpoint over http",
            oauth("provider: Generic, tokenURL: 'http://keycloak.auth.svc:8080/token'"),
            &["spec.authentication.oauth2.tokenURL", "https://"],
        ),
        (
            "authorization endpoint over http",
            oauth(
                "provider: Generic, tokenURL: 'https://id.example/token', authorizationURL: 'http://id.example/auth'",
            ),
            &["spec.authentication.oauth2.authorizationURL", "https://"],
        ),
        (
            "device endpoint on a host named like loopback",
            oauth(
                "provider: Generic, flow: DeviceCode, tokenURL: 'https://id.example/token', deviceAuthorizationURL: 'http://127.0.0.1.evil.example/device'",
            ),
            &[
                "spec.authentication.oauth2.deviceAuthorizationURL",
                "https://",
            ],
        ),
        (
            "revocation endpoint over plain http",
            oauth(
                "provider: Generic, tokenURL: 'https://id.example/token', revocationURL: 'http://id.example/revoke'",
            ),
            &["spec.authentication.oauth2.revocationURL", "https://"],
        ),
    ];
    let mut failures = Vec::new();
    for (what, spec, expected) in &cases {
        let out = env.try_apply(&manifest(spec));
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        if out.status.success() {
            failures.push(format!(
                "{what}: accepted, expected a rejection naming {expected:?}"
            ));
        } else if let Some(missing) = expected.iter().find(|e| !stderr.contains(*e)) {
            failures.push(format!(
                "{what}: rejection does not mention {missing:?}:\n{stderr}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Valid ones are accepted, with the defaults filled in by the API server.
    for ok in [
        oauth("provider: Microsoft"),
        oauth(
            "provider: Microsoft, tenant: contoso.onmicrosoft.com, flow: ClientCredentials, clientSecretRef: {name: s}",
        ),
        oauth("provider: Google"),
        // http to this host's loopback (a sidecar), or anywhere when allowed.
        oauth("provider: Generic, tokenURL: 'http://127.0.0.1:8080/token'"),
        oauth("provider: Generic, tokenURL: 'http://[::1]:8080/token'"),
        oauth("provider: Generic, tokenURL: 'HTTP://localhost/token'"),
        oauth("provider: Generic, tokenURL: 'http://keycloak.auth.svc:8080/token'").replace(
            "method: OAuth2",
            "method: OAuth2\n    allowUnencrypted: true",
        ),
        // The last one: its defaults are read back below.
        oauth("provider: Generic, tokenURL: 'https://id.example/token', flow: DeviceCode"),
    ] {
        let out = env.try_apply(&manifest(&ok));
        assert!(
            out.status.success(),
            "{ok}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = env.kubectl(&[
        "get",
        "imp",
        "bad",
        "-o",
        "jsonpath={.spec.authentication.oauth2.flow} {.spec.authentication.oauth2.saslMechanism}",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "DeviceCode Auto");
}

fn target(protocol: Protocol, port: u16) -> Target {
    let bed = mailroom_testbed::shared();
    Target {
        host: mailroom_testbed::MAIL_HOST.to_string(),
        port,
        protocol,
        tls_mode: TlsMode::Implicit,
        trust: Trust {
            extra_roots_pem: Some(bed.mail_ca_pem().into_bytes()),
            ..Default::default()
        },
        mailbox: "INBOX".into(),
        timeout: Duration::from_secs(10),
    }
}

fn oauth_login(user: &str, token: String, mechanism: SaslMechanism) -> Login {
    Login::OAuth2 {
        username: user.into(),
        token: SecretString::from(token),
        mechanism,
        allow_unencrypted: false,
    }
}

#[tokio::test]
async fn the_probe_logs_in_with_xoauth2_and_oauthbearer_over_imap_and_pop3() {
    let bed = mailroom_testbed::shared();
    let d = bed.dovecot();
    let key = bed.oauth();
    let cases = [
        (
            Protocol::Imap,
            d.imaps_port(),
            SaslMechanism::XOAuth2,
            "XOAUTH2",
        ),
        (
            Protocol::Imap,
            d.imaps_port(),
            SaslMechanism::OAuthBearer,
            "OAUTHBEARER",
        ),
        (
            Protocol::Imap,
            d.imaps_port(),
            SaslMechanism::Auto,
            "OAUTHBEARER",
        ),
        (
            Protocol::Pop3,
            d.pop3s_port(),
            SaslMechanism::XOAuth2,
            "XOAUTH2",
        ),
        (
            Protocol::Pop3,
            d.pop3s_port(),
            SaslMechanism::OAuthBearer,
            "OAUTHBEARER",
        ),
        (
            Protocol::Pop3,
            d.pop3s_port(),
            SaslMechanism::Auto,
            "OAUTHBEARER",
        ),
    ];
    for (protocol, port, mechanism, used) in cases {
        let token = key.access_token("alice", Duration::from_secs(300));
        let report = probe::run(
            &target(protocol, port),
            &oauth_login("alice", token.clone(), mechanism),
        )
        .await;
        assert!(
            report.passed(),
            "{protocol:?} with {mechanism:?}: {:?}\nDovecot's reasons (the bed is gone after the run):\n{}",
            report.failure,
            std::fs::read_to_string(d.log_path())
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("oauth2 failed"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert_eq!(report.findings.mechanism.as_deref(), Some(used));
        let shown = format!("{report:?}");
        assert!(!shown.contains(&token), "the token leaked into the report");
    }
}

#[tokio::test]
async fn a_token_the_server_rejects_is_authentication_failed_with_its_json_decoded() {
    let bed = mailroom_testbed::shared();
    let d = bed.dovecot();
    let key = bed.oauth();
    for (protocol, port, mechanism) in [
        (Protocol::Imap, d.imaps_port(), SaslMechanism::XOAuth2),
        (Protocol::Imap, d.imaps_port(), SaslMechanism::OAuthBearer),
        (Protocol::Pop3, d.pop3s_port(), SaslMechanism::XOAuth2),
        (Protocol::Pop3, d.pop3s_port(), SaslMechanism::OAuthBearer),
    ] {
        let forged = key.forged_token("alice", Duration::from_secs(300));
        let report = probe::run(
            &target(protocol, port),
            &oauth_login("alice", forged.clone(), mechanism),
        )
        .await;
        let failure = report
            .failure
            .clone()
            .unwrap_or_else(|| panic!("{protocol:?} {mechanism:?}: a forged token was accepted"));
        assert_eq!(failure.reason, Reason::AuthenticationFailed, "{failure:?}");
        assert!(
            failure.message.contains("the OAuth2 error was status"),
            "{protocol:?} {mechanism:?}: expected the decoded JSON in {:?}",
            failure.message
        );
        assert!(!format!("{report:?}").contains(&forged), "the token leaked");
    }
}

// ---------------------------------------------------------------------------------------
// The controller and the token manager, against the bed's test authorization server.

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use mailroom::credentials::tokens::{self, TokenManager};
use mailroom_testbed::TokenServer;

use crate::support::{provider, ready, trust_bed_ca};

const CLIENT: &str = "mailroom-test-app";

/// A provider of alice's mailbox whose tokens come from `server` (Generic by default,
/// or Microsoft with its URLs overridden).
fn oauth_provider(name: &str, protocol: &str, port: u16, oauth2: &str) -> String {
    provider(
        name,
        protocol,
        port,
        "Implicit",
        &format!("{{method: OAuth2, username: alice, oauth2: {{{oauth2}}}}}"),
        "",
    )
}

fn generic(server: &TokenServer, extra: &str) -> String {
    format!(
        "provider: Generic, clientId: {CLIENT}, tokenURL: '{}', tokenSecretRef: {{name: alice-token}}{extra}",
        server.token_url()
    )
}

/// Provider `imap`: alice over IMAPS with a Generic OAuth2 server's tokens in Secret
/// `alice-token`.
fn generic_imap(env: &Env, server: &TokenServer) -> String {
    generic_imap_with(env, server, "")
}

/// As [`generic_imap`], with `extra` appended to its `oauth2` fields.
fn generic_imap_with(env: &Env, server: &TokenServer, extra: &str) -> String {
    oauth_provider(
        "imap",
        "IMAP",
        env.bed.dovecot().imaps_port(),
        &generic(server, extra),
    )
}

/// A token server that knows the test's client, and a refresh token it granted alice.
fn alice_grant(env: &Env) -> (TokenServer, String) {
    let server = TokenServer::start(env.bed.oauth());
    server.register_client(CLIENT, None, None);
    let refresh = server.grant("alice", CLIENT);
    (server, refresh)
}

fn rfc3339_in(secs: i64) -> String {
    let now = k8s_openapi::jiff::Timestamp::now();
    now.checked_add(k8s_openapi::jiff::SignedDuration::from_secs(secs))
        .unwrap()
        .to_string()
}

/// Token Secret `alice-token` (marked as mailroom's) holding `refresh` and an access
/// token `access` that expired a minute ago: the next test must refresh.
async fn expired_token_secret(env: &Env, refresh: &str, access: &str) {
    env.token_secret(
        "alice-token",
        &[
            ("refresh_token", refresh),
            ("access_token", access),
            ("expires_at", &rfc3339_in(-60)),
        ],
    )
    .await;
}

/// Provider `imap` with alice's grant, whose cached access token (returned) the mail
/// server refuses, tested once by a running controller: AuthenticationFailed.
async fn refused_by_the_mail_server(
    prefix: &str,
) -> (Env, TokenServer, String, crate::support::Controller) {
    let env = Env::new(prefix).await;
    trust_bed_ca(&env).await;
    let (server, refresh) = alice_grant(&env);
    let forged = refused_from_cache(&env, &refresh, 3600).await;
    env.apply(&generic_imap(&env, &server));
    let controller = env.controller();
    env.wait_reason("imap", "AuthenticationFailed", Duration::from_secs(60))
        .await;
    (env, server, forged, controller)
}

/// Token Secret `alice-token` holding `refresh` and an access token the cache calls
/// valid for an hour, which the mail server refuses (as Exchange Online does one revoked
/// by continuous access evaluation); signed to live `ttl` seconds. Returns it.
async fn refused_from_cache(env: &Env, refresh: &str, ttl: u64) -> String {
    let forged = env
        .bed
        .oauth()
        .forged_token("alice", Duration::from_secs(ttl));
    env.token_secret(
        "alice-token",
        &[
            ("refresh_token", refresh),
            ("access_token", &forged),
            ("expires_at", &rfc3339_in(3600)),
        ],
    )
    .await;
    forged
}

async fn token_secret(env: &Env) -> Option<Secret> {
    Api::<Secret>::namespaced(env.client.clone(), &env.ns)
        .get_opt("alice-token")
        .await
        .unwrap()
}

fn key_of(secret: &Secret, key: &str) -> String {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| String::from_utf8_lossy(&b.0).to_string())
        .unwrap_or_default()
}

#[tokio::test]
async fn client_credentials_is_ready_with_no_authorize_step_and_no_secret_leaks() {
    let env = Env::new("oauth2-app").await;
    trust_bed_ca(&env).await;
    let server = TokenServer::start(env.bed.oauth());
    const CLIENT_SECRET: &str = "Pl4nted-Client-Secret-41c9";
    server.register_client(CLIENT, Some(CLIENT_SECRET), Some("alice"));
    // Tokens shorter than the refresh margin: every test asks for a new one.
    server.set_access_ttl(Duration::from_secs(120));
    env.secret("app-secret", &[("client-secret", CLIENT_SECRET)])
        .await;
    let d = env.bed.dovecot();
    // Microsoft's app-only flow, its token URL pointed at the test server. The token
    // Secret does not exist: an app-only token replaces nothing, so memory holds it, and
    // the controller, which may not create Secrets, creates none.
    env.apply(&oauth_provider(
        "app",
        "IMAP",
        d.imaps_port(),
        &format!(
            "provider: Microsoft, flow: ClientCredentials, tenant: contoso.onmicrosoft.com, clientId: {CLIENT}, clientSecretRef: {{name: app-secret}}, tokenURL: '{}', tokenSecretRef: {{name: alice-token}}",
            server.token_url()
        ),
    ));
    let controller = env.controller();
    let p = env
        .wait_reason("app", "Connected", Duration::from_secs(60))
        .await;
    let message = &ready(&p).unwrap().message;
    assert!(message.contains("OAuth2"), "{message}");
    assert!(
        token_secret(&env).await.is_none(),
        "the controller created the token Secret"
    );

    // Once a Secret marked as mailroom's is there, the token is stored in it (replicas and
    // restarts share it).
    env.token_secret("alice-token", &[]).await;
    env.kubectl(&[
        "annotate",
        "imp/app",
        "mailroom.dev/check-requested-at=stored",
        "--overwrite",
    ]);
    env.wait(
        "app",
        "the check request answered",
        Duration::from_secs(30),
        |p| {
            p.status
                .as_ref()
                .and_then(|s| s.last_handled_check_request.as_deref())
                == Some("stored")
        },
    )
    .await;
    let secret = token_secret(&env).await.unwrap();
    let access = key_of(&secret, tokens::ACCESS_TOKEN);
    assert!(access.len() > 20, "no access token stored: {secret:?}");

    assert!(
        server.token_requests() >= 2,
        "the second test asked for no token: {}",
        server.token_requests()
    );
    let issued = server.issued_access_tokens();
    for (place, text) in crate::support::outputs(&env, controller.logs()).await {
        assert!(
            !text.contains(CLIENT_SECRET),
            "the client secret appeared in the {place}"
        );
        for token in &issued {
            assert!(
                !text.contains(token.as_str()),
                "an access token appeared in the {place}"
            );
        }
    }
}

#[tokio::test]
async fn an_expired_token_is_refreshed_and_the_rotated_refresh_token_stored() {
    let env = Env::new("oauth2-refresh").await;
    trust_bed_ca(&env).await;
    let server = TokenServer::start(env.bed.oauth());
    server.register_client(CLIENT, None, None);
    let old_refresh = server.grant("alice", CLIENT);
    let old_access = env
        .bed
        .oauth()
        .access_token("alice", Duration::from_secs(1));
    expired_token_secret(&env, &old_refresh, &old_access).await;
    let d = env.bed.dovecot();
    env.apply(&oauth_provider(
        "imap",
        "IMAP",
        d.imaps_port(),
        &generic(&server, ", saslMechanism: XOAUTH2"),
    ));
    env.apply(&oauth_provider(
        "pop3",
        "POP3",
        d.pop3s_port(),
        &generic(&server, ", saslMechanism: OAUTHBEARER"),
    ));
    let controller = env.controller();
    let imap = env
        .wait_reason("imap", "Connected", Duration::from_secs(60))
        .await;
    let pop3 = env
        .wait_reason("pop3", "Connected", Duration::from_secs(60))
        .await;
    assert!(
        ready(&imap).unwrap().message.contains("XOAUTH2"),
        "{:?}",
        ready(&imap)
    );
    assert!(
        ready(&pop3).unwrap().message.contains("OAUTHBEARER"),
        "{:?}",
        ready(&pop3)
    );

    let secret = token_secret(&env).await.unwrap();
    let new_refresh = key_of(&secret, tokens::REFRESH_TOKEN);
    let new_access = key_of(&secret, tokens::ACCESS_TOKEN);
    assert_ne!(
        new_refresh, old_refresh,
        "the rotated refresh token is in the Secret"
    );
    assert!(
        server.refresh_token_valid(&new_refresh),
        "the stored refresh token works"
    );
    assert!(
        !server.refresh_token_valid(&old_refresh),
        "the old one no longer works"
    );
    assert_ne!(new_access, old_access);
    assert!(
        server.reused_refresh_tokens().is_empty(),
        "two providers sharing one token Secret refreshed it once, not twice"
    );
    let (_, metrics) = controller.get("/metrics").await;
    assert!(
        metrics.contains("mailroom_token_refreshes_total{result=\"refreshed\"} 1"),
        "the refresh is counted once:\n{metrics}"
    );
    for (place, text) in crate::support::outputs(&env, controller.logs()).await {
        for planted in [&old_refresh, &new_refresh, &new_access] {
            assert!(
                !text.contains(planted.as_str()),
                "a token appeared in the {place}"
            );
        }
    }
}

/// Sharded, the providers of one token Secret are tested by one replica, the Secret's,
/// whatever their names: in two replicas, each took the other's write-back of the tokens
/// for a change of its Secret and tested again, and with access tokens shorter than the
/// five minutes they are refreshed ahead of, each test refreshed: a loop of token
/// requests and logins.
#[tokio::test]
async fn the_providers_of_one_token_secret_are_tested_by_one_shard() {
    use mailroom::controller::shard::shard_of;
    let env = Env::new("oauth2-shards").await;
    trust_bed_ca(&env).await;
    let (server, refresh) = alice_grant(&env);
    server.set_access_ttl(Duration::from_secs(120));
    expired_token_secret(&env, &refresh, "x").await;
    // Two names that the shards, by name, would split.
    let first = "imap-0".to_string();
    let second = (1..)
        .map(|i| format!("imap-{i}"))
        .find(|n| shard_of(&env.ns, n, 3) != shard_of(&env.ns, &first, 3))
        .unwrap();
    let port = env.bed.dovecot().imaps_port();
    for name in [&first, &second] {
        env.apply(&oauth_provider(name, "IMAP", port, &generic(&server, "")));
    }
    let mut shards: Vec<_> = (0..3)
        .map(|i| env.controller_with(&["--shard-index", &i.to_string(), "--shard-count", "3"]))
        .collect();
    for name in [&first, &second] {
        env.wait_reason(name, "Connected", Duration::from_secs(60))
            .await;
    }
    let requests = server.token_requests();
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert!(
        server.token_requests() <= requests + 1,
        "{} token requests in 20 s after both were Connected (interval 5m)",
        server.token_requests() - requests
    );
    let owner = shard_of(&env.ns, "alice-token", 3) as usize;
    for (i, c) in shards.iter().enumerate() {
        let expected = if i == owner { 2 } else { 0 };
        assert_eq!(c.tests(), expected, "shard {i}:\n{}", c.logs());
    }
    assert!(
        server.reused_refresh_tokens().is_empty(),
        "one refresh token redeemed twice"
    );
    for c in &mut shards {
        assert!(
            c.terminate(Duration::from_secs(15))
                .is_some_and(|s| s.success())
        );
    }
}

#[tokio::test]
async fn a_revoked_grant_is_authorization_revoked() {
    let env = Env::new("oauth2-revoked").await;
    trust_bed_ca(&env).await;
    let (server, refresh) = alice_grant(&env);
    server.revoke_user("alice");
    expired_token_secret(&env, &refresh, "x").await;
    env.apply(&generic_imap(&env, &server));
    let _controller = env.controller();
    let p = env
        .wait_reason("imap", "AuthorizationRevoked", Duration::from_secs(60))
        .await;
    let message = &ready(&p).unwrap().message;
    assert!(
        message.contains("invalid_grant") && message.contains("AADSTS50173"),
        "{message}"
    );
    assert!(
        message.contains(&format!("mailroom authorize imap -n {}", env.ns)),
        "{message}"
    );
}

#[tokio::test]
async fn a_sign_in_asked_for_again_by_the_identity_provider_is_authorization_revoked() {
    let env = Env::new("oauth2-interaction").await;
    trust_bed_ca(&env).await;
    let (server, refresh) = alice_grant(&env);
    // Microsoft Entra after a Conditional Access policy began to ask for MFA: the
    // refresh token is not dead, but only the user can get past this.
    server.refuse_next(
        "interaction_required",
        "AADSTS50076: Due to a configuration change made by your administrator, or because you moved to a new location, you must use multi-factor authentication to access '00000002-0000-0ff1-ce00-000000000000'.",
    );
    expired_token_secret(&env, &refresh, "x").await;
    env.apply(&generic_imap(&env, &server));
    let controller = env.controller();
    let p = env
        .wait_reason("imap", "AuthorizationRevoked", Duration::from_secs(60))
        .await;
    let message = &ready(&p).unwrap().message;
    assert!(
        message.contains("interaction_required") && message.contains("AADSTS50076"),
        "{message}"
    );
    assert!(
        message.contains(&format!("mailroom authorize imap -n {}", env.ns)),
        "{message}"
    );
    let series = "mailroom_token_refreshes_total{result=\"revoked\"} 1";
    let metrics = controller
        .metrics_with(&[series], Duration::from_secs(10))
        .await;
    assert!(metrics.contains(series), "counted as revoked:\n{metrics}");
}

#[tokio::test]
async fn the_controller_writes_tokens_only_into_a_secret_marked_as_holding_them() {
    let env = Env::new("oauth2-unmarked").await;
    trust_bed_ca(&env).await;
    let (server, refresh) = alice_grant(&env);
    // A Secret some other application keeps, with keys of the same names: whoever may
    // edit providers names it as a token Secret.
    env.secret(
        "alice-token",
        &[
            ("refresh_token", &refresh),
            ("access_token", "another-apps-token"),
            ("expires_at", &rfc3339_in(-60)),
            ("other", "untouched"),
        ],
    )
    .await;
    let before = token_secret(&env).await.unwrap();
    env.apply(&generic_imap(&env, &server));
    let _controller = env.controller();
    let p = env
        .wait_reason("imap", "AuthorizationRequired", Duration::from_secs(60))
        .await;
    let message = &ready(&p).unwrap().message;
    assert!(
        message.contains(&format!(
            "kubectl label secret alice-token -n {} {}=true",
            env.ns,
            tokens::TOKEN_LABEL
        )) && message.contains(&format!("mailroom authorize imap -n {}", env.ns)),
        "the message says how to mark the Secret: {message}"
    );
    assert_eq!(server.token_requests(), 0, "no refresh it could not store");
    let after = token_secret(&env).await.unwrap();
    assert_eq!(after.data, before.data, "the Secret was written");
    assert_eq!(
        after.metadata.resource_version,
        before.metadata.resource_version
    );

    // Marked by someone who may write it: the next test refreshes and stores there.
    let out = env.kubectl(&[
        "label",
        "secret",
        "alice-token",
        &format!("{}=true", tokens::TOKEN_LABEL),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.wait_reason("imap", "Connected", Duration::from_secs(60))
        .await;
    assert_eq!(server.token_requests(), 1);
    let stored = token_secret(&env).await.unwrap();
    let data = stored.data.unwrap();
    assert_ne!(data[tokens::ACCESS_TOKEN].0, b"another-apps-token");
    assert_eq!(data["other"].0, b"untouched", "other keys are kept");
}

#[tokio::test]
async fn a_token_server_that_is_down_leaves_a_valid_token_in_use_then_fails() {
    let env = Env::new("oauth2-down").await;
    trust_bed_ca(&env).await;
    let server = TokenServer::start(env.bed.oauth());
    server.register_client(CLIENT, None, None);
    server.set_down(true);
    let refresh = server.grant("alice", CLIENT);
    // Valid for 4 more minutes: due for a refresh, still good for tests.
    let access = env
        .bed
        .oauth()
        .access_token("alice", Duration::from_secs(240));
    env.token_secret(
        "alice-token",
        &[
            ("refresh_token", &refresh),
            ("access_token", &access),
            ("expires_at", &rfc3339_in(240)),
        ],
    )
    .await;
    env.apply(&generic_imap(&env, &server));
    let controller = env.controller();
    env.wait_reason("imap", "Connected", Duration::from_secs(60))
        .await;
    assert!(
        controller.logs().contains("token refresh failed"),
        "the failed refresh is logged:\n{}",
        controller.logs()
    );
    // And counted, while the old token still serves: the warning comes before the
    // mailbox fails, not with it.
    let series = "mailroom_token_refreshes_total{result=\"failed\"} 1";
    let metrics = controller
        .metrics_with(&[series], Duration::from_secs(10))
        .await;
    assert!(
        metrics.contains(series),
        "a failed refresh counted:\n{metrics}"
    );
    // Once no valid token is left, the provider says why.
    env.token_secret(
        "alice-token",
        &[
            ("refresh_token", &refresh),
            ("access_token", &access),
            ("expires_at", &rfc3339_in(-1)),
        ],
    )
    .await;
    let p = env
        .wait_reason("imap", "TokenRefreshFailed", Duration::from_secs(60))
        .await;
    let message = &ready(&p).unwrap().message;
    assert!(message.contains(&server.token_url()), "{message}");
    // And when the server is back, the next test refreshes.
    server.set_down(false);
    env.kubectl(&[
        "annotate",
        "imp/imap",
        "mailroom.dev/check-requested-at=again",
        "--overwrite",
    ]);
    env.wait_reason("imap", "Connected", Duration::from_secs(60))
        .await;
}

/// Providers sharing one client's token endpoint, which fails: it is asked once, then
/// again after 10 s, 20 s, …, not by every test of every provider (one after another
/// under the token Secret's lock, each holding its mail host's slot). A test a person
/// asks for asks again at once.
#[tokio::test]
async fn a_failing_token_endpoint_is_not_asked_by_every_test() {
    let env = Env::new("oauth2-failing").await;
    trust_bed_ca(&env).await;
    let (server, refresh) = alice_grant(&env);
    server.set_down(true);
    expired_token_secret(&env, &refresh, "x").await;
    let names: Vec<String> = (0..6).map(|i| format!("imap-{i}")).collect();
    for name in &names {
        env.apply(&oauth_provider(
            name,
            "IMAP",
            env.bed.dovecot().imaps_port(),
            &generic(&server, ""),
        ));
    }
    let _controller = env.controller();
    for name in &names {
        env.wait_reason(name, "TokenRefreshFailed", Duration::from_secs(60))
            .await;
    }
    let first = server.dropped_connections();
    assert!(first >= 1);
    // Each provider's own retries (10 s, 20 s) come within these 25 s: 12 requests or
    // more if each asked.
    tokio::time::sleep(Duration::from_secs(25)).await;
    let asked = server.dropped_connections();
    assert!(asked <= 3, "{asked} token requests in 25 s");
    // Those not asking say when it will be asked again (the one that asked last, which
    // one depends on the timing, says what the endpoint answered).
    let mut messages = Vec::new();
    for name in &names {
        let p = env
            .wait_reason(name, "TokenRefreshFailed", Duration::from_secs(5))
            .await;
        messages.push(ready(&p).unwrap().message.clone());
    }
    assert!(
        messages
            .iter()
            .any(|m| m.contains("not asked again before"))
            && messages.iter().all(|m| m.contains(&server.token_url())),
        "{messages:#?}"
    );
    // The endpoint is back, and a person asks for a test: it asks at once.
    server.set_down(false);
    let p = env.retest("imap-0", "after-the-fix").await;
    assert_eq!(ready(&p).unwrap().reason, "Connected", "{:?}", ready(&p));
}

#[tokio::test]
async fn a_token_endpoint_that_asks_to_retry_later_is_not_asked_again_before_then() {
    let env = Env::new("oauth2-throttled").await;
    trust_bed_ca(&env).await;
    let (server, refresh) = alice_grant(&env);
    server.answer_next(
        429,
        &[("Retry-After", "30")],
        serde_json::json!({"error": "temporarily_unavailable", "error_description": "AADSTS50196: The server terminated an operation because it encountered a client request loop."}),
    );
    expired_token_secret(&env, &refresh, "x").await;
    env.apply(&generic_imap(&env, &server));
    let _controller = env.controller();
    let p = env
        .wait_reason("imap", "TokenRefreshFailed", Duration::from_secs(60))
        .await;
    let message = &ready(&p).unwrap().message;
    assert!(message.contains("throttled until"), "{message}");
    assert_eq!(server.token_requests(), 1);
    // Tests asked for within the 30 s do not call the token endpoint.
    for request in ["throttled-1", "throttled-2"] {
        let p = env.retest("imap", request).await;
        let c = ready(&p).unwrap();
        assert_eq!(c.reason, "TokenRefreshFailed");
        assert!(c.message.contains("throttled until"), "{}", c.message);
    }
    assert_eq!(server.token_requests(), 1, "asked again while throttled");
}

#[tokio::test]
async fn no_token_is_authorization_required_with_the_command() {
    let env = Env::new("oauth2-none").await;
    trust_bed_ca(&env).await;
    let server = TokenServer::start(env.bed.oauth());
    env.apply(&generic_imap(&env, &server));
    env.apply(&oauth_provider(
        "dev",
        "IMAP",
        env.bed.dovecot().imaps_port(),
        &generic(&server, ", flow: DeviceCode"),
    ));
    let _controller = env.controller();
    let p = env
        .wait_reason("imap", "AuthorizationRequired", Duration::from_secs(60))
        .await;
    let message = &ready(&p).unwrap().message;
    assert!(
        message.contains(&format!("`mailroom authorize imap -n {}`", env.ns)),
        "{message}"
    );
    let p = env
        .wait_reason("dev", "AuthorizationRequired", Duration::from_secs(60))
        .await;
    let message = &ready(&p).unwrap().message;
    assert!(
        message.contains(&format!("`mailroom authorize dev -n {} --device`", env.ns)),
        "{message}"
    );
}

/// A token Secret changed while no controller runs (a person puts other tokens in it during
/// a rollout) is seen by the next one at once, as any Secret a provider references is:
/// the provider, Ready with tokens the mail server now refuses, says so now, not at its
/// next interval (five minutes here, an hour for many). The controller's own write-back of refreshed
/// tokens is no such change: a restart after it tests nothing early.
#[tokio::test]
async fn a_token_secret_changed_while_no_controller_ran_is_tested_at_once() {
    let env = Env::new("oauth2-offline").await;
    trust_bed_ca(&env).await;
    let (server, refresh) = alice_grant(&env);
    let expired = env
        .bed
        .oauth()
        .access_token("alice", Duration::from_secs(1));
    expired_token_secret(&env, &refresh, &expired).await;
    env.apply(&generic_imap(&env, &server));
    let mut controller = env.controller();
    let p = env
        .wait_reason("imap", "Connected", Duration::from_secs(60))
        .await;
    let tested = p.status.unwrap().last_check_time;
    assert_ne!(
        key_of(&token_secret(&env).await.unwrap(), tokens::ACCESS_TOKEN),
        expired,
        "the controller refreshed the token and wrote it back"
    );
    assert!(controller.terminate(Duration::from_secs(30)).is_some());

    // Started again: its own write-back is no news.
    let mut controller = env.controller();
    let started = std::time::Instant::now();
    while controller.get("/readyz").await.0 != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "not ready:\n{}",
            controller.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let p = env.providers().get("imap").await.unwrap();
    assert_eq!(
        p.status.unwrap().last_check_time,
        tested,
        "tested again after a restart for the controller's own token write:\n{}",
        controller.logs()
    );
    assert!(controller.terminate(Duration::from_secs(30)).is_some());

    // Changed while no controller runs (an access token for an hour that the mail server
    // refuses): the next one tests at once.
    refused_from_cache(&env, &refresh, 3600).await;
    let controller = env.controller();
    let started = std::time::Instant::now();
    env.wait_reason("imap", "AuthenticationFailed", Duration::from_secs(30))
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "AuthenticationFailed {:?} after the start:\n{}",
        started.elapsed(),
        controller.logs()
    );
}

#[tokio::test]
async fn a_token_the_mail_server_rejects_is_authentication_failed_in_status() {
    let env = Env::new("oauth2-rejected").await;
    trust_bed_ca(&env).await;
    let server = TokenServer::start(env.bed.oauth());
    let forged = refused_from_cache(&env, "unused", 3600).await;
    env.apply(&oauth_provider(
        "pop3",
        "POP3",
        env.bed.dovecot().pop3s_port(),
        &generic(&server, ""),
    ));
    let controller = env.controller();
    let p = env
        .wait_reason("pop3", "AuthenticationFailed", Duration::from_secs(60))
        .await;
    let message = &ready(&p).unwrap().message;
    assert!(message.contains("the OAuth2 error was status"), "{message}");
    crate::support::assert_nowhere(&env, &controller.logs(), &[&forged]).await;
}

#[tokio::test]
async fn a_cached_token_the_mail_server_refuses_is_refreshed_before_the_next_test() {
    let (env, server, _forged, _controller) =
        refused_by_the_mail_server("oauth2-refused-cached").await;
    // The grant is fine: the next test refreshes, and recovers.
    env.retest("imap", "after-refusal").await;
    env.wait_reason("imap", "Connected", Duration::from_secs(30))
        .await;
    assert_eq!(server.token_requests(), 1);

    // The grant revoked too: the next test says so, not at the token's expiry.
    let live = server.live_refresh_tokens("alice");
    assert_eq!(live.len(), 1, "{live:?}");
    server.revoke_user("alice");
    // Another refused token than the first, which the controller already knows.
    refused_from_cache(&env, &live[0], 3500).await;
    env.wait_reason("imap", "AuthenticationFailed", Duration::from_secs(30))
        .await;
    env.retest("imap", "after-revocation").await;
    let p = env
        .wait_reason("imap", "AuthorizationRevoked", Duration::from_secs(30))
        .await;
    let message = &ready(&p).unwrap().message;
    assert!(
        message.contains(&format!("mailroom authorize imap -n {}", env.ns)),
        "{message}"
    );
}

/// A token endpoint that answers a refresh with the very access token the mail server
/// refused (some cache client-credentials tokens) is asked once per refusal, not before
/// every test.
#[tokio::test]
async fn a_refused_token_refreshed_into_itself_is_not_refreshed_at_every_test() {
    let (env, server, forged, _controller) = refused_by_the_mail_server("oauth2-same-token").await;
    server.answer_next(
        200,
        &[],
        serde_json::json!({"access_token": forged, "token_type": "Bearer", "expires_in": 3600}),
    );
    env.retest("imap", "first").await;
    assert_eq!(server.token_requests(), 1, "refreshed after the refusal");
    env.retest("imap", "second").await;
    env.retest("imap", "third").await;
    assert_eq!(
        server.token_requests(),
        1,
        "refreshed again for the same refusal"
    );
    let p = env.providers().get("imap").await.unwrap();
    assert_eq!(ready(&p).unwrap().reason, "AuthenticationFailed");
}

/// At trace level, where every library logs all it does, no token and no client secret
/// reaches the controller's log, the status or an Event, through a refresh and a test.
#[tokio::test]
async fn tokens_and_the_client_secret_appear_nowhere_at_trace_level() {
    let env = Env::new("oauth2-secrecy").await;
    trust_bed_ca(&env).await;
    const CLIENT_SECRET: &str = "Pl4nted-Client-Secret-b81e";
    let server = TokenServer::start(env.bed.oauth());
    server.register_client(CLIENT, Some(CLIENT_SECRET), None);
    let refresh = server.grant("alice", CLIENT);
    env.secret("app-secret", &[("client-secret", CLIENT_SECRET)])
        .await;
    expired_token_secret(&env, &refresh, "Pl4nted-Expired-Access-77c1").await;
    env.apply(&generic_imap_with(
        &env,
        &server,
        ", clientSecretRef: {name: app-secret}",
    ));
    let controller = env.controller_with(&["--log", "trace"]);
    env.wait_reason("imap", "Connected", Duration::from_secs(60))
        .await;
    assert_eq!(server.token_requests(), 1, "{}", controller.logs());
    let secret = token_secret(&env).await.unwrap();
    let planted = [
        CLIENT_SECRET.to_string(),
        refresh,
        "Pl4nted-Expired-Access-77c1".to_string(),
        key_of(&secret, tokens::ACCESS_TOKEN),
        key_of(&secret, tokens::REFRESH_TOKEN),
    ];
    let values: Vec<&str> = planted.iter().map(String::as_str).collect();
    crate::support::assert_nowhere(&env, &controller.logs(), &values).await;
}

#[tokio::test]
async fn two_refreshers_racing_leave_one_valid_token() {
    let env = Env::new("oauth2-race").await;
    let server = TokenServer::start(env.bed.oauth());
    server.register_client(CLIENT, None, None);
    let p: mailroom::api::IncomingMailProvider = serde_yaml::from_str(&oauth_provider(
        "imap",
        "IMAP",
        env.bed.dovecot().imaps_port(),
        &generic(&server, ""),
    ))
    .unwrap();
    let mut p = p;
    p.metadata.namespace = Some(env.ns.clone());
    // Two managers: two replicas, each with its own locks.
    // The bed's identity provider is on this host's loopback.
    let a = TokenManager::new(env.client.clone())
        .unwrap()
        .allowing_loopback();
    let b = TokenManager::new(env.client.clone())
        .unwrap()
        .allowing_loopback();
    for round in 0..15 {
        server.revoke_user("alice");
        let refresh = server.grant("alice", CLIENT);
        expired_token_secret(&env, &refresh, "stale").await;
        let fetched = || mailroom::credentials::Fetched {
            namespace: env.ns.clone(),
            ..Default::default()
        };
        let (fa, fb) = tokio::join!(a.prepare(&p, fetched()), b.prepare(&p, fetched()));
        for (who, f) in [("a", &fa), ("b", &fb)] {
            assert!(
                f.token_problem.is_none(),
                "round {round}: replica {who}: {:?}",
                f.token_problem
            );
            let login = mailroom::credentials::login(&p.spec, f).unwrap();
            let report = probe::run(
                &target(Protocol::Imap, env.bed.dovecot().imaps_port()),
                &login,
            )
            .await;
            assert!(
                report.passed(),
                "round {round}: replica {who}'s token: {:?}",
                report.failure
            );
        }
        let stored = key_of(&token_secret(&env).await.unwrap(), tokens::REFRESH_TOKEN);
        assert!(
            server.refresh_token_valid(&stored),
            "round {round}: the Secret's refresh token no longer works"
        );
        assert_eq!(
            server.live_refresh_tokens("alice"),
            vec![stored],
            "round {round}: one valid token"
        );
    }
}

// ---------------------------------------------------------------------------------------
// `mailroom authorize`, with the test playing the user's browser.

use std::io::{BufRead as _, Read as _, Write as _};
use std::process::{Command, Stdio};
use std::sync::mpsc;

/// Starts `mailroom authorize` and hands its stderr lines to a channel.
fn authorize(env: &Env, args: &[&str]) -> (std::process::Child, mpsc::Receiver<String>) {
    let mut child = Command::new(crate::support::MAILROOM)
        .arg("authorize")
        .args(args)
        .args(["-n", &env.ns, "--no-browser", "--timeout", "60"])
        .env("KUBECONFIG", env.bed.kubeconfig_path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// The first line satisfying `pick`, within 30 s; all lines seen so far go to `seen`.
fn line_with(
    rx: &mpsc::Receiver<String>,
    seen: &mut String,
    pick: impl Fn(&str) -> bool,
) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                seen.push_str(&line);
                seen.push('\n');
                if pick(&line) {
                    return line;
                }
            }
            Err(_) => panic!("mailroom authorize printed no such line; it printed:\n{seen}"),
        }
    }
}

/// Waits for the CLI to exit; its exit code, stdout and the rest of stderr.
fn finish(
    mut child: std::process::Child,
    rx: mpsc::Receiver<String>,
    seen: &mut String,
) -> (Option<i32>, String) {
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    let status = child.wait().unwrap();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(1)) {
        seen.push_str(&line);
        seen.push('\n');
    }
    (status.code(), stdout)
}

/// Plays the browser's last step: the redirect to the loopback listener.
fn follow_redirect(url: &str) {
    let rest = url.strip_prefix("http://").unwrap();
    let (authority, path) = rest.split_at(rest.find('/').unwrap());
    let mut conn = std::net::TcpStream::connect(authority).unwrap();
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut page = String::new();
    conn.read_to_string(&mut page).unwrap();
    assert!(
        page.contains("Signed in"),
        "the loopback listener answered:\n{page}"
    );
}

#[tokio::test]
async fn authorize_with_a_browser_then_ready_over_imaps_xoauth2_and_pop3s_oauthbearer() {
    let env = Env::new("oauth2-authorize").await;
    trust_bed_ca(&env).await;
    let server = TokenServer::start(env.bed.oauth());
    server.register_client(CLIENT, None, None);
    let d = env.bed.dovecot();
    // IMAP through the Generic provider, POP3 through Microsoft with its URLs overridden.
    env.apply(&oauth_provider(
        "imap",
        "IMAP",
        d.imaps_port(),
        &generic(
            &server,
            &format!(
                ", authorizationURL: '{}', saslMechanism: XOAUTH2",
                server.authorization_url()
            ),
        ),
    ));
    env.apply(&oauth_provider(
        "pop3",
        "POP3",
        d.pop3s_port(),
        &format!(
            "provider: Microsoft, tenant: contoso.onmicrosoft.com, clientId: {CLIENT}, authorizationURL: '{}', tokenURL: '{}', tokenSecretRef: {{name: alice-pop-token}}, saslMechanism: OAUTHBEARER",
            server.authorization_url(),
            server.token_url()
        ),
    ));
    let controller = env.controller();
    env.wait_reason("imap", "AuthorizationRequired", Duration::from_secs(60))
        .await;

    let mut outputs_seen = String::new();
    for (name, mechanism) in [("imap", "XOAUTH2"), ("pop3", "OAUTHBEARER")] {
        let (child, rx) = authorize(&env, &[name]);
        let mut seen = String::new();
        let url = line_with(&rx, &mut seen, |l| l.trim_start().starts_with("http"));
        let url = url.trim();
        if name == "pop3" {
            assert!(
                url.contains("POP.AccessAsUser.All") && url.contains("offline_access"),
                "{url}"
            );
        }
        let redirect = server.sign_in(url, "alice").unwrap();
        let code = redirect
            .split("code=")
            .nth(1)
            .unwrap()
            .split('&')
            .next()
            .unwrap()
            .to_string();
        if name == "pop3" {
            // A gateway's passing error at the code exchange, after the person signed in:
            // asked again, not a sign-in lost.
            server.answer_next(502, &[], serde_json::json!("<html>Bad Gateway</html>"));
        }
        follow_redirect(&redirect);
        let (code_status, stdout) = finish(child, rx, &mut seen);
        assert_eq!(code_status, Some(0), "authorize {name}:\n{seen}{stdout}");
        if name == "pop3" {
            assert!(seen.contains("HTTP 502; trying again in 1 s"), "{seen}");
        }
        assert!(stdout.contains("Ready=True Connected"), "{stdout}");
        let p = env
            .wait_reason(name, "Connected", Duration::from_secs(5))
            .await;
        assert!(
            ready(&p).unwrap().message.contains(mechanism),
            "{:?}",
            ready(&p)
        );
        assert!(
            !seen.contains(&code) && !stdout.contains(&code),
            "the authorization code was printed"
        );
        outputs_seen.push_str(&seen);
        outputs_seen.push_str(&stdout);
    }
    let secret = token_secret(&env).await.unwrap();
    assert_eq!(
        secret
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(tokens::TOKEN_LABEL))
            .map(String::as_str),
        Some("true")
    );
    let refresh = key_of(&secret, tokens::REFRESH_TOKEN);
    let access = key_of(&secret, tokens::ACCESS_TOKEN);
    assert!(server.refresh_token_valid(&refresh));
    let mut places = crate::support::outputs(&env, controller.logs()).await;
    places.push(("mailroom authorize output", outputs_seen));
    for (place, text) in places {
        assert!(
            !text.contains(&refresh) && !text.contains(&access),
            "a token appeared in the {place}"
        );
    }

    // --revoke removes the tokens; the controller then asks for an authorize again.
    let (child, rx) = authorize(&env, &["imap", "--revoke"]);
    let mut seen = String::new();
    let (code_status, _) = finish(child, rx, &mut seen);
    assert_eq!(code_status, Some(0), "{seen}");
    assert!(
        token_secret(&env).await.is_none(),
        "the token Secret is gone"
    );
    env.wait_reason("imap", "AuthorizationRequired", Duration::from_secs(60))
        .await;
    assert!(seen.contains("Removed the tokens of"), "{seen}");

    // Again, with no Secret left: nothing is said to be removed.
    let (child, rx) = authorize(&env, &["imap", "--revoke"]);
    let mut seen = String::new();
    let (code_status, _) = finish(child, rx, &mut seen);
    assert_eq!(code_status, Some(0), "{seen}");
    assert!(seen.contains("no tokens to remove"), "{seen}");
    assert!(!seen.contains("Removed the tokens"), "{seen}");
}

/// A token Secret that also holds other data (authorize labels any Secret it writes
/// into) keeps that data on --revoke: only the token keys go.
#[tokio::test]
async fn revoke_removes_only_the_tokens_from_a_secret_that_holds_more() {
    let env = Env::new("oauth2-revoke-keeps").await;
    let (server, refresh) = alice_grant(&env);
    env.apply(&generic_imap(&env, &server));
    env.token_secret(
        "alice-token",
        &[
            (tokens::REFRESH_TOKEN, refresh.as_str()),
            ("team-note", "kept by its owner"),
        ],
    )
    .await;
    let (child, rx) = authorize(&env, &["imap", "--revoke"]);
    let mut seen = String::new();
    let (code_status, _) = finish(child, rx, &mut seen);
    assert_eq!(code_status, Some(0), "{seen}");
    let secret = token_secret(&env).await.expect("the Secret is kept");
    assert_eq!(key_of(&secret, "team-note"), "kept by its owner");
    assert_eq!(key_of(&secret, tokens::REFRESH_TOKEN), "");
    // No revocation endpoint: the refresh token still works there, and the output says so.
    assert!(server.refresh_token_valid(&refresh));
    assert!(seen.contains("has no revocation endpoint"), "{seen}");

    // With one (RFC 7009), it is revoked at the server too.
    env.apply(&generic_imap_with(
        &env,
        &server,
        &format!(", revocationURL: '{}'", server.revocation_url()),
    ));
    let again = server.grant("alice", CLIENT);
    env.token_secret("alice-token", &[(tokens::REFRESH_TOKEN, again.as_str())])
        .await;
    let (child, rx) = authorize(&env, &["imap", "--revoke"]);
    let mut seen = String::new();
    let (code_status, _) = finish(child, rx, &mut seen);
    assert_eq!(code_status, Some(0), "{seen}");
    assert!(seen.contains("Revoked the refresh token at"), "{seen}");
    assert!(
        !server.refresh_token_valid(&again),
        "the refresh token still works at the server"
    );

    // A CA bundle for the endpoints that cannot be read: revoking there is said to have
    // failed, and the tokens still leave the Secret.
    env.apply(&generic_imap_with(
        &env,
        &server,
        &format!(
            ", revocationURL: '{}', caBundleRef: {{kind: ConfigMap, name: no-such-ca}}",
            server.revocation_url()
        ),
    ));
    let third = server.grant("alice", CLIENT);
    env.token_secret("alice-token", &[(tokens::REFRESH_TOKEN, third.as_str())])
        .await;
    let (child, rx) = authorize(&env, &["imap", "--revoke"]);
    let mut seen = String::new();
    let (code_status, _) = finish(child, rx, &mut seen);
    assert_eq!(code_status, Some(0), "{seen}");
    assert!(
        seen.contains("Could not revoke the refresh token")
            && seen.contains("spec.authentication.oauth2.caBundleRef"),
        "{seen}"
    );
    // It held tokens only: it is gone.
    assert!(token_secret(&env).await.is_none(), "the tokens were kept");
}

#[tokio::test]
async fn authorize_with_a_device_code() {
    let env = Env::new("oauth2-device").await;
    trust_bed_ca(&env).await;
    let server = TokenServer::start(env.bed.oauth());
    server.register_client(CLIENT, None, None);
    // A confidential client must authenticate on the device authorization request too
    // (RFC 8628 §3.1), as Keycloak's do.
    const CONFIDENTIAL: &str = "mailroom-confidential";
    server.register_client(CONFIDENTIAL, Some("Device-Client-Secret-5e1"), None);
    env.secret(
        "app-secret",
        &[("client-secret", "Device-Client-Secret-5e1")],
    )
    .await;
    let d = env.bed.dovecot();
    env.apply(&oauth_provider(
        "imap",
        "IMAP",
        d.imaps_port(),
        &generic(
            &server,
            &format!(
                ", flow: DeviceCode, deviceAuthorizationURL: '{}'",
                server.device_authorization_url()
            ),
        ),
    ));
    env.apply(&oauth_provider(
        "pop3",
        "POP3",
        d.pop3s_port(),
        &format!(
            "provider: Microsoft, flow: DeviceCode, clientId: {CONFIDENTIAL}, clientSecretRef: {{name: app-secret}}, deviceAuthorizationURL: '{}', tokenURL: '{}', tokenSecretRef: {{name: alice-pop-token}}",
            server.device_authorization_url(),
            server.token_url()
        ),
    ));
    // Without a login name the tokens would be of no use: refused before any sign-in.
    env.apply(
        &oauth_provider("nameless", "IMAP", d.imaps_port(), &generic(&server, ""))
            .replace("username: alice, ", ""),
    );
    let (child, rx) = authorize(&env, &["nameless", "--device"]);
    let mut seen = String::new();
    let (code_status, _) = finish(child, rx, &mut seen);
    assert_eq!(code_status, Some(2), "{seen}");
    assert!(
        seen.contains("spec.authentication.username is not set"),
        "{seen}"
    );
    assert!(!seen.contains("code:"), "a sign-in was started:\n{seen}");

    let _controller = env.controller();
    for name in ["imap", "pop3"] {
        let (child, rx) = authorize(&env, &[name, "--device"]);
        let mut seen = String::new();
        let line = line_with(&rx, &mut seen, |l| l.trim_start().starts_with("code:"));
        let user_code = line.trim().trim_start_matches("code:").trim().to_string();
        assert!(
            server.approve_device(&user_code, "alice"),
            "unknown user code {user_code:?}:\n{seen}"
        );
        let (code_status, stdout) = finish(child, rx, &mut seen);
        assert_eq!(
            code_status,
            Some(0),
            "authorize {name} --device:\n{seen}{stdout}"
        );
        assert!(stdout.contains("Ready=True Connected"), "{stdout}");
        // Nothing secret on the terminal: the tokens it stored, the client's secret.
        let secret = Api::<Secret>::namespaced(env.client.clone(), &env.ns)
            .get(if name == "imap" {
                "alice-token"
            } else {
                "alice-pop-token"
            })
            .await
            .unwrap();
        let printed = format!("{seen}{stdout}");
        for value in [
            key_of(&secret, tokens::ACCESS_TOKEN),
            key_of(&secret, tokens::REFRESH_TOKEN),
            "Device-Client-Secret-5e1".to_string(),
        ] {
            assert!(
                value.len() > 8 && !printed.contains(&value),
                "{name}: a secret printed:\n{printed}"
            );
        }
    }

    // A declined sign-in is an error, and says so.
    let (child, rx) = authorize(&env, &["imap", "--device"]);
    let mut seen = String::new();
    let line = line_with(&rx, &mut seen, |l| l.trim_start().starts_with("code:"));
    server.deny_device(line.trim().trim_start_matches("code:").trim());
    let (code_status, _) = finish(child, rx, &mut seen);
    assert_ne!(code_status, Some(0));
    assert!(seen.contains("access_denied"), "{seen}");
}

#[tokio::test]
async fn authorize_with_a_device_code_rides_out_a_busy_token_endpoint() {
    let env = Env::new("oauth2-device-busy").await;
    trust_bed_ca(&env).await;
    let server = TokenServer::start(env.bed.oauth());
    server.register_client(CLIENT, None, None);
    env.apply(&oauth_provider(
        "imap",
        "IMAP",
        env.bed.dovecot().imaps_port(),
        &generic(
            &server,
            &format!(
                ", flow: DeviceCode, deviceAuthorizationURL: '{}'",
                server.device_authorization_url()
            ),
        ),
    ));
    let _controller = env.controller();
    // The device authorization request meets one too, asking for a second's wait.
    server.answer_next_device(
        503,
        &[("Retry-After", "1")],
        serde_json::json!("<html>Service Unavailable</html>"),
    );
    let (child, rx) = authorize(&env, &["imap", "--device"]);
    let mut seen = String::new();
    let line = line_with(&rx, &mut seen, |l| l.trim_start().starts_with("code:"));
    assert!(seen.contains("HTTP 503; trying again in 1 s"), "{seen}");
    let user_code = line.trim().trim_start_matches("code:").trim().to_string();
    // A poll meets a gateway's error page, perhaps after the user signed in: the
    // sign-in must not be lost.
    server.answer_next(
        503,
        &[("Retry-After", "2")],
        serde_json::json!("<html>Service Unavailable</html>"),
    );
    assert!(server.approve_device(&user_code, "alice"), "{seen}");
    let (code_status, stdout) = finish(child, rx, &mut seen);
    assert_eq!(code_status, Some(0), "authorize --device:\n{seen}{stdout}");
    // In 2 s (the Retry-After), or the interval if slow_down made it longer.
    assert!(
        seen.contains("retrying in") && seen.contains("s: HTTP 503"),
        "{seen}"
    );
    assert!(stdout.contains("Ready=True Connected"), "{stdout}");
}

/// RFC 8628's `slow_down` adds 5 s to the polling interval (the test server's is 1 s, and
/// it says slow_down to the second poll): the third poll comes 6 s after the second.
#[tokio::test]
async fn authorize_with_a_device_code_polls_slower_when_told() {
    let env = Env::new("oauth2-slow-down").await;
    trust_bed_ca(&env).await;
    let server = TokenServer::start(env.bed.oauth());
    server.register_client(CLIENT, None, None);
    env.apply(&oauth_provider(
        "imap",
        "IMAP",
        env.bed.dovecot().imaps_port(),
        &generic(
            &server,
            &format!(
                ", flow: DeviceCode, deviceAuthorizationURL: '{}'",
                server.device_authorization_url()
            ),
        ),
    ));
    let (child, rx) = authorize(&env, &["imap", "--device", "--no-wait"]);
    let mut seen = String::new();
    let line = line_with(&rx, &mut seen, |l| l.trim_start().starts_with("code:"));
    // Signed in once the second poll was told to slow down.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while server.device_polls().len() < 2 {
        assert!(std::time::Instant::now() < deadline, "{seen}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(server.approve_device(line.trim().trim_start_matches("code:").trim(), "alice"));
    let (code, stdout) = finish(child, rx, &mut seen);
    assert_eq!(code, Some(0), "{seen}{stdout}");
    let polls = server.device_polls();
    assert_eq!(polls.len(), 3, "{seen}");
    assert!(polls[1] - polls[0] < Duration::from_secs(3), "{polls:?}");
    assert!(
        polls[2] - polls[1] >= Duration::from_millis(5900),
        "the poll after slow_down came {:?} after it",
        polls[2] - polls[1]
    );
}

/// A manifest never validated by the API server (or a provider stored before its rule)
/// with a token endpoint over plain http: refused by name before any token is used.
#[tokio::test]
async fn check_of_a_manifest_with_a_plaintext_token_endpoint_is_invalid_spec() {
    let env = Env::new("oauth2-check-http").await;
    let provider = oauth_provider(
        "imap",
        "IMAP",
        env.bed.dovecot().imaps_port(),
        &format!(
            "provider: Generic, clientId: {CLIENT}, tokenURL: 'http://keycloak.auth.svc:8080/token', tokenSecretRef: {{name: alice-token}}"
        ),
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("provider.yaml");
    std::fs::write(&file, &provider).unwrap();
    let (code, stdout, stderr) =
        env.mailroom(&["check", "-n", &env.ns, "-f", file.to_str().unwrap()]);
    let out = format!("{stdout}{stderr}");
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("InvalidSpec") && out.contains("spec.authentication.oauth2.tokenURL"),
        "{out}"
    );
    let allowed = provider.replace("method: OAuth2", "method: OAuth2, allowUnencrypted: true");
    std::fs::write(&file, &allowed).unwrap();
    let (_, stdout, stderr) = env.mailroom(&["check", "-n", &env.ns, "-f", file.to_str().unwrap()]);
    let out = format!("{stdout}{stderr}");
    assert!(
        !out.contains("InvalidSpec") && out.contains("AuthorizationRequired"),
        "allowed, it goes on to look for tokens: {out}"
    );
}

#[tokio::test]
async fn check_of_manifests_uses_a_token_secret_from_the_files_and_never_refreshes_it() {
    let env = Env::new("oauth2-check-files").await;
    let (server, refresh) = alice_grant(&env);
    let provider = oauth_provider(
        "imap",
        "IMAP",
        env.bed.dovecot().imaps_port(),
        &generic(&server, ", saslMechanism: XOAUTH2"),
    )
    .replace(
        "caBundleRef: {kind: ConfigMap, name: test-ca}",
        "caBundleRef: {kind: Secret, name: ca}",
    );
    let ca = std::fs::read_to_string(env.bed.dovecot().ca_file()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let provider_file = write("provider.yaml", &provider);
    let token_file = |access: &str, expires: &str| {
        write(
            "token.yaml",
            &format!(
                "apiVersion: v1\nkind: Secret\nmetadata: {{name: alice-token}}\nstringData:\n  refresh_token: '{refresh}'\n  access_token: '{access}'\n  expires_at: '{expires}'\n---\napiVersion: v1\nkind: Secret\nmetadata: {{name: ca}}\nstringData:\n  ca.crt: |\n{}\n",
                ca.lines()
                    .map(|l| format!("    {l}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            ),
        )
    };
    let check = |token: &std::path::Path| {
        let (code, stdout, stderr) = env.mailroom(&[
            "check",
            "-n",
            &env.ns,
            "-f",
            provider_file.to_str().unwrap(),
            "-f",
            token.to_str().unwrap(),
        ]);
        (code, format!("{stdout}{stderr}"))
    };

    // A valid access token in the file: used as it is.
    let valid = env
        .bed
        .oauth()
        .access_token("alice", Duration::from_secs(3600));
    let (code, out) = check(&token_file(&valid, &rfc3339_in(3600)));
    assert_eq!(code, Some(0), "{out}");
    // An expired one: not refreshed (the cluster has no copy to refresh, and the file's
    // refresh token would be retired by a rotating endpoint), and the output says why.
    let expired = env
        .bed
        .oauth()
        .access_token("alice", Duration::from_secs(1));
    let (code, out) = check(&token_file(&expired, &rfc3339_in(-60)));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("does not refresh tokens from files"), "{out}");
    assert_eq!(server.token_requests(), 0, "a token was requested");
    assert!(server.refresh_token_valid(&refresh));
    assert!(
        token_secret(&env).await.is_none(),
        "a preflight wrote the token Secret into the cluster"
    );
}

/// A kubeconfig for the bed's API server that acts as `user` (impersonation), in `dir`.
fn kubeconfig_as(env: &Env, dir: &std::path::Path, user: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(env.bed.kubeconfig_path()).unwrap();
    let mut config: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    for entry in config["users"].as_sequence_mut().unwrap() {
        entry["user"]["as"] = serde_yaml::Value::from(user);
    }
    let path = dir.join(format!("kubeconfig-{user}"));
    std::fs::write(&path, serde_yaml::to_string(&config).unwrap()).unwrap();
    path
}

/// `mailroom check` of a provider whose access token has expired. A person who may read
/// the token Secret but not update it gets no refresh: a rotating endpoint would retire
/// the Secret's refresh token, and the new one could be stored nowhere. The output says
/// how to have the controller test instead. A person who may update it refreshes, and
/// the rotated token is stored.
#[tokio::test]
async fn check_refreshes_an_expired_token_only_for_a_caller_who_may_store_it() {
    let env = Env::new("oauth2-check-refresh").await;
    trust_bed_ca(&env).await;
    let (server, refresh) = alice_grant(&env);
    let expired = env
        .bed
        .oauth()
        .access_token("alice", Duration::from_secs(1));
    expired_token_secret(&env, &refresh, &expired).await;
    env.apply(&generic_imap(&env, &server));
    env.apply(&format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {{name: reader, namespace: {ns}}}\nrules:\n- apiGroups: [mailroom.dev]\n  resources: [incomingmailproviders]\n  verbs: [get]\n- apiGroups: ['']\n  resources: [secrets, configmaps]\n  verbs: [get]\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: reader, namespace: {ns}}}\nroleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: reader}}\nsubjects:\n- {{apiGroup: rbac.authorization.k8s.io, kind: User, name: reader}}\n",
        ns = env.ns
    ));
    let dir = tempfile::tempdir().unwrap();
    let reader = kubeconfig_as(&env, dir.path(), "reader");

    let (code, stdout, stderr) = env.mailroom(&[
        "check",
        "imap",
        "-n",
        &env.ns,
        "--kubeconfig",
        reader.to_str().unwrap(),
    ]);
    let out = format!("{stdout}{stderr}");
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("TokenRefreshFailed"), "{out}");
    assert!(
        out.contains(&format!("mailroom retest imap -n {}", env.ns)),
        "{out}"
    );
    assert_eq!(server.token_requests(), 0, "a refresh was made:\n{out}");
    assert!(server.refresh_token_valid(&refresh));

    let (code, stdout, stderr) = env.mailroom(&["check", "imap", "-n", &env.ns]);
    let out = format!("{stdout}{stderr}");
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(server.token_requests(), 1, "{out}");
    let secret = token_secret(&env).await.unwrap();
    let stored = key_of(&secret, tokens::REFRESH_TOKEN);
    assert_ne!(stored, refresh, "the rotated refresh token was not stored");
    assert!(server.refresh_token_valid(&stored));
    // What check prints (into a CI job's log) carries none of the tokens.
    for token in [&refresh, &stored, &key_of(&secret, tokens::ACCESS_TOKEN)] {
        assert!(
            !out.contains(token.as_str()),
            "a token in check's output:\n{out}"
        );
    }
}

/// A sign-in whose token endpoint grants no refresh token (many do without the
/// `offline_access` scope): the Secret keeps no refresh token of an earlier sign-in beside
/// the new access token, and the command warns that the provider will need it again.
#[tokio::test]
async fn authorize_without_a_refresh_token_granted_warns_and_keeps_no_older_one() {
    let env = Env::new("oauth2-no-refresh").await;
    trust_bed_ca(&env).await;
    let (server, earlier) = alice_grant(&env);
    env.token_secret("alice-token", &[("refresh_token", &earlier)])
        .await;
    server.set_refresh_tokens(false);
    env.apply(&generic_imap_with(
        &env,
        &server,
        &format!(", authorizationURL: '{}'", server.authorization_url()),
    ));
    let (child, rx) = authorize(&env, &["imap", "--no-wait"]);
    let mut seen = String::new();
    let url = line_with(&rx, &mut seen, |l| l.trim_start().starts_with("http"));
    follow_redirect(&server.sign_in(url.trim(), "alice").unwrap());
    let (code, stdout) = finish(child, rx, &mut seen);
    assert_eq!(code, Some(0), "{seen}{stdout}");
    assert!(seen.contains("granted no refresh token"), "{seen}");
    assert!(seen.contains("offline_access"), "{seen}");
    let secret = token_secret(&env).await.unwrap();
    assert!(key_of(&secret, tokens::ACCESS_TOKEN).len() > 20);
    assert_eq!(
        key_of(&secret, tokens::REFRESH_TOKEN),
        "",
        "the earlier sign-in's refresh token was kept beside the new access token"
    );
}

use mailroom_testbed::ProxyOptions;

/// This machine's host name and an IPv4 address it resolves to (/etc/hosts): a name not
/// loopback by its spelling, so the controller sends token requests for it to a proxy
/// (it never resolves a name to decide, as Go does not), and the proxy reaches a token
/// server listening on that address.
fn machine_name() -> (String, std::net::IpAddr) {
    use std::net::ToSocketAddrs;
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("reading the host name")
        .trim()
        .to_string();
    let ip = (name.as_str(), 0)
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.find(|a| a.is_ipv4()))
        .map(|a| a.ip())
        .unwrap_or_else(|| {
            panic!("the host name {name:?} resolves to no IPv4 address; the proxy tests need it to (see /etc/hosts)")
        });
    (name, ip)
}

// tinyproxy takes only letters, digits, `-`, `.` and `_` in credentials.
const PROXY_PASSWORD: &str = "Pl4nted-Proxy-Pass.39f2";
const APP_CLIENT_SECRET: &str = "Pl4nted-Client-Secret-7d1e";

/// Provider `app`: Microsoft's app-only flow with the token URL pointed at `server`,
/// whose tokens are too short-lived to keep, so that every test asks for one.
async fn app_provider(env: &Env, server: &TokenServer) {
    server.register_client(CLIENT, Some(APP_CLIENT_SECRET), Some("alice"));
    server.set_access_ttl(Duration::from_secs(120));
    env.secret("app-secret", &[("client-secret", APP_CLIENT_SECRET)])
        .await;
    let manifest = oauth_provider(
        "app",
        "IMAP",
        env.bed.dovecot().imaps_port(),
        &format!(
            "provider: Microsoft, flow: ClientCredentials, tenant: contoso.onmicrosoft.com, clientId: {CLIENT}, clientSecretRef: {{name: app-secret}}, tokenURL: '{}', tokenSecretRef: {{name: alice-token}}",
            server.token_url()
        ),
    );
    env.apply(&if server.ca_pem().is_some() {
        manifest
    } else {
        manifest.replace("method: OAuth2", "method: OAuth2, allowUnencrypted: true")
    });
}

/// The proxy's URL with Basic credentials, the password's dots percent-encoded (which
/// decoding must undo).
fn with_login(proxy: &mailroom_testbed::HttpProxy, password: &str) -> String {
    format!(
        "http://mailroom:{}@127.0.0.1:{}",
        password.replace('.', "%2E"),
        proxy.port()
    )
}

/// The controller sends no token request to its own pod's loopback unless it runs with
/// --allow-oauth2-loopback: whoever may edit a provider could otherwise POST to a
/// sidecar's admin port there. Said as a spec to change, naming the field and the flag,
/// before any request.
#[tokio::test]
async fn the_controller_refuses_a_token_endpoint_on_its_own_loopback_unless_allowed() {
    let env = Env::new("oauth2-loopback").await;
    trust_bed_ca(&env).await;
    let server = TokenServer::start(env.bed.oauth());
    app_provider(&env, &server).await;
    let refusing = env.controller_with_env(&[], &[("MAILROOM_ALLOW_OAUTH2_LOOPBACK", "false")]);
    let p = env
        .wait_reason("app", "InvalidSpec", Duration::from_secs(60))
        .await;
    let message = &ready(&p).unwrap().message;
    assert!(
        message.contains("spec.authentication.oauth2.tokenURL")
            && message.contains("own address")
            && message.contains("--allow-oauth2-loopback"),
        "{message}"
    );
    assert_eq!(
        server.token_requests(),
        0,
        "no request may reach the endpoint"
    );
    drop(refusing);
    // Allowed (as the bed's controllers run, its identity providers being on loopback).
    let _controller = env.controller();
    env.request_test("app", "allowed");
    env.wait_reason("app", "Connected", Duration::from_secs(60))
        .await;
}

#[tokio::test]
async fn token_requests_tunnel_through_https_proxy_with_its_credentials() {
    let env = Env::new("oauth2-connect").await;
    trust_bed_ca(&env).await;
    let (host, ip) = machine_name();
    let server = TokenServer::start_tls(env.bed.oauth(), ip, &host);
    let ca_file = env.dir.path().join("token-server-ca.crt");
    std::fs::write(&ca_file, server.ca_pem().unwrap()).unwrap();
    let ca_file = ca_file.to_str().unwrap();
    app_provider(&env, &server).await;
    let proxy = env.bed.http_proxy(&ProxyOptions {
        connect_ports: vec![server.port()],
        basic_auth: Some(("mailroom".into(), PROXY_PASSWORD.into())),
    });
    let connect = format!("CONNECT {host}:{} HTTP/1.1", server.port());
    let tunnels = || proxy.requests().iter().filter(|r| **r == connect).count();
    let mut logs = String::new();

    // The controller trusts the token server's CA as it would a public one (the
    // platform's roots, here from SSL_CERT_FILE): TLS runs inside the tunnel.
    let controller = env.controller_with_env(
        &[],
        &[
            ("HTTPS_PROXY", &with_login(&proxy, PROXY_PASSWORD)),
            ("NO_PROXY", ""),
            ("SSL_CERT_FILE", ca_file),
        ],
    );
    env.wait_reason("app", "Connected", Duration::from_secs(60))
        .await;
    assert!(
        tunnels() >= 1,
        "expected {connect:?} in the proxy's log {}; it received {:?}",
        proxy.log_path().display(),
        proxy.requests()
    );
    logs.push_str(&controller.logs());
    drop(controller);

    // `mailroom check` asks for its own token, through the proxy too.
    let before = tunnels();
    let out = std::process::Command::new(crate::support::MAILROOM)
        .args(["check", "app", "-n", &env.ns])
        .env("KUBECONFIG", env.bed.kubeconfig_path())
        .env("HTTPS_PROXY", with_login(&proxy, PROXY_PASSWORD))
        .env("NO_PROXY", "")
        .env("SSL_CERT_FILE", ca_file)
        .output()
        .expect("running mailroom check");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "mailroom check said:\n{said}");
    assert!(
        tunnels() > before,
        "check's token request did not go through the proxy"
    );
    logs.push_str(&said);

    // A wrong password: the proxy's refusal, in its words, naming proxy and target.
    const WRONG: &str = "Wr0ng-Proxy-Pass-5e0b";
    let controller = env.controller_with_env(
        &[],
        &[
            ("https_proxy", &with_login(&proxy, WRONG)),
            ("SSL_CERT_FILE", ca_file),
        ],
    );
    let p = env.retest("app", "wrong-password").await;
    let condition = ready(&p).unwrap();
    assert_eq!(condition.reason, "TokenRefreshFailed", "{p:?}");
    // tinyproxy answers 401 Unauthorized where RFC 9110 says 407.
    let expected = format!(
        "the proxy {} (https_proxy) refused CONNECT {host}:{}: 401 Unauthorized",
        proxy.url(),
        server.port()
    );
    assert!(
        condition.message.contains(&expected),
        "expected {expected:?} in {:?}",
        condition.message
    );
    logs.push_str(&controller.logs());
    crate::support::assert_nowhere(
        &env,
        &logs,
        &[
            PROXY_PASSWORD,
            "Pl4nted-Proxy-Pass%2E",
            WRONG,
            APP_CLIENT_SECRET,
        ],
    )
    .await;
}

#[tokio::test]
async fn token_requests_go_through_http_proxy_unless_no_proxy_names_the_host() {
    let env = Env::new("oauth2-proxy").await;
    trust_bed_ca(&env).await;
    let (host, ip) = machine_name();
    let server = TokenServer::start_at(env.bed.oauth(), ip, &host);
    app_provider(&env, &server).await;
    let proxy = env.bed.http_proxy(&ProxyOptions {
        basic_auth: Some(("mailroom".into(), PROXY_PASSWORD.into())),
        ..ProxyOptions::default()
    });
    // The token endpoint is plain HTTP, so HTTP_PROXY is the variable that applies.
    let proxy_url = with_login(&proxy, PROXY_PASSWORD);
    let request_line = format!("POST {} HTTP/1.1", server.token_url());
    let through_proxy = || {
        proxy
            .requests()
            .iter()
            .filter(|r| **r == request_line)
            .count()
    };
    let mut logs = String::new();

    // Through the proxy, with its credentials.
    let controller = env.controller_with_env(&[], &[("HTTP_PROXY", &proxy_url), ("NO_PROXY", "")]);
    env.wait_reason("app", "Connected", Duration::from_secs(60))
        .await;
    assert!(
        through_proxy() >= 1,
        "expected {request_line:?} in the proxy's log {}; it received {:?}",
        proxy.log_path().display(),
        proxy.requests()
    );
    logs.push_str(&controller.logs());
    drop(controller);

    // NO_PROXY names the host: straight to the token server.
    let controller =
        env.controller_with_env(&[], &[("HTTP_PROXY", &proxy_url), ("no_proxy", &host)]);
    let (before, proxied) = (server.token_requests(), through_proxy());
    let p = env.retest("app", "direct").await;
    assert_eq!(
        ready(&p).map(|c| c.reason.as_str()),
        Some("Connected"),
        "{p:?}"
    );
    assert!(server.token_requests() > before, "no token was requested");
    assert_eq!(through_proxy(), proxied, "NO_PROXY={host} was not honoured");
    logs.push_str(&controller.logs());
    drop(controller);

    // Without the proxy's credentials: its refusal, not the token endpoint's answer.
    let controller =
        env.controller_with_env(&[], &[("HTTP_PROXY", &proxy.url()), ("NO_PROXY", "")]);
    let p = env.retest("app", "no-credentials").await;
    let condition = ready(&p).unwrap();
    assert_eq!(condition.reason, "TokenRefreshFailed", "{p:?}");
    assert!(
        condition.message.contains(&format!(
            "the proxy {} (HTTP_PROXY) refused the request: HTTP 407",
            proxy.url()
        )),
        "{}",
        condition.message
    );
    logs.push_str(&controller.logs());
    drop(controller);

    // A proxy that is not there: the status names it and the variable, not its password.
    let gone = proxy.url();
    drop(proxy);
    let controller = env.controller_with_env(&[], &[("HTTP_PROXY", &proxy_url), ("NO_PROXY", "")]);
    let p = env.retest("app", "no-proxy").await;
    let condition = ready(&p).unwrap();
    assert_eq!(condition.reason, "TokenRefreshFailed", "{p:?}");
    let message = &condition.message;
    assert!(
        message.contains(&format!("connecting to the proxy {gone} (HTTP_PROXY)")),
        "{message}"
    );
    logs.push_str(&controller.logs());
    crate::support::assert_nowhere(
        &env,
        &logs,
        &[PROXY_PASSWORD, "Pl4nted-Proxy-Pass%2E", APP_CLIENT_SECRET],
    )
    .await;
}

/// A token endpoint whose certificate comes from a private CA (an internal Keycloak or
/// AD FS): its refresh fails naming the certificate while only the platform's roots are
/// trusted, and while `oauth2.caBundleRef` names a ConfigMap with another CA; fixing the
/// ConfigMap tests again at once (sooner than the backoff), for the controller and for
/// `mailroom check`; the ConfigMap deleted is said at the next test, though the access
/// token is still good.
#[tokio::test]
async fn a_token_endpoint_with_a_private_ca_is_trusted_through_the_oauth2_ca_bundle() {
    let env = Env::new("oauth2-private-ca").await;
    trust_bed_ca(&env).await;
    let (host, ip) = machine_name();
    let server = TokenServer::start_tls(env.bed.oauth(), ip, &host);
    app_provider(&env, &server).await;
    let controller = env.controller();
    let p = env
        .wait_reason("app", "TokenRefreshFailed", Duration::from_secs(60))
        .await;
    let message = ready(&p).unwrap().message.clone();
    assert!(
        message.contains("UnknownIssuer")
            && message.contains(&server.token_url())
            && message.contains("trust that CA with spec.authentication.oauth2.caBundleRef"),
        "{message}"
    );

    // Named, but holding another CA (the mail server's).
    let bundle = |pem: &str| -> k8s_openapi::api::core::v1::ConfigMap {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "token-ca"},
            "data": {"ca.crt": pem},
        }))
        .unwrap()
    };
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(env.client.clone(), &env.ns);
    let mail_ca = std::fs::read_to_string(env.bed.dovecot().ca_file()).unwrap();
    cms.create(&Default::default(), &bundle(&mail_ca))
        .await
        .unwrap();
    let patch = serde_json::json!({"spec": {"authentication": {"oauth2": {
        "caBundleRef": {"kind": "ConfigMap", "name": "token-ca"}
    }}}});
    env.providers()
        .patch(
            "app",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .unwrap();
    let generation = env
        .providers()
        .get("app")
        .await
        .unwrap()
        .metadata
        .generation;
    let p = env
        .wait(
            "app",
            "the named bundle tested",
            Duration::from_secs(30),
            |p| ready(p).is_some_and(|c| c.observed_generation == generation),
        )
        .await;
    assert_eq!(ready(&p).unwrap().reason, "TokenRefreshFailed", "{p:?}");

    // The right CA put in the ConfigMap: tested at once (the backoff is 20 s by now).
    cms.replace(
        "token-ca",
        &Default::default(),
        &bundle(server.ca_pem().unwrap()),
    )
    .await
    .unwrap();
    env.wait_reason("app", "Connected", Duration::from_secs(10))
        .await;
    let (code, out, err) = env.mailroom(&["check", "app", "-n", &env.ns]);
    assert_eq!(code, Some(0), "{out}{err}");

    // Deleted while the access token is still good: said at once, not at its refresh.
    cms.delete("token-ca", &Default::default()).await.unwrap();
    let p = env
        .wait_reason("app", "SecretNotFound", Duration::from_secs(10))
        .await;
    let message = ready(&p).unwrap().message.clone();
    assert!(
        message.contains("spec.authentication.oauth2.caBundleRef"),
        "{message}"
    );
    drop(controller);
}

/// `mailroom authorize` reaches an identity provider with a private CA through
/// `oauth2.caBundleRef` in every flow: the device flow refuses to start while only the
/// platform's roots are trusted, saying where to trust the CA; with the bundle the browser
/// sign-in's code exchange, the device flow's requests and polls, and the revocation all
/// go over TLS to that CA, and the providers become Ready.
#[tokio::test]
async fn authorize_trusts_the_oauth2_ca_bundle_in_every_flow() {
    let env = Env::new("oauth2-authorize-ca").await;
    trust_bed_ca(&env).await;
    let (host, ip) = machine_name();
    let server = TokenServer::start_tls(env.bed.oauth(), ip, &host);
    server.register_client(CLIENT, None, None);
    let d = env.bed.dovecot();
    let device = |name: &str, bundle: &str| {
        oauth_provider(
            name,
            "IMAP",
            d.imaps_port(),
            &format!(
                "provider: Generic, flow: DeviceCode, clientId: {CLIENT}, tokenURL: '{}', deviceAuthorizationURL: '{}', tokenSecretRef: {{name: {name}-token}}{bundle}",
                server.token_url(),
                server.device_authorization_url()
            ),
        )
    };
    let bundle = ", caBundleRef: {kind: ConfigMap, name: idp-ca}";

    // Only the platform's roots: no code is shown, and the error says what to do.
    env.apply(&device("plain", ""));
    let (child, rx) = authorize(&env, &["plain", "--device"]);
    let mut seen = String::new();
    let (code_status, _) = finish(child, rx, &mut seen);
    assert_ne!(code_status, Some(0), "{seen}");
    assert!(
        seen.contains("UnknownIssuer")
            && seen.contains("trust that CA with spec.authentication.oauth2.caBundleRef"),
        "{seen}"
    );
    assert!(
        !seen.lines().any(|l| l.trim_start().starts_with("code:")),
        "a sign-in was started:\n{seen}"
    );

    let cm: k8s_openapi::api::core::v1::ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "idp-ca"},
        "data": {"ca.crt": server.ca_pem().unwrap()},
    }))
    .unwrap();
    Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(env.client.clone(), &env.ns)
        .create(&Default::default(), &cm)
        .await
        .unwrap();
    env.apply(&device("dev", bundle));
    env.apply(&oauth_provider(
        "web",
        "IMAP",
        d.imaps_port(),
        &format!(
            "provider: Generic, clientId: {CLIENT}, tokenURL: '{}', authorizationURL: '{}', revocationURL: '{}', tokenSecretRef: {{name: web-token}}{bundle}",
            server.token_url(),
            server.authorization_url(),
            server.revocation_url()
        ),
    ));
    let _controller = env.controller();

    let (child, rx) = authorize(&env, &["dev", "--device"]);
    let mut seen = String::new();
    let line = line_with(&rx, &mut seen, |l| l.trim_start().starts_with("code:"));
    assert!(server.approve_device(line.trim().trim_start_matches("code:").trim(), "alice"));
    let (code_status, stdout) = finish(child, rx, &mut seen);
    assert_eq!(
        code_status,
        Some(0),
        "authorize dev --device:\n{seen}{stdout}"
    );
    assert!(stdout.contains("Ready=True Connected"), "{stdout}");

    let (child, rx) = authorize(&env, &["web"]);
    let mut seen = String::new();
    let url = line_with(&rx, &mut seen, |l| l.trim_start().starts_with("http"));
    follow_redirect(&server.sign_in(url.trim(), "alice").unwrap());
    let (code_status, stdout) = finish(child, rx, &mut seen);
    assert_eq!(code_status, Some(0), "authorize web:\n{seen}{stdout}");
    assert!(stdout.contains("Ready=True Connected"), "{stdout}");
    for name in ["dev", "web"] {
        env.wait_reason(name, "Connected", Duration::from_secs(10))
            .await;
    }

    let secrets = Api::<Secret>::namespaced(env.client.clone(), &env.ns);
    let refresh = key_of(
        &secrets.get("web-token").await.unwrap(),
        tokens::REFRESH_TOKEN,
    );
    assert!(server.refresh_token_valid(&refresh));
    let (child, rx) = authorize(&env, &["web", "--revoke"]);
    let mut seen = String::new();
    let (code_status, _) = finish(child, rx, &mut seen);
    assert_eq!(code_status, Some(0), "{seen}");
    assert!(seen.contains("Revoked the refresh token at"), "{seen}");
    assert!(
        !server.refresh_token_valid(&refresh),
        "the refresh token still works at the server"
    );
}

/// `mailroom authorize` of a suspended provider (paused while its tokens are fixed) stores
/// the tokens and says it is tested once resumed, instead of waiting for a test that the
/// controller does not run and blaming the controller.
#[tokio::test]
async fn authorize_of_a_suspended_provider_stores_the_tokens_and_does_not_wait() {
    let env = Env::new("oauth2-suspended").await;
    trust_bed_ca(&env).await;
    let server = TokenServer::start(env.bed.oauth());
    server.register_client(CLIENT, None, None);
    env.apply(
        &generic_imap_with(
            &env,
            &server,
            &format!(
                ", flow: DeviceCode, deviceAuthorizationURL: '{}'",
                server.device_authorization_url()
            ),
        )
        .replace("  check:", "  suspend: true\n  check:"),
    );
    let _controller = env.controller();
    let started = std::time::Instant::now();
    let (child, rx) = authorize(&env, &["imap", "--device"]);
    let mut seen = String::new();
    let line = line_with(&rx, &mut seen, |l| l.trim_start().starts_with("code:"));
    assert!(server.approve_device(line.trim().trim_start_matches("code:").trim(), "alice"));
    let (code, stdout) = finish(child, rx, &mut seen);
    assert_eq!(code, Some(0), "{seen}{stdout}");
    assert!(
        seen.contains(
            "is suspended (spec.suspend: true): it is tested with these tokens once it is resumed"
        ),
        "{seen}"
    );
    assert!(started.elapsed() < Duration::from_secs(30), "{seen}");
    let secret = token_secret(&env).await.expect("the tokens are stored");
    assert!(server.refresh_token_valid(&key_of(&secret, tokens::REFRESH_TOKEN)));
}
