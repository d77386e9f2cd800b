//! Providers that fail say why, in the reason of DESIGN §2 and the server's own words,
//! and recover as soon as the cause is fixed.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};

use crate::support::{ALICE_AUTH, Env, alice_env, condition, provider, ready, trust_bed_ca};

#[tokio::test]
async fn a_wrong_password_quotes_the_server_and_fixing_the_secret_heals_at_once() {
    let env = Env::new("wrongpw").await;
    trust_bed_ca(&env).await;
    env.secret(
        "alice",
        &[("username", "alice"), ("password", "not-the-password")],
    )
    .await;
    let port = env.bed.dovecot().imaps_port();
    env.apply(&provider("alice", "IMAP", port, "Implicit", ALICE_AUTH, ""));
    let _controller = env.controller();

    let p = env
        .wait_reason("alice", "AuthenticationFailed", Duration::from_secs(60))
        .await;
    let r = ready(&p).unwrap();
    assert_eq!(r.status, "False");
    assert!(
        r.message.contains("Authentication failed"),
        "the server's words should be quoted: {:?}",
        r.message
    );
    assert_eq!(condition(&p, "Reachable").unwrap().status, "True");
    assert_eq!(condition(&p, "Authenticated").unwrap().status, "False");

    // Retried (after 10 s) and failing again: two in a row.
    env.wait(
        "alice",
        "two failures in a row",
        Duration::from_secs(30),
        |p| {
            p.status
                .as_ref()
                .is_some_and(|s| s.consecutive_failures >= 2)
        },
    )
    .await;
    // Another password, wrong too: a new value's failures count from one (its retries
    // start again at 10 s, and a GitOps health check gives it its three tests).
    env.secret(
        "alice",
        &[
            ("username", "alice"),
            ("password", "still-not-the-password"),
        ],
    )
    .await;
    let p = env
        .wait(
            "alice",
            "the new value tested",
            Duration::from_secs(20),
            |p| {
                let s = p.status.as_ref().unwrap();
                s.consecutive_failures == 1 || s.consecutive_failures > 2
            },
        )
        .await;
    assert_eq!(p.status.unwrap().consecutive_failures, 1);

    // The interval is 5m; the Secret's change must be noticed now, not then.
    let (_, password) = env.bed.dovecot().account("alice");
    let fixed = Instant::now();
    env.secret("alice", &[("username", "alice"), ("password", &password)])
        .await;
    env.wait_reason("alice", "Connected", Duration::from_secs(20))
        .await;
    eprintln!("secret fix reflected in {:?}", fixed.elapsed());
}

#[tokio::test]
async fn a_missing_secret_or_key_is_named_and_creating_it_heals() {
    let env = Env::new("nosecret").await;
    trust_bed_ca(&env).await;
    let port = env.bed.dovecot().pop3s_port();
    env.apply(&provider(
        "bob",
        "POP3",
        port,
        "Implicit",
        "{method: Password, secretRef: {name: bob-mail}}",
        "",
    ));
    let _controller = env.controller();

    let p = env
        .wait_reason("bob", "SecretNotFound", Duration::from_secs(60))
        .await;
    let msg = &ready(&p).unwrap().message;
    assert!(msg.contains("bob-mail") && msg.contains(&env.ns), "{msg:?}");
    assert_eq!(condition(&p, "Reachable").unwrap().status, "Unknown");

    env.secret("bob-mail", &[("username", "bob")]).await;
    let p = env
        .wait_reason("bob", "SecretKeyMissing", Duration::from_secs(20))
        .await;
    let msg = &ready(&p).unwrap().message;
    assert!(
        msg.contains("\"password\""),
        "the missing key should be named: {msg:?}"
    );

    let (user, password) = env.bed.dovecot().account("bob");
    env.secret("bob-mail", &[("username", &user), ("password", &password)])
        .await;
    env.wait_reason("bob", "Connected", Duration::from_secs(20))
        .await;
}

/// A CA bundle ConfigMap is watched as Secrets are: created, or changed, it re-tests its
/// providers at once, not after their backoff (10 s here) or interval.
#[tokio::test]
async fn a_ca_bundle_created_or_changed_is_tested_at_once() {
    let env = alice_env("ca-change").await;
    env.apply(
        &provider(
            "imaps",
            "IMAP",
            env.bed.dovecot().imaps_port(),
            "Implicit",
            ALICE_AUTH,
            "",
        )
        .replace("name: test-ca", "name: later-ca"),
    );
    let _controller = env.controller();
    let p = env
        .wait_reason("imaps", "SecretNotFound", Duration::from_secs(60))
        .await;
    assert!(ready(&p).unwrap().message.contains("later-ca"), "{p:?}");

    // Another CA's certificate: the server's is not trusted.
    let ca = |file: &std::path::Path| {
        let pem = std::fs::read_to_string(file).unwrap();
        serde_json::json!({"metadata": {"name": "later-ca"}, "data": {"ca.crt": pem}})
    };
    let other = env.bed.self_signed_dovecot().ca_file();
    let api: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.ns);
    api.create(
        &PostParams::default(),
        &serde_json::from_value(ca(&other)).unwrap(),
    )
    .await
    .unwrap();
    env.wait_reason("imaps", "CertificateInvalid", Duration::from_secs(8))
        .await;

    let right = env.bed.dovecot().ca_file();
    api.patch(
        "later-ca",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(ca(&right)),
    )
    .await
    .unwrap();
    env.wait_reason("imaps", "Connected", Duration::from_secs(8))
        .await;
}

#[tokio::test]
async fn network_failures_are_classified() {
    let env = Env::new("network").await;
    trust_bed_ca(&env).await;
    env.secret("alice", &[("username", "alice"), ("password", "whatever")])
        .await;

    // A port nobody listens on.
    let closed = {
        let l = std::net::TcpListener::bind((mailroom_testbed::MAIL_HOST, 0)).unwrap();
        l.local_addr().unwrap().port()
    };
    env.apply(&provider(
        "closed", "IMAP", closed, "Implicit", ALICE_AUTH, "",
    ));
    // A name that cannot resolve (.invalid is reserved for exactly this).
    env.apply(
        &provider("nxdomain", "IMAP", 993, "Implicit", ALICE_AUTH, "").replace(
            &format!("host: {}", mailroom_testbed::MAIL_HOST),
            "host: no-such-host.invalid",
        ),
    );
    // A listener that accepts and never speaks: the greeting never comes.
    let tarpit = std::net::TcpListener::bind((mailroom_testbed::MAIL_HOST, 0)).unwrap();
    let tarpit_port = tarpit.local_addr().unwrap().port();
    let _hold = std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in tarpit.incoming().flatten() {
            held.push(conn);
        }
    });
    env.apply(
        &provider("tarpit", "IMAP", tarpit_port, "None", "{method: None}", "")
            .replace("timeout: 10s", "timeout: 3s"),
    );
    // A POP3 server where an IMAP one is expected.
    let pop3s = env.bed.dovecot().pop3s_port();
    env.apply(&provider(
        "wrong-protocol",
        "IMAP",
        pop3s,
        "Implicit",
        ALICE_AUTH,
        "",
    ));

    let started = Instant::now();
    let _controller = env.controller();
    let p = env
        .wait_reason("closed", "ConnectionRefused", Duration::from_secs(60))
        .await;
    assert!(ready(&p).unwrap().message.contains(&closed.to_string()));
    assert_eq!(condition(&p, "Reachable").unwrap().status, "False");
    let p = env
        .wait_reason("nxdomain", "DNSResolutionFailed", Duration::from_secs(60))
        .await;
    assert!(ready(&p).unwrap().message.contains("no-such-host.invalid"));
    let p = env
        .wait_reason("tarpit", "Timeout", Duration::from_secs(60))
        .await;
    let msg = &ready(&p).unwrap().message;
    assert!(
        msg.contains("greeting"),
        "the timeout should name the greeting step: {msg:?}"
    );
    let took = p
        .status
        .as_ref()
        .unwrap()
        .last_check_duration
        .clone()
        .unwrap_or_default();
    assert!(started.elapsed() < Duration::from_secs(60));
    assert!(
        took.ends_with('s')
            && !took.ends_with("ms")
            && took.trim_end_matches('s').parse::<f64>().unwrap() <= 4.0,
        "the test must end within check.timeout (3s), took {took}"
    );
    let p = env
        .wait_reason("wrong-protocol", "ProtocolError", Duration::from_secs(60))
        .await;
    let msg = &ready(&p).unwrap().message;
    assert!(
        msg.contains("+OK"),
        "the POP3 greeting should be quoted: {msg:?}"
    );

    // Run from a person's machine, a network failure may be that machine's alone: the
    // output says so, and how to have the controller test instead.
    let (code, stdout, _) = env.mailroom(&["check", "nxdomain", "-n", &env.ns]);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains("DNSResolutionFailed")
            && stdout.contains("this test ran from this machine")
            && stdout.contains(&format!("`mailroom retest nxdomain -n {}`", env.ns)),
        "{stdout}"
    );
    // Run as the kubectl plugin, the command it suggests is typed the same way.
    let (code, stdout, _) = env.kubectl_mailroom(&["check", "nxdomain", "-n", &env.ns]);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains(&format!("`kubectl mailroom retest nxdomain -n {}`", env.ns)),
        "{stdout}"
    );
}

#[tokio::test]
async fn certificates_are_verified_and_a_ca_bundle_or_pinned_certificate_is_trusted() {
    let env = Env::new("certs").await;
    trust_bed_ca(&env).await;
    let (user, password) = env.bed.dovecot().account("alice");
    env.secret("alice", &[("username", &user), ("password", &password)])
        .await;
    let port = env.bed.dovecot().imaps_port();
    let untrusted = provider("untrusted", "IMAP", port, "Implicit", ALICE_AUTH, "")
        .replace(", caBundleRef: {kind: ConfigMap, name: test-ca}", "");
    env.apply(&untrusted);
    env.apply(
        &provider("wrong-name", "IMAP", port, "Implicit", ALICE_AUTH, "").replace(
            "mode: Implicit,",
            "mode: Implicit, serverName: mail.example.org,",
        ),
    );
    // An on-premises style server: a self-signed certificate marked CA:TRUE.
    let selfsigned = env.bed.self_signed_dovecot();
    let pem = std::fs::read_to_string(selfsigned.ca_file()).unwrap();
    let cm: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "pinned"}, "data": {"ca.crt": pem}
    }))
    .unwrap();
    Api::namespaced(env.client.clone(), &env.ns)
        .create(&PostParams::default(), &cm)
        .await
        .unwrap();
    let (user2, password2) = selfsigned.account("alice");
    env.secret("alice2", &[("username", &user2), ("password", &password2)])
        .await;
    let pinned_auth = "{method: Password, secretRef: {name: alice2}}";
    env.apply(
        &provider(
            "pinned",
            "IMAP",
            selfsigned.imaps_port(),
            "Implicit",
            pinned_auth,
            "",
        )
        .replace("name: test-ca", "name: pinned"),
    );
    env.apply(&provider(
        "selfsigned-untrusted",
        "IMAP",
        selfsigned.imaps_port(),
        "Implicit",
        pinned_auth,
        "",
    ));
    // The same server, its certificate not verified: Ready, and the message says so.
    env.apply(
        &provider(
            "unverified",
            "IMAP",
            selfsigned.imaps_port(),
            "Implicit",
            pinned_auth,
            "",
        )
        .replace(
            "caBundleRef: {kind: ConfigMap, name: test-ca}",
            "insecureSkipVerify: true",
        ),
    );
    let _controller = env.controller();

    let p = env
        .wait_reason("unverified", "Connected", Duration::from_secs(60))
        .await;
    let msg = &ready(&p).unwrap().message;
    assert!(
        msg.contains("WARNING: the server's certificate is not verified (tls.insecureSkipVerify)"),
        "{msg:?}"
    );
    let p = env
        .wait_reason("untrusted", "CertificateInvalid", Duration::from_secs(60))
        .await;
    let msg = &ready(&p).unwrap().message;
    assert!(
        msg.contains("caBundleRef"),
        "an untrusted issuer should point at caBundleRef: {msg:?}"
    );
    let p = env
        .wait_reason("wrong-name", "CertificateInvalid", Duration::from_secs(60))
        .await;
    let msg = &ready(&p).unwrap().message;
    assert!(
        msg.contains("mail.example.org") && msg.contains("localhost"),
        "the mismatch should name both: {msg:?}"
    );
    let p = env
        .wait_reason(
            "selfsigned-untrusted",
            "CertificateInvalid",
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(ready(&p).unwrap().status, "False");
    env.wait_reason("pinned", "Connected", Duration::from_secs(60))
        .await;

    // The same untrusted provider, once it names the CA, is Ready.
    env.apply(&provider(
        "untrusted",
        "IMAP",
        port,
        "Implicit",
        ALICE_AUTH,
        "",
    ));
    env.wait_reason("untrusted", "Connected", Duration::from_secs(30))
        .await;
}

#[tokio::test]
async fn starttls_that_is_not_offered_fails_before_any_credential_is_sent() {
    let env = Env::new("nostarttls").await;
    let plain = env.bed.plaintext_dovecot();
    let (user, password) = plain.account("alice");
    env.secret("alice", &[("username", &user), ("password", &password)])
        .await;
    let imap = provider(
        "imap",
        "IMAP",
        plain.imap_port(),
        "StartTLS",
        ALICE_AUTH,
        "",
    )
    .replace(", caBundleRef: {kind: ConfigMap, name: test-ca}", "");
    let pop3 = provider(
        "pop3",
        "POP3",
        plain.pop3_port(),
        "StartTLS",
        ALICE_AUTH,
        "",
    )
    .replace(", caBundleRef: {kind: ConfigMap, name: test-ca}", "");
    env.apply(&imap);
    env.apply(&pop3);
    let _controller = env.controller();
    for name in ["imap", "pop3"] {
        let p = env
            .wait_reason(name, "StartTLSUnavailable", Duration::from_secs(60))
            .await;
        assert_eq!(
            condition(&p, "Authenticated").unwrap().status,
            "Unknown",
            "{name}"
        );
    }
    // Dovecot logs every login attempt; there must be none, from either provider.
    let log = plain.log();
    assert!(
        log.contains("no auth attempts"),
        "Dovecot should log disconnects without auth:\n{log}"
    );
    assert!(
        !log.contains("user=<alice>"),
        "credentials reached the server:\n{log}"
    );
}

#[tokio::test]
async fn a_mailbox_that_does_not_exist_is_unavailable() {
    let env = alice_env("nomailbox").await;
    let port = env.bed.dovecot().imaps_port();
    env.apply(
        &provider("nofolder", "IMAP", port, "Implicit", ALICE_AUTH, "")
            .replace("timeout: 10s}", "timeout: 10s, mailbox: NoSuchFolder}"),
    );
    env.apply(
        &provider("archive", "IMAP", port, "Implicit", ALICE_AUTH, "")
            .replace("timeout: 10s}", "timeout: 10s, mailbox: Archive}"),
    );
    let _controller = env.controller();
    let p = env
        .wait_reason("nofolder", "MailboxUnavailable", Duration::from_secs(60))
        .await;
    let msg = &ready(&p).unwrap().message;
    assert!(msg.contains("NoSuchFolder"), "{msg:?}");
    assert_eq!(condition(&p, "Authenticated").unwrap().status, "True");
    let p = env
        .wait_reason("archive", "Connected", Duration::from_secs(60))
        .await;
    assert_eq!(p.status.unwrap().mailbox.unwrap().name, "Archive");
}

/// A POP3 session of its own, logged in and held open, as a mail client that downloads
/// the mailbox holds it.
fn hold_pop3_mailbox(port: u16, user: &str, password: &str) -> std::net::TcpStream {
    use std::io::{BufRead, BufReader, Write};
    let stream = std::net::TcpStream::connect((mailroom_testbed::MAIL_HOST, port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let expect_ok = |reader: &mut BufReader<std::net::TcpStream>| {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.starts_with("+OK"), "{line:?}");
    };
    expect_ok(&mut reader);
    let mut w = stream.try_clone().unwrap();
    for command in [format!("USER {user}"), format!("PASS {password}")] {
        w.write_all(format!("{command}\r\n").as_bytes()).unwrap();
        expect_ok(&mut reader);
    }
    stream
}

#[tokio::test]
async fn a_pop3_mailbox_held_by_another_session_is_unavailable_not_a_wrong_password() {
    let env = Env::new("inuse").await;
    let plain = env.bed.plaintext_dovecot();
    let (user, password) = mailroom_testbed::LOCKING_ACCOUNT;
    env.secret("carol", &[("username", user), ("password", password)])
        .await;
    // Dovecot waits some 10 s for the lock before it gives up: a timeout above that.
    let pop3 = provider(
        "carol",
        "POP3",
        plain.pop3_port(),
        "None",
        "{method: Password, secretRef: {name: carol}, allowUnencrypted: true}",
        "",
    )
    .replace(", caBundleRef: {kind: ConfigMap, name: test-ca}", "")
    .replace("timeout: 10s", "timeout: 25s");
    let held = hold_pop3_mailbox(plain.pop3_port(), user, password);
    env.apply(&pop3);
    let _controller = env.controller();
    let p = env
        .wait_reason("carol", "MailboxUnavailable", Duration::from_secs(60))
        .await;
    let msg = &ready(&p).unwrap().message;
    assert!(
        msg.contains("another session holds the mailbox") && msg.contains("[IN-USE]"),
        "{msg:?}"
    );
    assert_eq!(
        condition(&p, "Authenticated").unwrap().status,
        "True",
        "IN-USE comes after the password was accepted"
    );

    // The other session ends: the next test gets in.
    drop(held);
    env.kubectl(&[
        "annotate",
        "imp/carol",
        "mailroom.dev/check-requested-at=released",
        "--overwrite",
    ]);
    let p = env
        .wait_reason("carol", "Connected", Duration::from_secs(60))
        .await;
    // A password in the clear is said as loudly as an unverified certificate.
    let msg = &ready(&p).unwrap().message;
    assert!(
        msg.contains("WARNING: the password is sent without TLS (authentication.allowUnencrypted)"),
        "{msg:?}"
    );
}

#[tokio::test]
async fn a_server_failing_on_its_side_is_server_unavailable_not_a_wrong_password() {
    let env = Env::new("unavailable").await;
    trust_bed_ca(&env).await;
    env.secret(
        "dave",
        &[
            ("username", mailroom_testbed::UNAVAILABLE_USER),
            ("password", "any"),
        ],
    )
    .await;
    let d = env.bed.dovecot();
    let auth = "{method: Password, secretRef: {name: dave}}";
    env.apply(&provider(
        "imap",
        "IMAP",
        d.imaps_port(),
        "Implicit",
        auth,
        "",
    ));
    env.apply(&provider(
        "pop3",
        "POP3",
        d.pop3s_port(),
        "Implicit",
        auth,
        "",
    ));
    let _controller = env.controller();
    for (name, code) in [("imap", "[UNAVAILABLE]"), ("pop3", "[SYS/TEMP]")] {
        let p = env
            .wait_reason(name, "ServerUnavailable", Duration::from_secs(60))
            .await;
        let msg = &ready(&p).unwrap().message;
        assert!(
            msg.contains("temporary failure on its side, not a wrong login") && msg.contains(code),
            "{name}: {msg:?}"
        );
        assert_eq!(condition(&p, "Reachable").unwrap().status, "True");
        assert_eq!(
            condition(&p, "Authenticated").unwrap().status,
            "Unknown",
            "{name}: the server's failure says nothing of the login"
        );
    }
}
