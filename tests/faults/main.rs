//! Fault tests: the controller comes back by itself from what a real cluster sees. They
//! stop and start shared parts of the bed (Dovecot), so they run in their own test binary
//! with their own bed, never beside the other end-to-end tests.

// Shared with the e2e binary; not every helper is used here.
#[allow(dead_code)]
#[path = "../e2e/support.rs"]
mod support;

mod fleet;
mod hostile;
mod oauth2;

use std::time::{Duration, Instant};

use support::{ALICE_AUTH, Env, alice_env, provider, ready};

#[tokio::test]
async fn a_stopped_mail_server_is_refused_and_its_return_is_noticed_before_the_interval() {
    // Its own Dovecot (the bed's self-signed one), so that stopping it disturbs no other
    // test of this binary.
    let env = Env::new("dovecot-restart").await;
    let d = env.bed.self_signed_dovecot();
    let pem = std::fs::read_to_string(d.ca_file()).unwrap();
    env.apply(&format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: test-ca}}\ndata:\n  ca.crt: |\n{}\n",
        pem.lines()
            .map(|l| format!("    {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    ));
    let (user, password) = d.account("alice");
    env.secret("alice", &[("username", &user), ("password", &password)])
        .await;
    env.apply(&provider(
        "imaps",
        "IMAP",
        d.imaps_port(),
        "Implicit",
        ALICE_AUTH,
        "",
    ));
    env.apply(&provider(
        "pop3",
        "POP3",
        d.pop3_port(),
        "StartTLS",
        ALICE_AUTH,
        "",
    ));
    // And one tested every 30 s, that nobody asks about: its next test finds the server
    // gone by itself.
    env.apply(
        &provider(
            "unattended",
            "IMAP",
            d.imaps_port(),
            "Implicit",
            ALICE_AUTH,
            "",
        )
        .replace("interval: 5m", "interval: 30s"),
    );
    let _controller = env.controller();
    env.wait_reason("imaps", "Connected", Duration::from_secs(60))
        .await;
    env.wait_reason("pop3", "Connected", Duration::from_secs(60))
        .await;
    env.wait_reason("unattended", "Connected", Duration::from_secs(60))
        .await;

    d.stop();
    let stopped = Instant::now();
    // Nothing triggers a test when a server goes away; the next scheduled one is at the
    // interval (5m). Ask for one, as a user's alert runbook would.
    for name in ["imaps", "pop3"] {
        let out = env.kubectl(&[
            "annotate",
            &format!("imp/{name}"),
            "mailroom.dev/check-requested-at=down",
            "--overwrite",
        ]);
        assert!(out.status.success());
    }
    for name in ["imaps", "pop3"] {
        let p = env
            .wait_reason(name, "ConnectionRefused", Duration::from_secs(20))
            .await;
        assert_eq!(p.status.unwrap().consecutive_failures, 1);
    }
    // Within its interval, its jitter (3 s) and its refused connection's moment.
    env.wait_reason("unattended", "ConnectionRefused", Duration::from_secs(40))
        .await;
    eprintln!(
        "the unattended provider saw the server gone {:?} after it stopped",
        stopped.elapsed()
    );
    d.start().expect("restarting Dovecot");
    let back = Instant::now();
    // Failures retry after ~10 s (then 20, 40, ...), not after the 5 m interval.
    for name in ["imaps", "pop3"] {
        env.wait_reason(name, "Connected", Duration::from_secs(45))
            .await;
    }
    eprintln!("Ready again {:?} after Dovecot came back", back.elapsed());
}

#[tokio::test]
async fn a_secret_rotated_a_hundred_times_ends_in_the_status_of_its_last_value() {
    let env = alice_env("rotate").await;
    let d = env.bed.dovecot();
    env.apply_alice_imaps("imaps");
    let _controller = env.controller();
    env.wait_reason("imaps", "Connected", Duration::from_secs(60))
        .await;
    let (user, password) = d.account("alice");
    for i in 0..100 {
        let pw = if i % 2 == 0 {
            format!("wrong-{i}")
        } else {
            password.clone()
        };
        env.secret("alice", &[("username", &user), ("password", &pw)])
            .await;
    }
    // The last value (i = 99) is the right one; then one more, wrong, as the final word.
    env.secret("alice", &[("username", &user), ("password", "wrong-final")])
        .await;
    let p = env
        .wait_reason("imaps", "AuthenticationFailed", Duration::from_secs(30))
        .await;
    assert_eq!(ready(&p).unwrap().status, "False");
    env.secret("alice", &[("username", &user), ("password", &password)])
        .await;
    env.wait_reason("imaps", "Connected", Duration::from_secs(30))
        .await;
}

#[tokio::test]
async fn a_controller_killed_mid_burst_gives_every_provider_a_fresh_status_when_restarted() {
    let env = alice_env("sigkill").await;
    let d = env.bed.dovecot();
    let names: Vec<String> = (0..40).map(|i| format!("burst-{i:02}")).collect();
    for (i, name) in names.iter().enumerate() {
        let (protocol, port) = if i % 2 == 0 {
            ("IMAP", d.imaps_port())
        } else {
            ("POP3", d.pop3s_port())
        };
        env.apply(&provider(name, protocol, port, "Implicit", ALICE_AUTH, ""));
    }
    let mut first = env.controller_with(&["--per-host-concurrency", "2"]);
    // Kill it while the burst is under way: some providers tested, some not.
    let deadline = Instant::now() + Duration::from_secs(60);
    while first.tests() < 5 {
        assert!(
            Instant::now() < deadline,
            "no tests started:\n{}",
            first.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    let done_before = first.tests();
    assert!(
        done_before < names.len(),
        "the burst finished before the kill; nothing to prove"
    );
    // Those whose result reached the API server before the kill.
    let written: Vec<String> = env
        .providers()
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|p| {
            p.status
                .as_ref()
                .is_some_and(|s| s.last_check_time.is_some())
        })
        .map(|p| p.metadata.name.unwrap())
        .collect();

    let second = env.controller();
    for name in &names {
        env.wait_reason(name, "Connected", Duration::from_secs(60))
            .await;
    }
    // Providers tested and written before the kill are not tested again at once (their
    // schedule resumes from the status); the others are, each exactly once. (A test
    // logged but not yet written when the kill came counts among the others.)
    let untested = names.len() - done_before;
    let logs = second.logs();
    let tested: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains(" tested"))
        .filter_map(|l| l.split(" name=").nth(1)?.split(['}', ' ']).next())
        .collect();
    assert!(
        tested.len() >= untested,
        "the {untested} untested providers must be tested:\n{logs}"
    );
    let mut unique = tested.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        tested.len(),
        "a provider was tested twice after the restart:\n{logs}"
    );
    let again: Vec<&&str> = tested
        .iter()
        .filter(|n| written.iter().any(|w| w == *n))
        .collect();
    assert!(
        again.is_empty(),
        "tested again after the restart though their status was written before the kill: {again:?}\n{logs}"
    );
}
