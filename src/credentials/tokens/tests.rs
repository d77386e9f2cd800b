use kube::Client;

use super::manager::*;
use super::*;

fn secret(pairs: &[(&str, &str)]) -> Secret {
    Secret {
        data: Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        ),
        ..Default::default()
    }
}

fn at(text: &str) -> Timestamp {
    text.parse().unwrap()
}

const NOW: &str = "2026-11-29T10:00:00Z";

#[test]
fn plan_uses_a_fresh_token_and_refreshes_ahead_of_expiry() {
    let now = at(NOW);
    let fresh = TokenSet::from_secret(&secret(&[
        (ACCESS_TOKEN, "a"),
        (REFRESH_TOKEN, "r"),
        (EXPIRES_AT, "2026-11-29T11:00:00Z"),
    ]));
    assert_eq!(
        plan(
            OAuth2Flow::AuthorizationCode,
            Some(&fresh),
            now,
            REFRESH_AHEAD
        ),
        Plan::Use
    );
    let soon = TokenSet::from_secret(&secret(&[
        (ACCESS_TOKEN, "a"),
        (REFRESH_TOKEN, "r"),
        (EXPIRES_AT, "2026-11-29T10:04:00Z"),
    ]));
    assert_eq!(
        plan(
            OAuth2Flow::AuthorizationCode,
            Some(&soon),
            now,
            REFRESH_AHEAD
        ),
        Plan::Refresh
    );
    assert!(soon.access_valid(now), "still usable if the refresh fails");
    let expired = TokenSet::from_secret(&secret(&[
        (ACCESS_TOKEN, "a"),
        (EXPIRES_AT, "2026-11-29T09:00:00Z"),
    ]));
    assert_eq!(
        plan(OAuth2Flow::DeviceCode, Some(&expired), now, REFRESH_AHEAD),
        Plan::Required
    );
    assert!(!expired.access_valid(now));
    assert_eq!(
        plan(OAuth2Flow::AuthorizationCode, None, now, REFRESH_AHEAD),
        Plan::Required
    );
    assert_eq!(
        plan(OAuth2Flow::ClientCredentials, None, now, REFRESH_AHEAD),
        Plan::ClientCredentials
    );
    assert_eq!(
        plan(
            OAuth2Flow::ClientCredentials,
            Some(&fresh),
            now,
            REFRESH_AHEAD
        ),
        Plan::Use
    );
}

#[test]
fn grants_and_microsoft_errors_are_read() {
    match read_grant(
        200,
        br#"{"access_token":"at","refresh_token":"rt","expires_in":3599,"token_type":"Bearer"}"#,
        &[],
    ) {
        Grant::Tokens(t) => {
            assert_eq!(t.access_token.expose_secret(), "at");
            assert_eq!(t.expires_in, Some(3599));
            assert!(!format!("{t:?}").contains("at\""));
        }
        other => panic!("{other:?}"),
    }
    match read_grant(
        400,
        br#"{"error":"invalid_grant","error_description":"AADSTS70008: The provided authorization code or refresh token has expired.\r\nTrace ID: x","error_codes":[70008]}"#,
        &[],
    ) {
        Grant::Refused { error, description } => {
            assert_eq!(error, "invalid_grant");
            assert!(description.starts_with("AADSTS70008"));
            assert!(!description.contains("Trace ID"));
        }
        other => panic!("{other:?}"),
    }
    assert!(
        matches!(read_grant(502, b"<html>bad gateway</html>", &[]), Grant::Failed(m) if m.contains("HTTP 502"))
    );
    // An endpoint's words reach status, Events and logs without raw control characters:
    // an `error` with a newline cannot forge a log line, nor a description drive a
    // terminal.
    match read_grant(
        400,
        b"{\"error\":\"invalid_grant\\nINFO tested reason=Connected\",\"error_description\":\"\\u001b[2Jgone\\r\"}",
        &[],
    ) {
        Grant::Refused { error, description } => {
            assert_eq!(error, "invalid_grant\\nINFO tested reason=Connected");
            assert_eq!(description, "\\u{1b}[2Jgone\\r");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn refusals_that_only_a_new_sign_in_cures_are_told_from_the_rest() {
    // Microsoft Entra: MFA or Conditional Access (AADSTS50076, AADSTS50079), consent
    // withdrawn, a session ended; and RFC 6749's revoked or expired grant.
    for error in [
        "invalid_grant",
        "interaction_required",
        "consent_required",
        "login_required",
    ] {
        assert!(needs_sign_in(error), "{error}");
    }
    // The client's or the server's trouble: a new sign-in would not help.
    for error in [
        "invalid_client",
        "unauthorized_client",
        "invalid_request",
        "invalid_scope",
        "temporarily_unavailable",
        "server_error",
        "",
    ] {
        assert!(!needs_sign_in(error), "{error}");
    }
}

#[test]
fn a_throttled_token_endpoint_is_not_called_before_its_retry_after_within_an_hour() {
    use crate::credentials::http::RetryAfter;
    let now = at(NOW);
    let in_30s = Some(RetryAfter::Seconds(30));
    assert_eq!(
        not_before(429, in_30s, now),
        Some(at("2026-11-29T10:00:30Z"))
    );
    assert_eq!(
        not_before(503, Some(RetryAfter::At(at("2026-11-29T10:02:00Z"))), now),
        Some(at("2026-11-29T10:02:00Z"))
    );
    // To the whole second after, so that status does not change with every test.
    let later = at("2026-11-29T10:00:00.250Z");
    assert_eq!(
        not_before(429, in_30s, later),
        Some(at("2026-11-29T10:00:31Z"))
    );
    // An absurd wait is capped.
    assert_eq!(
        not_before(429, Some(RetryAfter::Seconds(86400 * 365)), now),
        Some(at("2026-11-29T11:00:00Z"))
    );
    // Other answers, no header, or nothing to wait: asked again at the next test.
    assert_eq!(not_before(400, in_30s, now), None);
    assert_eq!(not_before(500, in_30s, now), None);
    assert_eq!(not_before(429, None, now), None);
    assert_eq!(not_before(429, Some(RetryAfter::Seconds(0)), now), None);
}

#[test]
fn plan_for_one_test_uses_a_token_until_it_is_nearly_expired() {
    let now = at(NOW);
    let soon = TokenSet::from_secret(&secret(&[
        (ACCESS_TOKEN, "a"),
        (REFRESH_TOKEN, "r"),
        (EXPIRES_AT, "2026-11-29T10:04:00Z"),
    ]));
    // `mailroom check` passes no margin: four minutes left is enough for one test.
    assert_eq!(
        plan(
            OAuth2Flow::AuthorizationCode,
            Some(&soon),
            now,
            Duration::ZERO
        ),
        Plan::Use
    );
    let seconds_left = TokenSet::from_secret(&secret(&[
        (ACCESS_TOKEN, "a"),
        (REFRESH_TOKEN, "r"),
        (EXPIRES_AT, "2026-11-29T10:00:05Z"),
    ]));
    assert_eq!(
        plan(
            OAuth2Flow::AuthorizationCode,
            Some(&seconds_left),
            now,
            Duration::ZERO
        ),
        Plan::Refresh
    );
}

#[test]
fn a_token_endpoint_echoing_the_request_has_its_secrets_cut_out() {
    let form = [
        ("grant_type", SecretString::from("refresh_token")),
        (
            "refresh_token",
            SecretString::from("rt-Echoed-Refresh-Token-7f3a"),
        ),
        ("client_id", SecretString::from("mailroom-client")),
        (
            "client_secret",
            SecretString::from("cs-Echoed-Client-Secret-91b2"),
        ),
    ];
    let refused = read_grant(
        400,
        br#"{"error":"invalid_grant","error_description":"Invalid refresh token: rt-Echoed-Refresh-Token-7f3a (client mailroom-client)"}"#,
        &form,
    );
    let Grant::Refused { error, description } = refused else {
        panic!("{refused:?}")
    };
    assert_eq!(error, "invalid_grant");
    assert_eq!(
        description,
        "Invalid refresh token: [redacted] (client mailroom-client)"
    );
    let failed = read_grant(
        500,
        b"internal error handling client_secret=cs-Echoed-Client-Secret-91b2",
        &form,
    );
    let Grant::Failed(message) = failed else {
        panic!("{failed:?}")
    };
    assert!(!message.contains("cs-Echoed"), "{message}");
    assert!(message.contains("client_secret=[redacted]"), "{message}");
    // A server echoing the form as it received it: the token percent-encoded.
    let form = [("refresh_token", SecretString::from("1//0gEchoed/Token+41"))];
    let failed = read_grant(
        400,
        b"bad request: refresh_token=1%2F%2F0gEchoed%2FToken%2B41",
        &form,
    );
    let Grant::Failed(message) = failed else {
        panic!("{failed:?}")
    };
    assert!(!message.contains("Echoed"), "{message}");
}

#[test]
fn a_body_with_tokens_mailroom_cannot_read_is_not_quoted() {
    for (status, body) in [
        (
            302,
            "access_token=eyJhbGciOi.secret-part&token_type=bearer".as_bytes(),
        ),
        (
            200,
            br#"{"access_token": 12345, "refresh_token": "rt-secret-value"}"#,
        ),
    ] {
        match read_grant(status, body, &[]) {
            Grant::Failed(m) => {
                assert!(!m.contains("secret") && !m.contains("12345"), "{m}");
                assert!(m.contains(&format!("HTTP {status}")), "{m}");
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn a_scope_may_come_as_a_list() {
    let body = br#"{"access_token":"at","scope":["https://mail.example/imap","offline_access"]}"#;
    match read_grant(200, body, &[]) {
        Grant::Tokens(t) => assert_eq!(
            t.scope.as_deref(),
            Some("https://mail.example/imap offline_access")
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn expires_in_may_come_as_a_string() {
    match read_grant(200, br#"{"access_token":"at","expires_in":"3599"}"#, &[]) {
        Grant::Tokens(t) => assert_eq!(t.expires_in, Some(3599)),
        other => panic!("{other:?}"),
    }
    // A fraction, as a number or text: rounded down.
    for body in [
        br#"{"access_token":"at","expires_in":3599.5}"#.as_slice(),
        br#"{"access_token":"at","expires_in":"3599.9"}"#,
    ] {
        match read_grant(200, body, &[]) {
            Grant::Tokens(t) => assert_eq!(t.expires_in, Some(3599)),
            other => panic!("{other:?}"),
        }
    }
    // Not a number at all: an unknown expiry, and the grant kept, with the refresh token
    // a rotating endpoint has just put in place of the one it retired.
    for expires_in in [r#""soon""#, "-5", "[1]"] {
        let body =
            format!(r#"{{"access_token":"at","refresh_token":"rt2","expires_in":{expires_in}}}"#);
        match read_grant(200, body.as_bytes(), &[]) {
            Grant::Tokens(t) => {
                assert_eq!(t.expires_in, None, "{expires_in}");
                assert_eq!(t.refresh_token.unwrap().expose_secret(), "rt2");
            }
            other => panic!("{expires_in}: {other:?}"),
        }
    }
}

#[test]
fn a_new_sign_in_without_a_refresh_token_removes_the_old_one() {
    let now = at(NOW);
    let old = secret(&[
        (REFRESH_TOKEN, "r-of-an-earlier-sign-in"),
        (ACCESS_TOKEN, "a1"),
        (SCOPE, "old"),
        (USERNAME, "alice"),
    ]);
    let grant: TokenResponse =
        serde_json::from_str(r#"{"access_token":"a2","expires_in":60}"#).unwrap();
    let new = TokenSet::from_secret(&signed_in_secret(Some(&old), &grant, now));
    assert!(new.refresh_token.is_none());
    assert_eq!(new.access_token.unwrap().expose_secret(), "a2");
    assert_eq!(new.username.as_deref(), Some("alice"));
    let grant: TokenResponse =
        serde_json::from_str(r#"{"access_token":"a3","refresh_token":"r3"}"#).unwrap();
    let new = TokenSet::from_secret(&signed_in_secret(Some(&old), &grant, now));
    assert_eq!(new.refresh_token.unwrap().expose_secret(), "r3");
}

#[test]
fn updated_secret_keeps_an_unrotated_refresh_token_and_labels_it() {
    let now = at(NOW);
    let old = secret(&[
        (REFRESH_TOKEN, "r1"),
        (ACCESS_TOKEN, "a1"),
        (USERNAME, "alice"),
    ]);
    let grant: TokenResponse =
        serde_json::from_str(r#"{"access_token":"a2","expires_in":60}"#).unwrap();
    let new = TokenSet::from_secret(&updated_secret(Some(&old), &grant, now));
    assert_eq!(new.refresh_token.unwrap().expose_secret(), "r1");
    assert_eq!(new.access_token.unwrap().expose_secret(), "a2");
    assert_eq!(new.expires_at, Some(at("2026-11-29T10:01:00Z")));
    assert_eq!(new.username.as_deref(), Some("alice"));
    let grant: TokenResponse =
        serde_json::from_str(r#"{"access_token":"a3","refresh_token":"r2"}"#).unwrap();
    let written = updated_secret(Some(&old), &grant, now);
    assert_eq!(
        TokenSet::from_secret(&written)
            .refresh_token
            .unwrap()
            .expose_secret(),
        "r2"
    );
    assert_eq!(
        written.labels().get(TOKEN_LABEL).map(String::as_str),
        Some("true")
    );
}

fn spec(yaml: &str) -> IncomingMailProviderSpec {
    serde_yaml::from_str(yaml).unwrap()
}

const OAUTH: &str = "
server: {host: outlook.office365.com, protocol: IMAP}
authentication:
  method: OAuth2
  oauth2: {provider: Microsoft, clientId: c, tokenSecretRef: {name: alice-token}}
";

#[test]
fn login_reads_the_access_token_and_username() {
    let objects = Fetched {
        namespace: "ops".into(),
        secrets: [(
            "alice-token".to_string(),
            secret(&[
                (ACCESS_TOKEN, "tok-PLANTED"),
                (USERNAME, "alice@example.com"),
            ]),
        )]
        .into(),
        ..Default::default()
    };
    match login(&spec(OAUTH), &objects).unwrap() {
        Login::OAuth2 {
            username, token, ..
        } => {
            assert_eq!(username, "alice@example.com");
            assert_eq!(token.expose_secret(), "tok-PLANTED");
        }
        other => panic!("{other:?}"),
    }
    assert!(!format!("{:?}", login(&spec(OAUTH), &objects)).contains("PLANTED"));
}

#[test]
fn no_token_is_authorization_required_with_the_command() {
    let objects = Fetched {
        namespace: "ops".into(),
        ..Default::default()
    };
    let err = login(&spec(OAUTH), &objects).unwrap_err();
    assert_eq!(err.reason(), Reason::AuthorizationRequired);
    assert!(err.to_string().contains("mailroom authorize"), "{err}");
    let objects = Fetched {
        namespace: "ops".into(),
        token_problem: Some((Reason::AuthorizationRevoked, "revoked".into())),
        ..Default::default()
    };
    assert_eq!(
        login(&spec(OAUTH), &objects).unwrap_err().reason(),
        Reason::AuthorizationRevoked
    );
    assert_eq!(
        authorize_command("alice", "ops", OAuth2Flow::DeviceCode),
        "mailroom authorize alice -n ops --device"
    );
}

#[test]
fn token_form_for_refresh_and_client_credentials() {
    let o: OAuth2Spec = serde_yaml::from_str(
        "{provider: Microsoft, flow: ClientCredentials, tenant: contoso.com, clientId: app, clientSecretRef: {name: s}, tokenSecretRef: {name: t}}",
    )
    .unwrap();
    let form = token_form(
        &o,
        crate::api::Protocol::Imap,
        Plan::ClientCredentials,
        None,
        Some(&SecretString::from("cs")),
    );
    let shown: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.expose_secret())).collect();
    assert_eq!(
        shown,
        [
            ("grant_type", "client_credentials"),
            ("client_id", "app"),
            ("client_secret", "cs"),
            ("scope", "https://outlook.office365.com/.default"),
        ]
    );
}

/// A token request whose test is cancelled before the answer arrives (a stopping
/// controller, after its drain) still keeps the grant once it arrives, and stopping waits
/// for it: a rotating endpoint has already retired the refresh token the Secret holds.
#[tokio::test]
async fn a_grant_that_arrives_after_its_test_was_cancelled_is_kept() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/token", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut request = vec![0u8; 4096];
        let _ = conn.read(&mut request).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let body = r#"{"access_token":"a2","refresh_token":"r2","expires_in":3600}"#;
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        conn.write_all(answer.as_bytes()).await.unwrap();
    });
    // No API server: storing fails, and what is kept is reported.
    let config = kube::Config::new("https://127.0.0.1:1".parse().unwrap());
    let manager = TokenManager::new(Client::try_from(config).unwrap())
        .unwrap()
        .allowing_loopback();
    let held = TokenSet::from_secret(&secret(&[(REFRESH_TOKEN, "r1")]));
    let form = vec![
        ("grant_type", SecretString::from("refresh_token")),
        ("refresh_token", SecretString::from("r1")),
    ];
    let asked = manager.exchange(
        token_tls().unwrap(),
        url,
        form,
        key("ns", "t"),
        held.clone(),
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(50), asked)
            .await
            .is_err(),
        "answered before the server did"
    );
    assert!(manager.unsaved.lock().unwrap().is_empty());

    let left = manager.store_kept(Duration::from_secs(5)).await;
    assert_kept_rotation(
        &manager,
        &held,
        "the grant that arrived after the cancel is kept",
    );
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].contains("Secret ns/t"), "{left:?}");
}

/// The grant kept for Secret ns/t: it replaced `held` and carries refresh token r2.
fn assert_kept_rotation(manager: &TokenManager, held: &TokenSet, what: &str) -> Unsaved {
    let kept = manager
        .unsaved
        .lock()
        .unwrap()
        .get(&key("ns", "t"))
        .cloned();
    let kept = kept.expect(what);
    assert!(kept.replaced.same_refresh_token(held));
    assert_eq!(
        kept.grant.refresh_token.as_ref().map(|t| t.expose_secret()),
        Some("r2")
    );
    kept
}

fn test_manager() -> TokenManager {
    // Never dialled: no API server answers, so nothing is stored.
    let config = kube::Config::new("https://127.0.0.1:1".parse().unwrap());
    TokenManager::new(Client::try_from(config).unwrap())
        .unwrap()
        .allowing_loopback()
}

/// A grant kept because its write failed is reported as at risk only if it replaced the
/// Secret's refresh token: one from an endpoint that does not rotate (Google) loses
/// nothing if it is never stored.
#[tokio::test]
async fn only_a_kept_grant_that_rotated_the_refresh_token_is_reported() {
    let manager = test_manager();
    let held = TokenSet::from_secret(&secret(&[(REFRESH_TOKEN, "r1")]));
    let same: TokenResponse = serde_json::from_str(r#"{"access_token":"a2"}"#).unwrap();
    keep(
        &manager.unsaved,
        key("ns", "google"),
        held.clone(),
        same,
        "refused".into(),
    );
    let rotated: TokenResponse =
        serde_json::from_str(r#"{"access_token":"a2","refresh_token":"r2"}"#).unwrap();
    keep(
        &manager.unsaved,
        key("ns", "rotating"),
        held,
        rotated,
        "refused".into(),
    );
    let left = manager.store_kept(Duration::from_secs(5)).await;
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].contains("Secret ns/rotating"), "{left:?}");
}

/// A ClientCredentials spec of Microsoft's for `client`, whose tokens go in Secret `t`.
fn app_spec(client: &str) -> OAuth2Spec {
    serde_yaml::from_str(&format!(
        "{{provider: Microsoft, flow: ClientCredentials, tenant: contoso.com, clientId: {client}, clientSecretRef: {{name: s}}, tokenSecretRef: {{name: t}}}}"
    ))
    .unwrap()
}

/// App-only tokens in memory serve only the settings they were granted for.
#[tokio::test]
async fn an_app_only_token_serves_only_its_own_client_and_scopes() {
    let manager = test_manager();
    let spec = app_spec;
    let imap = crate::api::Protocol::Imap;
    let at = key("ns", "t");
    manager.keep_app_token(
        at.clone(),
        &spec("app-a"),
        imap,
        secret(&[(ACCESS_TOKEN, "a")]),
    );
    assert!(manager.app_token(&at, &spec("app-a"), imap).is_some());
    assert!(manager.app_token(&at, &spec("app-b"), imap).is_none());
    // Two apps naming one Secret each keep their own token.
    manager.keep_app_token(
        at.clone(),
        &spec("app-b"),
        imap,
        secret(&[(ACCESS_TOKEN, "b")]),
    );
    let a = manager.app_token(&at, &spec("app-a"), imap).unwrap();
    assert_eq!(
        TokenSet::from_secret(&a)
            .access_token
            .unwrap()
            .expose_secret(),
        "a"
    );
    assert!(
        manager
            .app_token(&key("other", "t"), &spec("app-a"), imap)
            .is_none()
    );
}

/// App-only tokens of settings edited away (a spec changed client after client) are
/// not kept once expired, and the sweep forgets them even when nothing new is kept.
#[tokio::test]
async fn expired_app_only_tokens_of_other_settings_are_not_kept() {
    let manager = test_manager();
    let spec = app_spec;
    let imap = crate::api::Protocol::Imap;
    let at = key("ns", "t");
    let expired = Timestamp::now() - SignedDuration::from_secs(60);
    let fresh = Timestamp::now() + SignedDuration::from_secs(3600);
    let token = |value: &str, expires: Timestamp| {
        secret(&[(ACCESS_TOKEN, value), (EXPIRES_AT, &expires.to_string())])
    };
    for n in 0..100 {
        let client = format!("app-{n}");
        manager.keep_app_token(at.clone(), &spec(&client), imap, token(&client, expired));
    }
    manager.keep_app_token(at.clone(), &spec("live"), imap, token("live", fresh));
    for n in 0..100 {
        let client = format!("app-{n}");
        assert!(
            manager.app_token(&at, &spec(&client), imap).is_none(),
            "{client}"
        );
    }
    assert!(manager.app_token(&at, &spec("live"), imap).is_some());

    // Kept, then expired, with nothing kept after it: the sweep forgets it, though the
    // Secret's name is still used.
    manager.keep_app_token(at.clone(), &spec("late"), imap, token("late", expired));
    manager.retain(|_, _| true);
    assert!(manager.app_token(&at, &spec("late"), imap).is_none());
    assert!(manager.app_token(&at, &spec("live"), imap).is_some());
}

#[test]
fn a_token_without_a_known_expiry_serves_one_test_but_the_controller_refreshes_it() {
    let now = at(NOW);
    let unknown = TokenSet::from_secret(&secret(&[(ACCESS_TOKEN, "a"), (REFRESH_TOKEN, "r")]));
    assert_eq!(
        plan(
            OAuth2Flow::AuthorizationCode,
            Some(&unknown),
            now,
            Duration::ZERO
        ),
        Plan::Use
    );
    assert_eq!(
        plan(
            OAuth2Flow::AuthorizationCode,
            Some(&unknown),
            now,
            REFRESH_AHEAD
        ),
        Plan::Refresh
    );
}

/// A grant kept unstored, then a second one from it that did not rotate: the kept refresh
/// token stays the first grant's (the one the endpoint takes), never the Secret's retired
/// one.
#[tokio::test]
async fn a_second_unstored_grant_without_a_refresh_token_keeps_the_first_ones() {
    let manager = test_manager();
    let held = TokenSet::from_secret(&secret(&[(REFRESH_TOKEN, "r1")]));
    let first: TokenResponse =
        serde_json::from_str(r#"{"access_token":"a2","refresh_token":"r2"}"#).unwrap();
    keep(
        &manager.unsaved,
        key("ns", "t"),
        held.clone(),
        first,
        "refused".into(),
    );
    let second: TokenResponse = serde_json::from_str(r#"{"access_token":"a3"}"#).unwrap();
    keep(
        &manager.unsaved,
        key("ns", "t"),
        held,
        second,
        "refused".into(),
    );
    let kept = manager
        .unsaved
        .lock()
        .unwrap()
        .get(&key("ns", "t"))
        .cloned()
        .unwrap();
    let merged = TokenSet::from_secret(&updated_secret(
        Some(&secret(&[(REFRESH_TOKEN, "r1")])),
        &kept.grant,
        at(NOW),
    ));
    assert_eq!(merged.refresh_token.unwrap().expose_secret(), "r2");
    assert_eq!(merged.access_token.unwrap().expose_secret(), "a3");
}

/// A clock running ahead (a laptop's, at `mailroom authorize`) does not make the Secret
/// promise more than the token's own `exp` says.
#[test]
fn a_jwt_access_token_expires_no_later_than_its_own_exp() {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let now = at(NOW);
    let exp = now.as_second() + 600;
    let jwt = format!(
        "{}.{}.sig",
        b64(r#"{"alg":"HS256"}"#),
        b64(&format!(r#"{{"sub":"alice","exp":{exp}}}"#))
    );
    let grant: TokenResponse =
        serde_json::from_str(&format!(r#"{{"access_token":"{jwt}","expires_in":3600}}"#)).unwrap();
    let tokens = TokenSet::from_secret(&updated_secret(None, &grant, now));
    assert_eq!(tokens.expires_at, Some(at("2026-11-29T10:10:00Z")));
    // An opaque token: expires_in alone.
    let grant: TokenResponse =
        serde_json::from_str(r#"{"access_token":"opaque.token","expires_in":3600}"#).unwrap();
    let tokens = TokenSet::from_secret(&updated_secret(None, &grant, now));
    assert_eq!(tokens.expires_at, Some(at("2026-11-29T11:00:00Z")));
}

/// An API server that answers every write with 409 Conflict and every read with 500: the
/// Secret changed meanwhile, and what it holds now cannot be known. (The real API server
/// cannot be made to fail just the re-read, so this fault is scripted.)
async fn conflicted_api_server() -> (String, tokio::task::JoinHandle<Vec<String>>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let served = tokio::spawn(async move {
        let mut methods = Vec::new();
        while methods.len() < 2 {
            let (mut conn, _) = listener.accept().await.unwrap();
            loop {
                let mut request = vec![0u8; 64 * 1024];
                let n = conn.read(&mut request).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                let head = String::from_utf8_lossy(&request[..n]).to_string();
                let method = head.split(' ').next().unwrap_or_default().to_string();
                let (code, reason) = if method == "PUT" {
                    (409, "Conflict")
                } else {
                    (500, "InternalError")
                };
                let body = format!(
                    r#"{{"kind":"Status","apiVersion":"v1","status":"Failure","message":"scripted {reason}","reason":"{reason}","code":{code}}}"#
                );
                let answer = format!(
                    "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                conn.write_all(answer.as_bytes()).await.unwrap();
                methods.push(method);
                if methods.len() >= 2 {
                    break;
                }
            }
        }
        methods
    });
    (url, served)
}

/// A write that met a conflict, whose re-read then failed, keeps the grant: the Secret
/// may still hold the refresh token the grant replaced, and a rotating endpoint no longer
/// honours it.
#[tokio::test]
async fn a_grant_whose_write_conflicted_and_whose_reread_failed_is_kept() {
    let (url, served) = conflicted_api_server().await;
    let client = Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
    let manager = TokenManager::new(client.clone())
        .unwrap()
        .allowing_loopback();
    let api: kube::Api<Secret> = kube::Api::namespaced(client, "ns");
    let mut current = secret(&[(REFRESH_TOKEN, "r1"), (ACCESS_TOKEN, "a1")]);
    current.metadata.name = Some("t".into());
    current.metadata.namespace = Some("ns".into());
    current.metadata.resource_version = Some("7".into());
    let held = TokenSet::from_secret(&current);
    let grant: TokenResponse =
        serde_json::from_str(r#"{"access_token":"a2","refresh_token":"r2","expires_in":3600}"#)
            .unwrap();
    let used = manager
        .store_grant(&api, "ns", "t", &current, &held, &grant, "refresh")
        .await;
    assert_eq!(served.await.unwrap(), ["PUT", "GET"]);
    // The test goes on with the new access token.
    assert_eq!(
        TokenSet::from_secret(&used)
            .access_token
            .as_ref()
            .map(|t| t.expose_secret().to_string()),
        Some("a2".into())
    );
    let kept = assert_kept_rotation(&manager, &held, "the grant is kept to be stored later");
    assert!(kept.why.contains("scripted InternalError"), "{}", kept.why);
}

#[test]
fn a_refused_cached_token_is_replaced_where_there_is_a_way() {
    let with_refresh = TokenSet::from_secret(&secret(&[(ACCESS_TOKEN, "a"), (REFRESH_TOKEN, "r")]));
    let without = TokenSet::from_secret(&secret(&[(ACCESS_TOKEN, "a")]));
    let delegated = OAuth2Flow::AuthorizationCode;
    assert_eq!(
        plan_after_rejection(Plan::Use, delegated, Some(&with_refresh)),
        Plan::Refresh
    );
    assert_eq!(
        plan_after_rejection(Plan::Use, OAuth2Flow::ClientCredentials, Some(&without)),
        Plan::ClientCredentials
    );
    // Nothing to refresh with: the token as it is.
    assert_eq!(
        plan_after_rejection(Plan::Use, delegated, Some(&without)),
        Plan::Use
    );
    assert_eq!(
        plan_after_rejection(Plan::Required, delegated, None),
        Plan::Required
    );
}

#[tokio::test]
async fn a_cached_token_the_mail_server_refuses_is_refreshed_once() {
    let manager = test_manager();
    let provider = IncomingMailProvider::new("p", spec(OAUTH));
    let tokens = |access: &str| secret(&[(ACCESS_TOKEN, access), (REFRESH_TOKEN, "r")]);
    let cached = |access: &str| Fetched {
        namespace: "ops".into(),
        secrets: [("alice-token".to_string(), tokens(access))].into(),
        ..Default::default()
    };
    let refresh_before_using = |access: &str| {
        manager.is_rejected(
            &key("ops", "alice-token"),
            Some(&TokenSet::from_secret(&tokens(access))),
        )
    };
    assert!(!refresh_before_using("a1"));
    // Refused from the cache: refreshed before the next test, however often refused.
    manager.rejected(&provider, &cached("a1"));
    assert!(refresh_before_using("a1"));
    manager.rejected(&provider, &cached("a1"));
    assert!(refresh_before_using("a1"));
    // The token granted then is refused too: used until it expires, not refreshed at
    // every test, nor when refused again from the cache.
    let mut granted = cached("a2");
    granted.token_granted = true;
    manager.rejected(&provider, &granted);
    assert!(!refresh_before_using("a2"));
    manager.rejected(&provider, &cached("a2"));
    assert!(!refresh_before_using("a2"));
    // The next token (refreshed at its expiry), refused from the cache: refreshed once.
    assert!(!refresh_before_using("a3"));
    manager.rejected(&provider, &cached("a3"));
    assert!(refresh_before_using("a3"));
}

#[test]
fn an_oauth2_ca_bundle_adds_its_certificates_or_says_what_is_wrong() {
    let ca: &[u8] = include_bytes!("../../probe/testdata/ca.pem");
    assert!(token_tls_with(Some(ca)).is_ok());
    assert!(token_tls_with(None).is_ok());
    for (bundle, said) in [
        (&b"not a certificate"[..], "holds no PEM certificate"),
        (&[0x30, 0x82, 0x01][..], "holds no PEM certificate"),
        (
            &b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n"[..],
            "not valid PEM",
        ),
    ] {
        let error = token_tls_with(Some(bundle)).unwrap_err();
        assert!(
            error.starts_with("spec.authentication.oauth2.caBundleRef: ") && error.contains(said),
            "{error}"
        );
    }
}
