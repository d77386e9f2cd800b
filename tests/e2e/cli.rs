//! `mailroom check`: the same test, now, with the caller's credentials or from a manifest.

use std::process::Command;

use crate::support::{ALICE_AUTH, Env, MAILROOM, provider, trust_bed_ca};

#[tokio::test]
async fn check_prints_each_step_and_exits_zero_only_when_ready() {
    let env = Env::new("cli").await;
    trust_bed_ca(&env).await;
    let (user, password) = env.bed.dovecot().account("alice");
    env.secret("alice", &[("username", &user), ("password", &password)])
        .await;
    let port = env.bed.dovecot().imap_port();
    env.apply(&provider(
        "starttls", "IMAP", port, "StartTLS", ALICE_AUTH, "",
    ));

    let out = Command::new(MAILROOM)
        .args(["check", "starttls", "-n", &env.ns])
        .env("KUBECONFIG", env.bed.kubeconfig_path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for step in [
        "connect",
        "greeting",
        "STARTTLS",
        "TLS handshake",
        "authenticate",
        "mailbox",
        "Ready=True",
    ] {
        assert!(text.contains(step), "step {step} missing from:\n{text}");
    }
    assert!(
        text.contains("Dovecot"),
        "the server's words should be printed:\n{text}"
    );

    // As a kubectl plugin: the same binary under the plugin's name.
    let plugin_dir = tempfile::tempdir().unwrap();
    let plugin = plugin_dir.path().join("kubectl-mailroom");
    std::os::unix::fs::symlink(MAILROOM, &plugin).unwrap();
    let path = format!(
        "{}:{}",
        plugin_dir.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new(env.bed.kubectl_path())
        .args(["mailroom", "check", "starttls", "-n", &env.ns])
        .env("KUBECONFIG", env.bed.kubeconfig_path())
        .env("PATH", path)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "kubectl mailroom check: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A manifest tested before it is applied, with its Secret from a file too.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("provider.yaml");
    let secret = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: alice}}\nstringData: {{username: {user}, password: wrong-one}}\n---\n"
    );
    let ca = std::fs::read_to_string(env.bed.dovecot().ca_file()).unwrap();
    let cm = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: test-ca}}\ndata:\n  ca.crt: |\n{}\n---\n",
        ca.lines()
            .map(|l| format!("    {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    std::fs::write(
        &file,
        format!(
            "{secret}{cm}{}",
            provider(
                "preflight",
                "POP3",
                env.bed.dovecot().pop3s_port(),
                "Implicit",
                ALICE_AUTH,
                ""
            )
        ),
    )
    .unwrap();
    let out = Command::new(MAILROOM)
        .args(["check", "-f"])
        .arg(&file)
        .env("KUBECONFIG", "/nonexistent")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("AuthenticationFailed"), "{text}");
}
