//! No secret value reaches the controller's logs, Events, status or the CLI's output.

use std::time::Duration;

use crate::support::{ALICE_AUTH, Env, MAILROOM, provider, trust_bed_ca};

#[tokio::test]
async fn a_planted_password_appears_nowhere() {
    let env = Env::new("secrecy").await;
    trust_bed_ca(&env).await;
    const PLANTED: &str = "Pl4nted-Passw0rd-7f3a9c";
    env.secret("alice", &[("username", "alice"), ("password", PLANTED)])
        .await;
    let d = env.bed.dovecot();
    env.apply_alice_imaps("imap");
    env.apply(&provider(
        "pop3",
        "POP3",
        d.pop3_port(),
        "StartTLS",
        ALICE_AUTH,
        "",
    ));
    // At trace level every library logs all it does: still no password.
    let controller = env.controller_with(&["--log", "trace"]);
    env.wait_reason("imap", "AuthenticationFailed", Duration::from_secs(60))
        .await;
    env.wait_reason("pop3", "AuthenticationFailed", Duration::from_secs(60))
        .await;

    let out = std::process::Command::new(MAILROOM)
        .args(["check", "imap", "-n", &env.ns])
        .env("KUBECONFIG", env.bed.kubeconfig_path())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "check of a failing provider exits 1"
    );
    let cli = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(cli.contains("AuthenticationFailed"), "{cli}");

    assert!(
        !cli.contains(PLANTED),
        "the password appeared in mailroom check's output"
    );
    crate::support::assert_nowhere(&env, &controller.logs(), &[PLANTED]).await;
}
