//! Providers that work go Ready=True (Connected) over every TLS mode of both protocols,
//! with what the server said filled into the status.

use std::time::Duration;

use crate::support::{ALICE_AUTH, Env, alice_env, condition, provider, ready, trust_bed_ca};

#[tokio::test]
async fn each_protocol_and_tls_mode_goes_ready_with_the_details_filled_in() {
    let env = alice_env("ready").await;
    let d = env.bed.dovecot();
    let cases = [
        ("imaps", "IMAP", d.imaps_port(), "Implicit"),
        ("imap-starttls", "IMAP", d.imap_port(), "StartTLS"),
        ("pop3s", "POP3", d.pop3s_port(), "Implicit"),
        ("pop3-stls", "POP3", d.pop3_port(), "StartTLS"),
    ];
    for (name, protocol, port, mode) in cases {
        env.apply(&provider(name, protocol, port, mode, ALICE_AUTH, ""));
    }
    let _controller = env.controller();

    for (name, protocol, port, mode) in cases {
        let p = env
            .wait_reason(name, "Connected", Duration::from_secs(60))
            .await;
        let status = p.status.as_ref().unwrap();
        let r = ready(&p).unwrap();
        assert_eq!(r.status, "True", "{name}: {r:?}");
        assert!(
            r.message.contains("logged in as alice"),
            "{name}: Ready message {:?}",
            r.message
        );
        assert_eq!(condition(&p, "Reachable").unwrap().status, "True");
        assert_eq!(condition(&p, "Authenticated").unwrap().status, "True");
        assert_eq!(r.observed_generation, p.metadata.generation);
        assert_eq!(status.observed_generation, p.metadata.generation);

        let endpoint = status.endpoint.as_ref().unwrap();
        assert_eq!(
            (
                endpoint.port,
                endpoint.protocol.as_str(),
                endpoint.tls_mode.as_str()
            ),
            (i32::from(port), protocol, mode)
        );
        let server = status.server.as_ref().expect("status.server");
        let greeting = server.greeting.as_deref().unwrap_or_default();
        assert!(
            greeting.contains("Dovecot") || greeting.contains("ready"),
            "{name}: greeting {greeting:?}"
        );
        assert!(!server.capabilities.is_empty(), "{name}: no capabilities");
        let tls = status.tls.as_ref().expect("status.tls");
        assert!(
            tls.version.starts_with("TLSv1."),
            "{name}: TLS version {:?}",
            tls.version
        );
        assert!(!tls.cipher_suite.is_empty());
        let cert = tls
            .peer_certificate
            .as_ref()
            .expect("status.tls.peerCertificate");
        assert!(
            cert.dns_names.iter().any(|n| n == "localhost"),
            "{name}: certificate names {:?}",
            cert.dns_names
        );
        assert!(!cert.not_after.is_empty());
        let mailbox = status.mailbox.as_ref().expect("status.mailbox");
        assert_eq!(mailbox.messages, 3, "{name}: mailbox {mailbox:?}");
        if protocol == "IMAP" {
            assert_eq!(mailbox.name, "INBOX");
            assert_eq!(mailbox.unseen, Some(2), "{name}: mailbox {mailbox:?}");
        }
        assert!(status.last_check_time.is_some() && status.last_success_time.is_some());
        assert_eq!(status.consecutive_failures, 0);
        // Written by server-side apply, by one field manager: the status is the
        // controller's alone, and a manifest applied by a user or GitOps owns none of it.
        let status_managers: Vec<(String, String)> = p
            .metadata
            .managed_fields
            .iter()
            .flatten()
            .filter(|f| f.subresource.as_deref() == Some("status"))
            .map(|f| {
                (
                    f.manager.clone().unwrap_or_default(),
                    f.operation.clone().unwrap_or_default(),
                )
            })
            .collect();
        assert_eq!(
            status_managers,
            vec![("mailroom".to_string(), "Apply".to_string())],
            "{name}: managers of the status"
        );
    }

    // What GitOps tools and scripts use: kubectl wait on the Ready condition.
    let out = env.kubectl(&[
        "wait",
        "--for=condition=Ready",
        "--timeout=30s",
        "imp/imaps",
        "mailprovider/pop3-stls",
    ]);
    assert!(
        out.status.success(),
        "kubectl wait: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // And the printer columns people read.
    let out = env.kubectl(&["get", "imp", "imaps", "-o", "wide"]);
    let table = String::from_utf8_lossy(&out.stdout);
    let header = table.lines().next().unwrap_or_default();
    for column in [
        "PROTOCOL",
        "HOST",
        "PORT",
        "READY",
        "REASON",
        "LAST CHECK",
        "AGE",
        "MESSAGE",
    ] {
        assert!(
            header.contains(column),
            "column {column} missing from:\n{table}"
        );
    }
    assert!(
        table.contains("Connected") && table.contains("True"),
        "{table}"
    );
}

#[tokio::test]
async fn a_connectivity_only_provider_is_ready_without_a_login() {
    let env = Env::new("anon").await;
    trust_bed_ca(&env).await;
    let port = env.bed.dovecot().imaps_port();
    env.apply(&provider(
        "anon",
        "IMAP",
        port,
        "Implicit",
        "{method: None}",
        "",
    ));
    let _controller = env.controller();
    let p = env
        .wait_reason("anon", "Connected", Duration::from_secs(60))
        .await;
    let auth = condition(&p, "Authenticated").unwrap();
    assert_eq!(
        (auth.status.as_str(), auth.reason.as_str()),
        ("True", "NotRequired")
    );
    assert!(
        p.status.unwrap().mailbox.is_none(),
        "no login, so no mailbox"
    );
}

/// A provider moved to another server (an edit of host, port, protocol or TLS mode) shows
/// nothing of the old one: its greeting, certificate and mailbox counts read beside the
/// new endpoint would say the new one answered.
#[tokio::test]
async fn a_provider_moved_to_another_server_shows_nothing_of_the_old_one() {
    let env = alice_env("moved").await;
    let d = env.bed.dovecot();
    env.apply(&provider(
        "moved",
        "IMAP",
        d.imaps_port(),
        "Implicit",
        ALICE_AUTH,
        "",
    ));
    let _controller = env.controller();
    let p = env
        .wait_reason("moved", "Connected", Duration::from_secs(60))
        .await;
    let status = p.status.unwrap();
    assert!(status.server.is_some() && status.tls.is_some() && status.mailbox.is_some());

    let closed = {
        let l = std::net::TcpListener::bind((mailroom_testbed::MAIL_HOST, 0)).unwrap();
        l.local_addr().unwrap().port()
    };
    env.apply(&provider(
        "moved", "IMAP", closed, "Implicit", ALICE_AUTH, "",
    ));
    let p = env
        .wait_reason("moved", "ConnectionRefused", Duration::from_secs(60))
        .await;
    let status = p.status.unwrap();
    assert_eq!(status.endpoint.unwrap().port, i32::from(closed));
    assert_eq!(
        (status.server, status.tls, status.mailbox),
        (None, None, None),
        "what was found of the old endpoint"
    );
}
