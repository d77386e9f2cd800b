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
            "{protocol:?} with {mechanism:?}: {:?}\nDovecot log: {}",
            report.failure,
            d.log_path().display()
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
