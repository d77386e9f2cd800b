//! No secret value reaches the controller's logs, Events, status or the CLI's output.

use std::time::Duration;

use base64::Engine as _;

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
    // The bed's Dovecot offers SASL PLAIN, which mailroom writes itself; a server that
    // offers no AUTH= mechanism gets IMAP LOGIN, which the IMAP client library writes (and
    // logs, at trace level, as it sends it).
    let login_only = login_only_imap_server();
    env.apply(
        &provider(
            "login",
            "IMAP",
            login_only,
            "None",
            "{method: Password, secretRef: {name: alice}, allowUnencrypted: true}",
            "",
        )
        .replace(&mailroom_testbed::MAIL_HOST.to_string(), "127.0.0.1"),
    );
    // At trace level every library logs all it does: still no password, not even when
    // the filter names the module of the IMAP client that writes the commands it sends
    // (a directive more specific than the controller's own cap for that crate won).
    let controller = env.controller_with(&["--log", "trace,async_imap::imap_stream=trace"]);
    env.wait_reason("imap", "AuthenticationFailed", Duration::from_secs(60))
        .await;
    env.wait_reason("pop3", "AuthenticationFailed", Duration::from_secs(60))
        .await;
    let login = env
        .wait_reason("login", "AuthenticationFailed", Duration::from_secs(60))
        .await;
    assert!(
        crate::support::ready(&login).is_some_and(|c| c.message.contains("IMAP LOGIN")),
        "the password went by IMAP LOGIN: {:?}",
        login.status
    );

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
    // As the server sees it: SASL PLAIN (with the login before it) and LOGIN encode it.
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let plain = b64(&format!("\0alice\0{PLANTED}"));
    let login = b64(PLANTED);
    crate::support::assert_nowhere(&env, &controller.logs(), &[PLANTED, &plain, &login]).await;
}

/// An IMAP server on loopback, in plaintext, that offers no AUTH= mechanism (so a client
/// logs in with LOGIN) and refuses every login; its port.
fn login_only_imap_server() -> u16 {
    use std::io::{BufRead as _, BufReader, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let serve = |conn: std::net::TcpStream| -> std::io::Result<()> {
        let mut reader = BufReader::new(conn.try_clone()?);
        let mut conn = conn;
        conn.write_all(b"* OK [CAPABILITY IMAP4rev1] ready\r\n")?;
        let mut line = String::new();
        while reader.read_line(&mut line)? > 0 {
            let (tag, command) = line.trim_end().split_once(' ').unwrap_or(("*", ""));
            let verb = command
                .split(' ')
                .next()
                .unwrap_or_default()
                .to_ascii_uppercase();
            let answer = match verb.as_str() {
                "CAPABILITY" => format!("* CAPABILITY IMAP4rev1\r\n{tag} OK done\r\n"),
                "LOGIN" => format!("{tag} NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"),
                "LOGOUT" => format!("* BYE\r\n{tag} OK bye\r\n"),
                _ => format!("{tag} BAD unknown command\r\n"),
            };
            conn.write_all(answer.as_bytes())?;
            if verb == "LOGOUT" {
                return Ok(());
            }
            line.clear();
        }
        Ok(())
    };
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || serve(conn));
        }
    });
    port
}
