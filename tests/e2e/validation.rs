//! The API server itself refuses bad manifests at apply time, naming the field.

use crate::support::Env;

fn manifest(spec: &str) -> String {
    format!(
        "apiVersion: mailroom.dev/v1alpha1\nkind: IncomingMailProvider\nmetadata:\n  name: bad\nspec:\n{spec}"
    )
}

const OK_AUTH: &str = "  authentication: {method: None}\n";

#[tokio::test]
async fn invalid_manifests_are_rejected_with_the_field_named() {
    let env = Env::new("invalid").await;
    let server = |s: &str| format!("  server: {s}\n{OK_AUTH}");
    let cases: Vec<(&str, String, &[&str])> = vec![
        ("missing host", server("{protocol: IMAP}"), &["spec.server.host", "Required"]),
        ("scheme", server("{host: 'imaps://mail.example.com', protocol: IMAP}"), &["spec.server.host", "scheme"]),
        ("port in host", server("{host: 'mail.example.com:993', protocol: IMAP}"), &["spec.server.host", "port"]),
        ("path", server("{host: 'mail.example.com/inbox', protocol: IMAP}"), &["spec.server.host", "path"]),
        ("spaces", server("{host: 'mail example.com', protocol: IMAP}"), &["spec.server.host", "spaces"]),
        ("port 0", server("{host: mail.example.com, port: 0, protocol: IMAP}"), &["spec.server.port"]),
        ("port 70000", server("{host: mail.example.com, port: 70000, protocol: IMAP}"), &["spec.server.port"]),
        ("protocol", server("{host: mail.example.com, protocol: SMTP}"), &["spec.server.protocol", "IMAP", "POP3"]),
        (
            "tls mode",
            format!("  server: {{host: mail.example.com, protocol: IMAP}}\n  tls: {{mode: Sometimes}}\n{OK_AUTH}"),
            &["spec.tls.mode", "StartTLS"],
        ),
        (
            "password without secretRef",
            "  server: {host: mail.example.com, protocol: IMAP}\n  authentication: {method: Password}\n".into(),
            &["spec.authentication.secretRef", "secretRef is required"],
        ),
        (
            "interval under 30s",
            format!("  server: {{host: mail.example.com, protocol: IMAP}}\n  check: {{interval: 10s, timeout: 5s}}\n{OK_AUTH}"),
            &["spec.check.interval", "at least 30s"],
        ),
        (
            "interval in words",
            format!("  server: {{host: mail.example.com, protocol: IMAP}}\n  check: {{interval: 5 minutes}}\n{OK_AUTH}"),
            &["spec.check.interval", "must be a duration such as 30s, 5m or 1h30m"],
        ),
        (
            "interval over a year",
            format!("  server: {{host: mail.example.com, protocol: IMAP}}\n  check: {{interval: 1000000h}}\n{OK_AUTH}"),
            &["spec.check.interval", "at most 8760h"],
        ),
        (
            "a mailbox for POP3",
            format!("  server: {{host: mail.example.com, protocol: POP3}}\n  check: {{mailbox: Archive}}\n{OK_AUTH}"),
            &["spec.check.mailbox", "IMAP only"],
        ),
        (
            "a Secret key longer than Kubernetes allows",
            format!("  server: {{host: mail.example.com, protocol: IMAP}}\n  authentication: {{method: Password, secretRef: {{name: s, passwordKey: {}}}}}\n", "k".repeat(254)),
            &["spec.authentication.secretRef.passwordKey", "253"],
        ),
        (
            "secretRef without a password",
            "  server: {host: mail.example.com, protocol: IMAP}\n  authentication: {method: None, secretRef: {name: s}}\n".into(),
            &["spec.authentication.secretRef", "only when method is Password"],
        ),
        (
            "oauth2 with a password",
            "  server: {host: mail.example.com, protocol: IMAP}\n  authentication: {method: Password, secretRef: {name: s}, oauth2: {provider: Google, clientId: c, tokenSecretRef: {name: t}}}\n".into(),
            &["spec.authentication.oauth2", "only when method is OAuth2"],
        ),
        (
            "timeout over interval",
            format!("  server: {{host: mail.example.com, protocol: IMAP}}\n  check: {{interval: 1m, timeout: 2m}}\n{OK_AUTH}"),
            &["spec.check.timeout", "longer than interval"],
        ),
        (
            "caBundleRef kind",
            format!(
                "  server: {{host: mail.example.com, protocol: IMAP}}\n  tls: {{caBundleRef: {{kind: Pod, name: x}}}}\n{OK_AUTH}"
            ),
            &["spec.tls.caBundleRef.kind", "ConfigMap", "Secret"],
        ),
        (
            "password without TLS",
            "  server: {host: mail.example.com, protocol: IMAP}\n  tls: {mode: None}\n  authentication: {method: Password, secretRef: {name: s}}\n".into(),
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

    // One error per mistake: a scheme is not also a port and a path, and a malformed
    // duration is not also CEL's conversion errors.
    for (spec, absent) in [
        (
            server("{host: 'imaps://mail.example.com', protocol: IMAP}"),
            &["must not contain a port", "must not contain a path"][..],
        ),
        (
            format!(
                "  server: {{host: mail.example.com, protocol: IMAP}}\n  check: {{interval: 5 minutes}}\n{OK_AUTH}"
            ),
            &["conversion", "longer than interval", "should match"][..],
        ),
        // An interval under 30s is that one mistake, not also a timeout (left at its
        // default) longer than the interval.
        (
            format!(
                "  server: {{host: mail.example.com, protocol: IMAP}}\n  check: {{interval: 10s}}\n{OK_AUTH}"
            ),
            &["longer than interval"][..],
        ),
    ] {
        let out = env.try_apply(&manifest(&spec));
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success(), "accepted:\n{spec}");
        for text in absent {
            assert!(
                !stderr.contains(text),
                "{text:?} among the errors:\n{stderr}"
            );
        }
    }

    // IP literals are hosts too, IPv6 without brackets (its colons are not a port).
    for host in ["192.0.2.10", "2001:db8::1", "::1", "mail.example.com."] {
        let out = env.try_apply(&manifest(&server(&format!(
            "{{host: '{host}', protocol: IMAP}}"
        ))));
        assert!(
            out.status.success(),
            "host {host} refused: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // And a valid one, with every default, is accepted and defaulted by the API server.
    let out = env.try_apply(&manifest(
        "  server: {host: mail.example.com, protocol: POP3}\n  authentication: {method: None}\n",
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = env.kubectl(&[
        "get",
        "imp",
        "bad",
        "-o",
        "jsonpath={.spec.check.interval} {.spec.check.timeout} {.spec.tls.mode}",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "5m 30s Implicit");
}

#[tokio::test]
async fn kubectl_explain_documents_the_fields() {
    let env = Env::new("explain").await;
    let out = env.kubectl(&["explain", "incomingmailprovider.spec.tls.mode"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("never falls back to plaintext"),
        "kubectl explain:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Defaults are said in words: explain does not show the schema's.
    for (field, default) in [
        ("spec.check.interval", "Default: 5m."),
        ("spec.check.timeout", "Default: 30s."),
        (
            "spec.authentication.secretRef.passwordKey",
            "Default: password.",
        ),
    ] {
        let out = env.kubectl(&["explain", &format!("incomingmailprovider.{field}")]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(default), "kubectl explain {field}:\n{text}");
    }
}

/// The examples are what a user applies first: the API server takes each as written (a
/// server-side dry run, in this test's namespace instead of theirs).
#[tokio::test]
async fn the_examples_are_accepted_by_the_api_server() {
    let env = Env::new("examples").await;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<_> = ["examples", "examples/demo"]
        .iter()
        .flat_map(|dir| std::fs::read_dir(root.join(dir)).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "{files:?}");
    for file in files {
        let text: String = std::fs::read_to_string(&file)
            .unwrap()
            .lines()
            .filter(|l| !l.trim_start().starts_with("namespace:"))
            .map(|l| format!("{l}\n"))
            .collect();
        // The demo's file is a template that scripts/demo fills in.
        let text = text
            .replace("${ALICE_PASSWORD}", "secret")
            .replace("${MAILROOM_MAIL_HOST}", "127.0.0.1")
            .replace("${MAILROOM_IMAPS_PORT}", "993")
            .replace("${MAILROOM_POP3_PORT}", "110")
            .replace("${CLOSED_PORT}", "1");
        let unfilled = text
            .lines()
            .any(|l| !l.trim_start().starts_with('#') && l.contains("${"));
        assert!(!unfilled, "{}: a variable left:\n{text}", file.display());
        let mut cmd = env.bed.kubectl();
        cmd.args(["apply", "--dry-run=server", "-n", &env.ns, "-f", "-"]);
        let out = crate::support::with_input(cmd, &text);
        assert!(
            out.status.success(),
            "{}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("incomingmailprovider.mailroom.dev/"),
            "{}: no provider applied: {}",
            file.display(),
            String::from_utf8_lossy(&out.stdout)
        );
    }
}
