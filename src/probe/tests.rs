//! The probe against small scripted servers on 127.0.0.1: the behaviour a real Dovecot
//! cannot be made to show (endless lines, never-ending literals, garbage, tarpits, missing
//! STARTTLS, odd AUTH forms, bad certificates), plus the main paths of both protocols.
//! Dovecot itself is exercised by the end-to-end tests in `tests/`.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use super::*;

const CA: &[u8] = include_bytes!("testdata/ca.pem");
const PINNED: &[u8] = include_bytes!("testdata/pinned.pem");
const SECRET: &str = "Pl4nted-S3cret!zz";

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One move of a scripted server.
enum Act {
    /// Write these bytes; `$TAG` becomes the tag of the last command read, `$PREV` that
    /// of the one before it.
    Say(&'static str),
    SayBytes(Vec<u8>),
    /// Read a line; after its tag (IMAP) or as a whole (POP3) it must start with this.
    Cmd(&'static str),
    /// Read a line whatever it is.
    Any,
    /// TLS handshake as the server, with testdata/`name`.pem and .key.
    Tls(&'static str),
    /// Write these bytes over and over until the client goes away.
    Flood(Vec<u8>),
    /// Say nothing for a minute.
    Silence,
    /// The client must send nothing more for a moment (it waits for a reply).
    Quiet,
}

use Act::*;

struct Server {
    port: u16,
    /// The lines the server read, in order; ends with "UNEXPECTED …" if the script broke.
    seen: JoinHandle<Vec<String>>,
}

impl Server {
    async fn seen(self) -> Vec<String> {
        tokio::time::timeout(Duration::from_secs(10), self.seen)
            .await
            .expect("scripted server finished")
            .expect("scripted server did not panic")
    }
}

fn acceptor(name: &str) -> TlsAcceptor {
    let (cert, key): (&[u8], &[u8]) = match name {
        "server" => (
            include_bytes!("testdata/server.pem"),
            include_bytes!("testdata/server.key"),
        ),
        "pinned" => (PINNED, include_bytes!("testdata/pinned.key")),
        "cnonly" => (
            include_bytes!("testdata/cnonly.pem"),
            include_bytes!("testdata/cnonly.key"),
        ),
        "expired" => (
            include_bytes!("testdata/expired.pem"),
            include_bytes!("testdata/expired.key"),
        ),
        other => panic!("no test certificate {other}"),
    };
    let certs = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    TlsAcceptor::from(Arc::new(config))
}

async fn read_line(io: &mut Box<dyn Io>) -> Option<String> {
    let mut line = Vec::new();
    loop {
        let mut byte = [0u8];
        match tokio::time::timeout(Duration::from_secs(10), io.read(&mut byte)).await {
            Ok(Ok(1)) => {}
            _ => return None,
        }
        if byte[0] == b'\n' {
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Some(String::from_utf8_lossy(&line).into_owned());
        }
        line.push(byte[0]);
    }
}

/// async-imap's tags (A0001) and the probe's own (M1).
fn is_tag(word: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    word.strip_prefix('A').is_some_and(digits) || word.strip_prefix('M').is_some_and(digits)
}

/// Serves one connection with `script`.
async fn serve(script: Vec<Act>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut io: Box<dyn Io> = Box::new(tcp);
        let mut seen = Vec::new();
        let mut tag = String::new();
        let mut prev = String::new();
        for act in script {
            match act {
                Say(text) => {
                    let text = text.replace("$TAG", &tag).replace("$PREV", &prev);
                    if io.write_all(text.as_bytes()).await.is_err() {
                        break;
                    }
                }
                SayBytes(bytes) => {
                    if io.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
                Cmd(expected) => {
                    let Some(line) = read_line(&mut io).await else {
                        break;
                    };
                    seen.push(line.clone());
                    let rest = match line.split_once(' ') {
                        Some((t, rest)) if is_tag(t) => {
                            prev = std::mem::replace(&mut tag, t.to_string());
                            rest
                        }
                        _ => line.as_str(),
                    };
                    if !rest
                        .to_ascii_uppercase()
                        .starts_with(&expected.to_ascii_uppercase())
                    {
                        seen.push(format!("UNEXPECTED, wanted {expected}"));
                        break;
                    }
                }
                Any => {
                    let Some(line) = read_line(&mut io).await else {
                        break;
                    };
                    seen.push(line);
                }
                Tls(name) => match acceptor(name).accept(io).await {
                    Ok(tls) => io = Box::new(tls),
                    Err(_) => {
                        seen.push("TLS handshake failed".into());
                        return seen;
                    }
                },
                Flood(chunk) => while io.write_all(&chunk).await.is_ok() {},
                Silence => tokio::time::sleep(Duration::from_secs(60)).await,
                Quiet => {
                    let mut byte = [0u8];
                    let read = io.read(&mut byte);
                    if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(300), read).await
                    {
                        seen.push(format!("UNEXPECTED, {n} byte(s) before a reply"));
                        break;
                    }
                }
            }
        }
        seen
    });
    Server { port, seen }
}

fn target(port: u16, protocol: Protocol, tls_mode: TlsMode) -> Target {
    Target {
        host: "127.0.0.1".into(),
        port,
        protocol,
        tls_mode,
        trust: Trust::default(),
        mailbox: "INBOX".into(),
        timeout: Duration::from_secs(5),
    }
}

fn trusting(mut t: Target, pem: &[u8]) -> Target {
    t.trust.extra_roots_pem = Some(pem.to_vec());
    t
}

fn password(allow_unencrypted: bool) -> Login {
    Login::Password {
        username: "alice".into(),
        password: SecretString::from(SECRET),
        allow_unencrypted,
    }
}

fn failure(report: &Report) -> &Failure {
    report
        .failure
        .as_ref()
        .unwrap_or_else(|| panic!("the test should have failed: {report:#?}"))
}

/// The failure of a plaintext test of `protocol` against a server playing `script`.
async fn failed_against(script: Vec<Act>, protocol: Protocol, login: &Login) -> Failure {
    failure(&tested_against(script, protocol, login).await.1).clone()
}

/// The port and the report of a plaintext test of `protocol` against a server playing
/// `script`.
async fn tested_against(script: Vec<Act>, protocol: Protocol, login: &Login) -> (u16, Report) {
    let server = serve(script).await;
    let report = run(&target(server.port, protocol, TlsMode::None), login).await;
    (server.port, report)
}

fn steps(report: &Report) -> Vec<(&'static str, bool)> {
    report
        .steps
        .iter()
        .map(|s| (s.step.as_str(), s.ok))
        .collect()
}

fn assert_secret_kept(report: &Report) {
    let shown = format!("{report:?} {report:#?}");
    assert!(!shown.contains(SECRET), "the password leaked: {shown}");
    // base64 of "\0alice\0<secret>" must not show either.
    let encoded = sasl::encode(
        &sasl::Exchange::plain("alice", &SecretString::from(SECRET))
            .initial_response()
            .unwrap(),
    );
    assert!(
        !shown.contains(encoded.as_str()),
        "the SASL response leaked: {shown}"
    );
}

const IMAP_GREETING: &str =
    "* OK [CAPABILITY IMAP4rev1 LITERAL+ SASL-IR ID ENABLE IDLE AUTH=PLAIN] Dovecot ready.\r\n";

#[tokio::test]
async fn imap_login_status_logout_in_plaintext_when_allowed() {
    let server = serve(vec![
        Say("* OK Dovecot ready.\r\n"),
        Cmd("CAPABILITY"),
        Say("* CAPABILITY IMAP4rev1 IDLE ID\r\n$TAG OK Pre-login capabilities listed.\r\n"),
        Cmd("LOGIN"),
        Say("$TAG OK [CAPABILITY IMAP4rev1] Logged in\r\n"),
        Cmd("STATUS \"INBOX\" (MESSAGES UNSEEN)"),
        Say("* STATUS INBOX (MESSAGES 12 UNSEEN 3)\r\n$TAG OK Status completed.\r\n"),
        Cmd("LOGOUT"),
        Say("* BYE Logging out\r\n$TAG OK Logout completed.\r\n"),
    ])
    .await;
    let report = run(
        &target(server.port, Protocol::Imap, TlsMode::None),
        &password(true),
    )
    .await;
    assert!(report.passed(), "{report:#?}");
    assert_eq!(
        steps(&report),
        [
            ("resolve", true),
            ("connect", true),
            ("greeting", true),
            ("capabilities", true),
            ("authenticate", true),
            ("mailbox", true),
            ("logout", true)
        ]
    );
    let f = &report.findings;
    assert_eq!(f.greeting.as_deref(), Some("* OK Dovecot ready."));
    assert_eq!(f.capabilities, ["IMAP4rev1", "IDLE", "ID"]);
    assert!(f.authenticated);
    assert_eq!(f.mechanism.as_deref(), Some("LOGIN"));
    assert_eq!(
        f.mailbox,
        Some(MailboxInfo {
            name: "INBOX".into(),
            messages: 12,
            unseen: Some(3)
        })
    );
    assert_eq!(f.tls, None);
    assert_eq!(
        report.steps[4].detail,
        "LOGIN as alice: OK [CAPABILITY IMAP4rev1] Logged in"
    );
    assert_eq!(report.steps[5].detail, "INBOX: 12 messages, 3 unseen");
    let seen = server.seen().await;
    assert_eq!(seen[1], format!("A0001 LOGIN \"alice\" \"{SECRET}\""));
    assert_secret_kept(&report);
}

#[tokio::test]
async fn imap_wrong_password_quotes_the_server_and_keeps_the_secret() {
    let server = serve(vec![
        Say("* OK ready\r\n"),
        Cmd("CAPABILITY"),
        Say("* CAPABILITY IMAP4rev1\r\n$TAG OK done\r\n"),
        Cmd("LOGIN"),
        Say("$TAG NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"),
        Cmd("LOGOUT"),
        Say("* BYE Logging out\r\n$TAG OK Logout completed.\r\n"),
    ])
    .await;
    let report = run(
        &target(server.port, Protocol::Imap, TlsMode::None),
        &password(true),
    )
    .await;
    let f = failure(&report);
    assert_eq!(f.reason, Reason::AuthenticationFailed, "{f:?}");
    assert_eq!(f.step, Step::Authenticate);
    assert_eq!(
        f.message,
        format!(
            "IMAP LOGIN rejected by 127.0.0.1:{}: \"NO [AUTHENTICATIONFAILED] Authentication failed.\"",
            server.port
        )
    );
    assert!(!report.findings.authenticated);
    assert_eq!(report.findings.mechanism.as_deref(), Some("LOGIN"));
    // Still a polite LOGOUT after the refusal.
    assert_eq!(steps(&report).last(), Some(&("logout", true)));
    assert_secret_kept(&report);
    assert_eq!(server.seen().await.len(), 3);
}

#[tokio::test]
async fn imap_implicit_tls_authenticate_plain() {
    // A greeting without capabilities, and no SASL-IR: CAPABILITY is asked, and the
    // credentials wait for the server's `+`.
    let server = serve(vec![
        Tls("server"),
        Say("* OK ready\r\n"),
        Cmd("CAPABILITY"),
        Say("* CAPABILITY IMAP4rev1 AUTH=PLAIN AUTH=LOGIN\r\n$TAG OK done\r\n"),
        Cmd("AUTHENTICATE PLAIN"),
        Say("+ \r\n"),
        Any,
        Say("$TAG OK Logged in\r\n"),
        Cmd("STATUS"),
        Say("* STATUS \"INBOX\" (MESSAGES 0 UNSEEN 0)\r\n$TAG OK done\r\n"),
        Cmd("LOGOUT"),
        Say("* BYE\r\n$TAG OK bye\r\n"),
    ])
    .await;
    let t = trusting(target(server.port, Protocol::Imap, TlsMode::Implicit), CA);
    let report = run(&t, &password(false)).await;
    assert!(report.passed(), "{report:#?}");
    assert_eq!(
        steps(&report)[..4],
        [
            ("resolve", true),
            ("connect", true),
            ("TLS handshake", true),
            ("greeting", true)
        ]
    );
    let tls = report.findings.tls.as_ref().unwrap();
    assert_eq!(tls.version, "TLSv1.3");
    assert!(
        tls.cipher_suite.starts_with("TLS13_"),
        "{}",
        tls.cipher_suite
    );
    let cert = tls.peer_certificate.as_ref().unwrap();
    assert_eq!(cert.subject, "CN=localhost");
    assert_eq!(cert.issuer, "CN=mailroom probe test CA");
    assert_eq!(cert.dns_names, ["localhost"]);
    assert!(cert.not_after.starts_with("2126-"), "{}", cert.not_after);
    assert_eq!(report.findings.mechanism.as_deref(), Some("PLAIN"));
    let seen = server.seen().await;
    let expected = sasl::encode(
        &sasl::Exchange::plain("alice", &SecretString::from(SECRET))
            .initial_response()
            .unwrap(),
    );
    assert_eq!(seen[2], *expected);
    assert_secret_kept(&report);
}

#[tokio::test]
async fn imap_greeting_capabilities_and_sasl_ir_save_two_round_trips() {
    // Dovecot's greeting lists its capabilities, SASL-IR among them: no CAPABILITY
    // command, and the credentials go with AUTHENTICATE.
    let server = serve(vec![
        Tls("server"),
        Say(IMAP_GREETING),
        Cmd("AUTHENTICATE PLAIN "),
        Say("$TAG OK Logged in\r\n"),
        Cmd("STATUS"),
        Say("* STATUS \"INBOX\" (MESSAGES 0 UNSEEN 0)\r\n$TAG OK done\r\n"),
        Cmd("LOGOUT"),
        Say("* BYE\r\n$TAG OK bye\r\n"),
    ])
    .await;
    let t = trusting(target(server.port, Protocol::Imap, TlsMode::Implicit), CA);
    let report = run(&t, &password(false)).await;
    assert!(report.passed(), "{report:#?}");
    let capabilities = &report.steps[4];
    assert_eq!(capabilities.step, Step::Capabilities);
    assert!(
        capabilities
            .detail
            .ends_with("AUTH=PLAIN (from the greeting)"),
        "{}",
        capabilities.detail
    );
    assert!(
        report
            .findings
            .capabilities
            .contains(&"SASL-IR".to_string())
    );
    let seen = server.seen().await;
    let expected = sasl::encode(
        &sasl::Exchange::plain("alice", &SecretString::from(SECRET))
            .initial_response()
            .unwrap(),
    );
    assert!(
        seen[0].ends_with(&format!("AUTHENTICATE PLAIN {}", expected.as_str())),
        "{seen:?}"
    );
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_secret_kept(&report);
}

#[tokio::test]
async fn imap_starttls_rereads_capabilities() {
    let server = serve(vec![
        Say("* OK ready\r\n"),
        Cmd("CAPABILITY"),
        Say("* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED\r\n$TAG OK done\r\n"),
        Cmd("STARTTLS"),
        Say("$TAG OK Begin TLS negotiation now.\r\n"),
        Tls("server"),
        Cmd("CAPABILITY"),
        Say("* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n$TAG OK done\r\n"),
        Cmd("AUTHENTICATE PLAIN"),
        Say("+ \r\n"),
        Any,
        Say("$TAG OK Logged in\r\n"),
        Cmd("STATUS"),
        Say("* STATUS INBOX (MESSAGES 1 UNSEEN 1)\r\n$TAG OK done\r\n"),
        Cmd("LOGOUT"),
        Say("$TAG OK bye\r\n"),
    ])
    .await;
    let mut t = trusting(target(server.port, Protocol::Imap, TlsMode::StartTls), CA);
    t.host = "localhost".into();
    let report = run(&t, &password(false)).await;
    assert!(report.passed(), "{report:#?}");
    let names: Vec<_> = steps(&report).into_iter().map(|(s, _)| s).collect();
    assert_eq!(
        names,
        [
            "resolve",
            "connect",
            "greeting",
            "capabilities",
            "STARTTLS",
            "TLS handshake",
            "capabilities",
            "authenticate",
            "mailbox",
            "logout"
        ]
    );
    assert_eq!(report.findings.capabilities, ["IMAP4rev1", "AUTH=PLAIN"]);
    assert_eq!(report.steps[4].detail, "OK Begin TLS negotiation now.");
    server.seen().await;
}

#[tokio::test]
async fn imap_without_starttls_sends_no_credentials() {
    let server = serve(vec![
        Say("* OK ready\r\n"),
        Cmd("CAPABILITY"),
        Say("* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n$TAG OK done\r\n"),
        Cmd("LOGOUT"),
        Say("$TAG OK bye\r\n"),
    ])
    .await;
    let report = run(
        &target(server.port, Protocol::Imap, TlsMode::StartTls),
        &password(false),
    )
    .await;
    let f = failure(&report);
    assert_eq!(f.reason, Reason::StartTlsUnavailable, "{f:?}");
    assert_eq!(f.step, Step::StartTls);
    assert_eq!(
        f.message,
        format!(
            "IMAP server 127.0.0.1:{} does not offer STARTTLS (capabilities: IMAP4rev1 AUTH=PLAIN); no credentials were sent. Use tls.mode Implicit on the TLS port (usually 993)",
            server.port
        )
    );
    let seen = server.seen().await;
    assert_eq!(seen, ["M1 CAPABILITY", "M2 LOGOUT"]);
}

#[tokio::test]
async fn no_password_without_tls_unless_allowed() {
    let server = serve(vec![
        Say("* OK ready\r\n"),
        Cmd("CAPABILITY"),
        Say("* CAPABILITY IMAP4rev1\r\n$TAG OK done\r\n"),
        Cmd("LOGOUT"),
        Say("$TAG OK bye\r\n"),
    ])
    .await;
    let report = run(
        &target(server.port, Protocol::Imap, TlsMode::None),
        &password(false),
    )
    .await;
    let f = failure(&report);
    assert_eq!(f.reason, Reason::InvalidSpec, "{f:?}");
    assert_eq!(
        f.message,
        "refusing to send a password without TLS (tls.mode None); set authentication.allowUnencrypted: true to allow it"
    );
    assert_eq!(server.seen().await, ["M1 CAPABILITY", "M2 LOGOUT"]);
}

#[tokio::test]
async fn imap_logindisabled_without_plain() {
    let server = serve(vec![
        Say("* OK ready\r\n"),
        Cmd("CAPABILITY"),
        Say("* CAPABILITY IMAP4rev1 LOGINDISABLED AUTH=XOAUTH2\r\n$TAG OK done\r\n"),
        Cmd("LOGOUT"),
        Say("$TAG OK bye\r\n"),
    ])
    .await;
    let report = run(
        &target(server.port, Protocol::Imap, TlsMode::None),
        &password(true),
    )
    .await;
    let f = failure(&report);
    assert_eq!(f.reason, Reason::AuthMechanismUnsupported, "{f:?}");
    assert_eq!(
        f.message,
        format!(
            "IMAP server 127.0.0.1:{} advertises LOGINDISABLED and neither AUTH=PLAIN nor AUTH=LOGIN (it offers AUTH=XOAUTH2); servers often allow logins only over TLS: use tls.mode StartTLS or Implicit",
            server.port
        )
    );
    server.seen().await;
}

#[tokio::test]
async fn imap_missing_mailbox() {
    let server = serve(vec![
        Say("* PREAUTH ready\r\n"),
        Cmd("CAPABILITY"),
        Say("* CAPABILITY IMAP4rev1\r\n$TAG OK done\r\n"),
        Cmd("STATUS \"Entw&APw-rfe\""),
        Say("$TAG NO [NONEXISTENT] Mailbox doesn't exist: Entw&APw-rfe\r\n"),
        Cmd("LOGOUT"),
        Say("$TAG OK bye\r\n"),
    ])
    .await;
    let mut t = target(server.port, Protocol::Imap, TlsMode::None);
    t.mailbox = "Entwürfe".into();
    let report = run(&t, &password(false)).await;
    let f = failure(&report);
    assert_eq!(f.reason, Reason::MailboxUnavailable, "{f:?}");
    assert_eq!(
        f.message,
        format!(
            "IMAP server 127.0.0.1:{} refused STATUS \"Entw&APw-rfe\": \"NO [NONEXISTENT] Mailbox doesn't exist: Entw&APw-rfe\"",
            server.port
        )
    );
    // PREAUTH: no credentials needed (nor sent, even without TLS).
    assert!(report.findings.authenticated);
    assert_eq!(report.findings.mechanism.as_deref(), Some("PREAUTH"));
    server.seen().await;
}

#[tokio::test]
async fn login_none_stops_after_capabilities() {
    let server = serve(vec![
        Say("* OK ready\r\n"),
        Cmd("CAPABILITY"),
        Say("* CAPABILITY IMAP4rev1\r\n$TAG OK done\r\n"),
        Cmd("LOGOUT"),
        Say("* BYE\r\n$TAG OK Logout completed.\r\n"),
    ])
    .await;
    let report = run(
        &target(server.port, Protocol::Imap, TlsMode::None),
        &Login::None,
    )
    .await;
    assert!(report.passed(), "{report:#?}");
    assert_eq!(
        steps(&report)[2..],
        [("greeting", true), ("capabilities", true), ("logout", true)]
    );
    assert_eq!(report.steps[4].detail, "OK Logout completed.");
    server.seen().await;
}

#[tokio::test]
async fn pop3_greeting_on_the_imap_port() {
    let server = serve(vec![Say("+OK Dovecot ready.\r\n"), Silence]).await;
    let report = run(
        &target(server.port, Protocol::Imap, TlsMode::None),
        &Login::None,
    )
    .await;
    let f = failure(&report);
    assert_eq!(f.reason, Reason::ProtocolError, "{f:?}");
    assert_eq!(f.step, Step::Greeting);
    assert_eq!(
        f.message,
        format!(
            "expected an IMAP greeting from 127.0.0.1:{}, got \"+OK Dovecot ready.\" (is this a POP3 port?)",
            server.port
        )
    );
    assert!(report.duration < Duration::from_secs(2));
}

#[tokio::test]
async fn imap_greeting_on_the_pop3_port() {
    let server = serve(vec![Say(IMAP_GREETING), Silence]).await;
    let report = run(
        &target(server.port, Protocol::Pop3, TlsMode::None),
        &Login::None,
    )
    .await;
    let f = failure(&report);
    assert_eq!(f.reason, Reason::ProtocolError, "{f:?}");
    assert!(
        f.message.starts_with(&format!(
            "expected a POP3 greeting from 127.0.0.1:{}, got \"* OK [CAPABILITY",
            server.port
        )),
        "{}",
        f.message
    );
    assert!(
        f.message
            .ends_with("Dovecot ready.\" (is this an IMAP port?)"),
        "{}",
        f.message
    );
}

#[tokio::test]
async fn imap_bye_greeting() {
    let server = serve(vec![Say("* BYE Too many connections\r\n")]).await;
    let report = run(
        &target(server.port, Protocol::Imap, TlsMode::None),
        &Login::None,
    )
    .await;
    let f = failure(&report);
    // The server is busy or limiting connections: not another protocol on the port.
    assert_eq!(f.reason, Reason::ServerUnavailable, "{f:?}");
    assert_eq!(f.step, Step::Greeting);
    assert_eq!(
        f.message,
        format!(
            "IMAP server 127.0.0.1:{} refused the session: \"* BYE Too many connections\"",
            server.port
        )
    );
}

#[tokio::test]
async fn pop3_err_greeting_is_the_server_refusing() {
    let server = serve(vec![Say(
        "-ERR [SYS/TEMP] Too many connections, try later\r\n",
    )])
    .await;
    let report = run(
        &target(server.port, Protocol::Pop3, TlsMode::None),
        &Login::None,
    )
    .await;
    let f = failure(&report);
    assert_eq!(f.reason, Reason::ServerUnavailable, "{f:?}");
    assert!(
        f.message
            .ends_with("refused the session: \"-ERR [SYS/TEMP] Too many connections, try later\""),
        "{}",
        f.message
    );
}

/// Microsoft 365 takes a token (or password) whose account cannot open the mailbox, then
/// answers every command with BAD: the login is what to fix, not check.mailbox.
#[tokio::test]
async fn imap_login_taken_but_not_connected_is_the_login() {
    let server = serve(vec![
        Say("* OK The Microsoft Exchange IMAP4 service is ready.\r\n"),
        Cmd("CAPABILITY"),
        Say("* CAPABILITY IMAP4 IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2 SASL-IR\r\n$TAG OK CAPABILITY completed.\r\n"),
        Cmd("AUTHENTICATE PLAIN"),
        Say("$TAG OK AUTHENTICATE completed.\r\n"),
        Cmd("STATUS"),
        Say("$TAG BAD User is authenticated but not connected.\r\n"),
        Cmd("LOGOUT"),
        Say("$TAG BAD User is authenticated but not connected.\r\n* BYE Connection closed. 14\r\n"),
    ])
    .await;
    let report = run(
        &target(server.port, Protocol::Imap, TlsMode::None),
        &password(true),
    )
    .await;
    let f = failure(&report);
    assert_eq!(f.reason, Reason::AuthenticationFailed, "{f:?}");
    assert_eq!(f.step, Step::Mailbox);
    assert!(
        f.message
            .contains("\"BAD User is authenticated but not connected.\"")
            && f.message.contains("spec.authentication.username")
            && f.message.contains("Add-MailboxPermission"),
        "{}",
        f.message
    );
    assert_secret_kept(&report);
}

#[tokio::test]
async fn imap_status_bad_is_a_protocol_error_and_codes_say_the_server_failed() {
    for (reply, reason) in [
        (
            "BAD Error in IMAP command STATUS: Unknown status item",
            Reason::ProtocolError,
        ),
        (
            "NO [SERVERBUG] Internal error occurred.",
            Reason::ServerUnavailable,
        ),
        (
            "NO [NONEXISTENT] Mailbox doesn't exist: INBOX",
            Reason::MailboxUnavailable,
        ),
    ] {
        let server = serve(vec![
            Say("* PREAUTH ready\r\n"),
            Cmd("CAPABILITY"),
            Say("* CAPABILITY IMAP4rev1\r\n$TAG OK done\r\n"),
            Cmd("STATUS"),
            Say(Box::leak(format!("$TAG {reply}\r\n").into_boxed_str())),
            Cmd("LOGOUT"),
            Say("$TAG OK bye\r\n"),
        ])
        .await;
        let report = run(
            &target(server.port, Protocol::Imap, TlsMode::None),
            &password(false),
        )
        .await;
        let f = failure(&report);
        assert_eq!(f.reason, reason, "{reply}: {f:?}");
        assert_eq!(f.step, Step::Mailbox);
        assert!(f.message.contains(reply), "{}", f.message);
    }
}

/// Dovecot's words when a mailbox's storage fails after the login: a server giving up.
#[tokio::test]
async fn imap_bye_then_close_during_login_is_the_server() {
    let server = serve(vec![
        Say("* OK ready\r\n"),
        Cmd("CAPABILITY"),
        Say("* CAPABILITY IMAP4rev1\r\n$TAG OK done\r\n"),
        Cmd("LOGIN"),
        Say("* BYE Internal error occurred. Refer to server log for more information.\r\n"),
    ])
    .await;
    let report = run(
        &target(server.port, Protocol::Imap, TlsMode::None),
        &password(true),
    )
    .await;
    let f = failure(&report);
    assert_eq!(f.reason, Reason::ServerUnavailable, "{f:?}");
    assert_eq!(f.step, Step::Authenticate);
    assert!(
        f.message.contains("Internal error occurred"),
        "{}",
        f.message
    );
    assert_secret_kept(&report);
}

#[tokio::test]
async fn imap_refusals_that_are_not_the_password_say_what_to_change() {
    // Over plaintext, a server that wants TLS first.
    let server = serve(vec![
        Say("* OK ready\r\n"),
        Cmd("CAPABILITY"),
        Say("* CAPABILITY IMAP4rev1\r\n$TAG OK done\r\n"),
        Cmd("LOGIN"),
        Say("$TAG NO [PRIVACYREQUIRED] Plaintext authentication disallowed on non-secure (SSL/TLS) connections.\r\n"),
        Cmd("LOGOUT"),
        Say("$TAG OK bye\r\n"),
    ])
    .await;
    let report = run(
        &target(server.port, Protocol::Imap, TlsMode::None),
        &password(true),
    )
    .await;
    let f = failure(&report);
    assert_eq!(f.reason, Reason::AuthMechanismUnsupported, "{f:?}");
    assert!(f.message.contains("StartTLS or Implicit"), "{}", f.message);

    // A refused password where the server offers OAuth2 too (Microsoft 365 refuses every
    // password, in the words of a wrong one).
    let server = serve(vec![
        Say("* OK The Microsoft Exchange IMAP4 service is ready.\r\n"),
        Cmd("CAPABILITY"),
        Say("* CAPABILITY IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2 SASL-IR\r\n$TAG OK done\r\n"),
        Cmd("AUTHENTICATE PLAIN"),
        Say("$TAG NO AUTHENTICATE failed.\r\n"),
        Cmd("LOGOUT"),
        Say("$TAG OK bye\r\n"),
    ])
    .await;
    let report = run(
        &target(server.port, Protocol::Imap, TlsMode::None),
        &password(true),
    )
    .await;
    let f = failure(&report);
    assert_eq!(f.reason, Reason::AuthenticationFailed, "{f:?}");
    assert!(
        f.message.contains("\"NO AUTHENTICATE failed.\"")
            && f.message.contains("authentication.method OAuth2"),
        "{}",
        f.message
    );

    // A server that offers OAuth2 and takes passwords (Dovecot, Gmail): the password.
    let server = serve(vec![
        Say("* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2 AUTH=OAUTHBEARER] Dovecot ready.\r\n"),
        Cmd("AUTHENTICATE PLAIN"),
        Say("$TAG NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"),
        Cmd("LOGOUT"),
        Say("$TAG OK bye\r\n"),
    ])
    .await;
    let report = run(
        &target(server.port, Protocol::Imap, TlsMode::None),
        &password(true),
    )
    .await;
    let f = failure(&report);
    assert_eq!(f.reason, Reason::AuthenticationFailed, "{f:?}");
    assert!(!f.message.contains("OAuth2"), "{}", f.message);
}

/// Gmail with POP switched off for the account: a permanent refusal the user must act on.
#[tokio::test]
async fn pop3_stat_refused_for_good_is_the_server_not_the_mailbox() {
    let server = serve(vec![
        Say("+OK Gpop ready\r\n"),
        Cmd("CAPA"),
        Say("+OK\r\nUSER\r\n.\r\n"),
        Cmd("USER"),
        Say("+OK send PASS\r\n"),
        Cmd("PASS"),
        Say("+OK Welcome.\r\n"),
        Cmd("STAT"),
        Say("-ERR [SYS/PERM] Your account is not enabled for POP access. Please visit your Gmail settings page and enable your account for POP access.\r\n"),
        Cmd("QUIT"),
        Say("+OK bye\r\n"),
    ])
    .await;
    let report = run(
        &target(server.port, Protocol::Pop3, TlsMode::None),
        &password(true),
    )
    .await;
    let f = failure(&report);
    assert_eq!(f.reason, Reason::ServerUnavailable, "{f:?}");
    assert_eq!(f.step, Step::Mailbox);
    assert!(
        f.message.contains("for good") && f.message.contains("not enabled for POP access"),
        "{}",
        f.message
    );
}

#[tokio::test]
async fn endless_line_is_cut_off() {
    for protocol in [Protocol::Imap, Protocol::Pop3] {
        let server = serve(vec![Flood(vec![b'x'; 8192])]).await;
        let report = run(&target(server.port, protocol, TlsMode::None), &Login::None).await;
        let f = failure(&report);
        assert_eq!(f.reason, Reason::ProtocolError, "{protocol:?}");
        assert_eq!(
            f.message,
            format!(
                "server 127.0.0.1:{} sent a line longer than 65536 bytes at the greeting step",
                server.port
            )
        );
        server.seen().await;
    }
}

#[tokio::test]
async fn endless_short_lines_exhaust_the_budget() {
    let server = serve(vec![
        Say("* OK ready\r\n"),
        Cmd("CAPABILITY"),
        Flood(b"* CAPABILITY IMAP4rev1 IDLE\r\n".repeat(100)),
    ])
    .await;
    let report = run(
        &target(server.port, Protocol::Imap, TlsMode::None),
        &Login::None,
    )
    .await;
    let f = failure(&report);
    assert_eq!(f.reason, Reason::ProtocolError, "{f:?}");
    assert_eq!(
        f.message,
        format!(
            "server 127.0.0.1:{} sent more than 1048576 bytes in one test at the capabilities step",
            server.port
        )
    );
    server.seen().await;
}

#[tokio::test]
async fn huge_literal_is_refused_before_it_is_buffered() {
    let server = serve(vec![
        Say("* OK [ALERT] {4000000000}\r\n"),
        Flood(vec![b'y'; 8192]),
    ])
    .await;
    let report = run(
        &target(server.port, Protocol::Imap, TlsMode::None),
        &Login::None,
    )
    .await;
    let f = failure(&report);
    assert_eq!(f.reason, Reason::ProtocolError, "{f:?}");
    assert!(
        f.message
            .contains("sent an IMAP literal of 4000000000 bytes, more than the"),
        "{}",
        f.message
    );
    server.seen().await;
}

#[tokio::test]
async fn literals_end_within_the_budget_or_are_refused() {
    // A literal announced within the budget ends after that many bytes; an endless stream
    // then is no longer IMAP. (One announced beyond the budget is refused at once, above.)
    let server = serve(vec![
        Say("* OK ready\r\n"),
        Cmd("CAPABILITY"),
        Say("* 1 FETCH (BODY[TEXT] {900000}\r\n"),
        Flood(b"yyyyyyyyyyyyyyyyyyyyyyyyyyyyy\r\n".repeat(100)),
    ])
    .await;
    let report = run(
        &target(server.port, Protocol::Imap, TlsMode::None),
        &Login::None,
    )
    .await;
    let f = failure(&report);
    assert_eq!(f.reason, Reason::ProtocolError, "{f:?}");
    assert!(
        f.message.starts_with(&format!(
            // How much of the flood is quoted depends on how the reads fell.
            "IMAP server 127.0.0.1:{} sent something that is not IMAP at the capabilities step: \"y",
            server.port
        )),
        "{}",
        f.message
    );
    server.seen().await;
}

/// Found by the imap_response fuzz target: a response continued by literal after literal
/// made async-imap parse the whole growing response again at every read, so a server could
/// keep a test busy on the CPU until its timeout. The parser now gets one line at a time,
/// and at most 256 lines without completing a response.
#[tokio::test]
async fn endless_literals_are_cut_off() {
    let server = serve(vec![
        Say("* OK ready\r\n"),
        Cmd("CAPABILITY"),
        Say("* 1 FETCH (X-A {1}\r\na"),
        Flood(b" X-A {1}\r\na".repeat(100)),
    ])
    .await;
    let report = run(
        &target(server.port, Protocol::Imap, TlsMode::None),
        &Login::None,
    )
    .await;
    let f = failure(&report);
    assert_eq!(f.reason, Reason::ProtocolError, "{f:?}");
    assert_eq!(
        f.message,
        format!(
            "server 127.0.0.1:{} sent more than 256 lines without a complete IMAP response at the capabilities step",
            server.port
        )
    );
    assert!(report.duration < Duration::from_secs(2), "{f:?}");
    server.seen().await;
}

/// Found by the imap_response fuzz target: an AUTHENTICATE challenge that is not base64 is
/// quoted in the failure message, cut to 200 bytes, and the cut panicked when it fell inside
/// a character.
#[tokio::test]
async fn imap_challenge_that_is_not_base64_is_cut_between_characters() {
    let mut challenge = b"+ eyJzdGF0dXMiOiI0MDEi".to_vec();
    challenge.extend_from_slice(&[0xe1; 100]);
    challenge.extend_from_slice(b"\r\n");
    let server = serve(vec![
        Say("* OK ready\r\n"),
        Cmd("CAPABILITY"),
        Say("* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n$TAG OK done\r\n"),
        Cmd("AUTHENTICATE PLAIN"),
        SayBytes(challenge),
        Any,
    ])
    .await;
    let report = run(
        &target(server.port, Protocol::Imap, TlsMode::None),
        &password(true),
    )
    .await;
    let f = failure(&report);
    assert_eq!(f.reason, Reason::ProtocolError, "{f:?}");
    assert!(
        f.message.contains(&format!(
            "failed: parse: unable to parse authentication response: eyJzdGF0dXMiOiI0MDEi{}",
            "\u{fffd}".repeat(10)
        )),
        "{}",
        f.message
    );
    assert_secret_kept(&report);
    server.seen().await;
}

#[tokio::test]
async fn garbage_is_a_protocol_error() {
    for protocol in [Protocol::Imap, Protocol::Pop3] {
        let server = serve(vec![
            SayBytes(b"\x00\x01\xfe\xffGARBAGE 123\r\n".to_vec()),
            Silence,
        ])
        .await;
        let report = run(&target(server.port, protocol, TlsMode::None), &Login::None).await;
        let f = failure(&report);
        assert_eq!(f.reason, Reason::ProtocolError, "{protocol:?}: {f:?}");
        assert!(f.message.contains("GARBAGE 123"), "{}", f.message);
        assert!(report.duration < Duration::from_secs(2), "{protocol:?}");
    }
}

#[tokio::test]
async fn silent_tarpit_times_out_at_the_greeting() {
    let server = serve(vec![Silence]).await;
    let mut t = target(server.port, Protocol::Imap, TlsMode::None);
    t.timeout = Duration::from_millis(700);
    let report = run(&t, &password(true)).await;
    let f = failure(&report);
    assert_eq!(f.reason, Reason::Timeout, "{f:?}");
    assert_eq!(f.step, Step::Greeting);
    assert!(
        f.message.starts_with(&format!(
            "no greeting from 127.0.0.1:{} within ",
            server.port
        )),
        "{}",
        f.message
    );
    assert!(f.message.contains("try tls.mode Implicit"), "{}", f.message);
    assert!(
        report.duration < Duration::from_millis(1000),
        "{:?}",
        report.duration
    );
    assert!(report.findings.greeting.is_none());
}

#[tokio::test]
async fn tarpit_after_the_greeting_names_the_command() {
    let server = serve(vec![Say("+OK hi\r\n"), Cmd("CAPA"), Silence]).await;
    let mut t = target(server.port, Protocol::Pop3, TlsMode::None);
    t.timeout = Duration::from_millis(700);
    let report = run(&t, &Login::None).await;
    let f = failure(&report);
    assert_eq!(f.reason, Reason::Timeout, "{f:?}");
    assert_eq!(f.step, Step::Capabilities);
    assert!(
        f.message.starts_with(&format!(
            "no answer to CAPA from 127.0.0.1:{} within ",
            server.port
        )),
        "{}",
        f.message
    );
    assert_eq!(report.findings.greeting.as_deref(), Some("+OK hi"));
    assert!(report.duration < Duration::from_millis(1000));
}

#[tokio::test]
async fn pop3_user_pass_stat_quit() {
    let server = serve(vec![
        Say("+OK Dovecot ready.\r\n"),
        Cmd("CAPA"),
        Say("+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nUSER\r\n..dotted\r\n.\r\n"),
        Cmd("USER alice"),
        Say("+OK\r\n"),
        Cmd("PASS "),
        Say("+OK Logged in.\r\n"),
        Cmd("STAT"),
        // No PIPELINING in CAPA: QUIT waits for STAT's reply.
        Quiet,
        Say("+OK 2 320\r\n"),
        Cmd("QUIT"),
        Say("+OK Logging out.\r\n"),
    ])
    .await;
    let report = run(
        &target(server.port, Protocol::Pop3, TlsMode::None),
        &password(true),
    )
    .await;
    assert!(report.passed(), "{report:#?}");
    let f = &report.findings;
    assert_eq!(f.greeting.as_deref(), Some("+OK Dovecot ready."));
    assert_eq!(
        f.capabilities,
        ["CAPA", "TOP", "UIDL", "RESP-CODES", "USER", ".dotted"]
    );
    assert_eq!(f.mechanism.as_deref(), Some("USER"));
    assert_eq!(
        f.mailbox,
        Some(MailboxInfo {
            name: "INBOX".into(),
            messages: 2,
            unseen: None
        })
    );
    assert_eq!(report.steps[5].detail, "STAT: 2 messages, 320 octets");
    assert_eq!(report.steps[6].detail, "+OK Logging out.");
    assert_eq!(server.seen().await[2], format!("PASS {SECRET}"));
    assert_secret_kept(&report);
}

/// With PIPELINING (RFC 2449 §6.6) QUIT goes out with STAT: one round trip fewer, and
/// STAT's reply is read as STAT's, QUIT's as QUIT's.
#[tokio::test]
async fn pop3_quit_goes_out_with_stat_when_the_server_pipelines() {
    // The server answers STAT only once QUIT has arrived too.
    let pipelined = |replies: &'static str| {
        serve(vec![
            Say("+OK Dovecot ready.\r\n"),
            Cmd("CAPA"),
            Say("+OK\r\nUSER\r\nPIPELINING\r\n.\r\n"),
            Cmd("USER alice"),
            Say("+OK\r\n"),
            Cmd("PASS "),
            Say("+OK Logged in.\r\n"),
            Cmd("STAT"),
            Cmd("QUIT"),
            Say(replies),
        ])
    };
    let t = |port| target(port, Protocol::Pop3, TlsMode::None);

    let server = pipelined("+OK 2 320\r\n+OK Logging out.\r\n").await;
    let report = run(&t(server.port), &password(true)).await;
    assert!(report.passed(), "{report:#?}");
    assert_eq!(report.steps[5].detail, "STAT: 2 messages, 320 octets");
    assert_eq!(report.steps[6].detail, "+OK Logging out.");
    server.seen().await;

    // A refused STAT is still classified by its own reply, and the session still ends.
    let server = pipelined("-ERR [SYS/TEMP] Mail storage unavailable\r\n+OK bye\r\n").await;
    let report = run(&t(server.port), &password(true)).await;
    let f = failure(&report);
    assert_eq!(f.reason, Reason::ServerUnavailable, "{f:?}");
    assert!(
        f.message.contains("Mail storage unavailable"),
        "{}",
        f.message
    );
    assert_eq!(steps(&report).last(), Some(&("logout", true)));
    assert_eq!(report.steps.last().unwrap().detail, "+OK bye");
    server.seen().await;
}

/// LOGOUT goes out with STATUS (RFC 3501 §5.5), and each reply is matched to its own tag:
/// a refused STATUS is quoted as such even though LOGOUT's OK arrived with it.
#[tokio::test]
async fn imap_logout_goes_out_with_status_and_each_reply_keeps_its_tag() {
    let server = serve(vec![
        Say(IMAP_GREETING),
        Cmd("AUTHENTICATE PLAIN "),
        Say("$TAG OK Logged in\r\n"),
        Cmd("STATUS \"INBOX\" (MESSAGES UNSEEN)"),
        Cmd("LOGOUT"),
        Say("* STATUS INBOX (MESSAGES 12 UNSEEN 3)\r\n$PREV OK Status completed.\r\n* BYE Logging out\r\n$TAG OK Logout completed.\r\n"),
    ])
    .await;
    let report = run(
        &target(server.port, Protocol::Imap, TlsMode::None),
        &password(true),
    )
    .await;
    assert!(report.passed(), "{report:#?}");
    assert_eq!(report.findings.mailbox.as_ref().unwrap().messages, 12);
    assert_eq!(report.steps.last().unwrap().detail, "OK Logout completed.");
    server.seen().await;

    let server = serve(vec![
        Say(IMAP_GREETING),
        Cmd("AUTHENTICATE PLAIN "),
        Say("$TAG OK Logged in\r\n"),
        Cmd("STATUS"),
        Cmd("LOGOUT"),
        Say("$PREV NO [NONEXISTENT] Mailbox doesn't exist: INBOX\r\n* BYE Logging out\r\n$TAG OK Logout completed.\r\n"),
    ])
    .await;
    let report = run(
        &target(server.port, Protocol::Imap, TlsMode::None),
        &password(true),
    )
    .await;
    let f = failure(&report);
    assert_eq!(f.reason, Reason::MailboxUnavailable, "{f:?}");
    assert!(
        f.message
            .contains("NO [NONEXISTENT] Mailbox doesn't exist: INBOX"),
        "{}",
        f.message
    );
    assert_eq!(steps(&report).last(), Some(&("logout", true)));
    server.seen().await;
}

#[tokio::test]
async fn pop3_auth_plain_two_line_form() {
    let server = serve(vec![
        Say("+OK ready\r\n"),
        Cmd("CAPA"),
        Say("+OK\r\nSASL PLAIN\r\n.\r\n"),
        Cmd("AUTH PLAIN"),
        Say("+ \r\n"),
        Any,
        Say("+OK Logged in.\r\n"),
        Cmd("STAT"),
        Say("+OK 0 0\r\n"),
        Cmd("QUIT"),
        Say("+OK\r\n"),
    ])
    .await;
    let report = run(
        &target(server.port, Protocol::Pop3, TlsMode::None),
        &password(true),
    )
    .await;
    assert!(report.passed(), "{report:#?}");
    assert_eq!(report.findings.mechanism.as_deref(), Some("PLAIN"));
    let seen = server.seen().await;
    assert_eq!(seen[1], "AUTH PLAIN");
    let expected = sasl::encode(
        &sasl::Exchange::plain("alice", &SecretString::from(SECRET))
            .initial_response()
            .unwrap(),
    );
    assert_eq!(seen[2], *expected);
}

#[tokio::test]
async fn pop3_auth_plain_inline_when_the_two_line_form_is_refused() {
    let server = serve(vec![
        Say("+OK ready\r\n"),
        Cmd("CAPA"),
        Say("+OK\r\nSASL PLAIN\r\n.\r\n"),
        Cmd("AUTH PLAIN"),
        Say("-ERR Initial response required\r\n"),
        Cmd("AUTH PLAIN "),
        Say("-ERR [AUTH] Authentication failed.\r\n"),
        Cmd("QUIT"),
        Say("+OK\r\n"),
    ])
    .await;
    let report = run(
        &target(server.port, Protocol::Pop3, TlsMode::None),
        &password(true),
    )
    .await;
    let f = failure(&report);
    assert_eq!(f.reason, Reason::AuthenticationFailed, "{f:?}");
    assert_eq!(
        f.message,
        format!(
            "POP3 AUTH PLAIN rejected by 127.0.0.1:{}: \"-ERR [AUTH] Authentication failed.\"",
            server.port
        )
    );
    let seen = server.seen().await;
    let expected = sasl::encode(
        &sasl::Exchange::plain("alice", &SecretString::from(SECRET))
            .initial_response()
            .unwrap(),
    );
    assert_eq!(seen[2], format!("AUTH PLAIN {}", *expected));
    assert_secret_kept(&report);
}

/// A POP3 server that answers `AUTH <mechanism>` (offered in CAPA) with `refusal`, before
/// any credential was sent: the failure, and what the server read.
async fn pop3_auth_refused_at_once(
    mechanism: &str,
    refusal: &'static str,
) -> (u16, Failure, Vec<String>) {
    let server = serve(vec![
        Say("+OK ready\r\n"),
        Cmd("CAPA"),
        Say(said(format!("+OK\r\nUSER\r\nSASL {mechanism}\r\n.\r\n"))),
        Cmd(said(format!("AUTH {mechanism}"))),
        Say(refusal),
        Cmd("QUIT"),
        Say("+OK bye\r\n"),
    ])
    .await;
    let report = run(
        &target(server.port, Protocol::Pop3, TlsMode::None),
        &password(true),
    )
    .await;
    let f = failure(&report).clone();
    assert_secret_kept(&report);
    (server.port, f, server.seen().await)
}

/// A refusal of `AUTH PLAIN` whose code says the server is unavailable or the mailbox in
/// use (RFC 2449, 3206) is that, not an unsupported mechanism, and the credentials are not
/// sent inline after it.
#[tokio::test]
async fn pop3_auth_refused_by_an_unavailable_server_sends_no_credentials() {
    let (port, f, seen) =
        pop3_auth_refused_at_once("PLAIN", "-ERR [SYS/TEMP] backend down\r\n").await;
    assert_eq!(
        (f.reason, f.step),
        (Reason::ServerUnavailable, Step::Authenticate),
        "{f:?}"
    );
    assert_eq!(
        f.message,
        format!(
            "POP3 server 127.0.0.1:{port} refused AUTH PLAIN before any credential was sent: \
             the server reports a temporary failure on its side, not the mechanism or the \
             login: \"-ERR [SYS/TEMP] backend down\""
        )
    );
    assert_eq!(seen, ["CAPA", "AUTH PLAIN", "QUIT"]);

    let (port, f, seen) = pop3_auth_refused_at_once(
        "PLAIN",
        "-ERR [IN-USE] Mailbox is locked by another POP3 session.\r\n",
    )
    .await;
    assert_eq!(
        (f.reason, f.step),
        (Reason::MailboxUnavailable, Step::Authenticate),
        "{f:?}"
    );
    assert_eq!(
        f.message,
        format!(
            "POP3 server 127.0.0.1:{port} refused AUTH PLAIN before any credential was sent: \
             another session holds the mailbox: \"-ERR [IN-USE] Mailbox is locked by another \
             POP3 session.\""
        )
    );
    assert_eq!(seen, ["CAPA", "AUTH PLAIN", "QUIT"]);

    // Without a code, in Exchange's words; and for a mechanism without an inline form.
    let (_, f, seen) = pop3_auth_refused_at_once("PLAIN", "-ERR Server Unavailable. 21\r\n").await;
    assert_eq!(f.reason, Reason::ServerUnavailable, "{f:?}");
    assert_eq!(seen, ["CAPA", "AUTH PLAIN", "QUIT"]);
    let (_, f, seen) = pop3_auth_refused_at_once("LOGIN", "-ERR [SYS/TEMP] backend down\r\n").await;
    assert_eq!(f.reason, Reason::ServerUnavailable, "{f:?}");
    assert_eq!(seen, ["CAPA", "AUTH LOGIN", "QUIT"]);

    // A plain refusal of the mechanism is still that.
    let (port, f, seen) =
        pop3_auth_refused_at_once("LOGIN", "-ERR Unsupported mechanism\r\n").await;
    assert_eq!(f.reason, Reason::AuthMechanismUnsupported, "{f:?}");
    assert_eq!(
        f.message,
        format!(
            "POP3 server 127.0.0.1:{port} refused AUTH LOGIN before any credential was sent: \
             \"-ERR Unsupported mechanism\""
        )
    );
    assert_eq!(seen, ["CAPA", "AUTH LOGIN", "QUIT"]);
}

#[tokio::test]
async fn pop3_stls_then_wrong_password() {
    let server = serve(vec![
        Say("+OK ready\r\n"),
        Cmd("CAPA"),
        Say("+OK\r\nSTLS\r\nUSER\r\n.\r\n"),
        Cmd("STLS"),
        Say("+OK Begin TLS negotiation now.\r\n"),
        Tls("server"),
        Cmd("CAPA"),
        Say("+OK\r\nUSER\r\nSASL PLAIN\r\n.\r\n"),
        Cmd("AUTH PLAIN"),
        Say("+ \r\n"),
        Any,
        Say("-ERR [AUTH] Authentication failed.\r\n"),
        Cmd("QUIT"),
        Say("+OK Logging out.\r\n"),
    ])
    .await;
    let t = trusting(target(server.port, Protocol::Pop3, TlsMode::StartTls), CA);
    let report = run(&t, &password(false)).await;
    let f = failure(&report);
    assert_eq!(f.reason, Reason::AuthenticationFailed, "{f:?}");
    assert_eq!(
        f.message,
        format!(
            "POP3 AUTH PLAIN rejected by 127.0.0.1:{}: \"-ERR [AUTH] Authentication failed.\"",
            server.port
        )
    );
    assert_eq!(report.findings.capabilities, ["USER", "SASL PLAIN"]);
    assert!(report.findings.tls.is_some());
    assert_eq!(steps(&report).last(), Some(&("logout", true)));
    assert_secret_kept(&report);
    server.seen().await;
}

#[tokio::test]
async fn pop3_without_stls() {
    let server = serve(vec![
        Say("+OK ready\r\n"),
        Cmd("CAPA"),
        Say("+OK\r\nUSER\r\n.\r\n"),
        Cmd("QUIT"),
        Say("+OK\r\n"),
    ])
    .await;
    let report = run(
        &target(server.port, Protocol::Pop3, TlsMode::StartTls),
        &password(false),
    )
    .await;
    let f = failure(&report);
    assert_eq!(f.reason, Reason::StartTlsUnavailable, "{f:?}");
    assert_eq!(server.seen().await, ["CAPA", "QUIT"]);
}

#[tokio::test]
async fn implicit_tls_to_a_plaintext_port() {
    let server = serve(vec![Say(IMAP_GREETING), Silence]).await;
    let report = run(
        &target(server.port, Protocol::Imap, TlsMode::Implicit),
        &Login::None,
    )
    .await;
    let f = failure(&report);
    assert_eq!(f.reason, Reason::TlsHandshakeFailed, "{f:?}");
    assert!(
        f.message.starts_with(&format!(
            "TLS handshake with 127.0.0.1:{} failed: the server answered in plaintext (\"* OK [CAPABILITY",
            server.port
        )),
        "{}",
        f.message
    );
    assert!(f.message.contains("use tls.mode StartTLS"), "{}", f.message);
}

#[tokio::test]
async fn untrusted_certificate_names_the_issuer() {
    let server = serve(vec![Tls("server")]).await;
    let report = run(
        &target(server.port, Protocol::Imap, TlsMode::Implicit),
        &Login::None,
    )
    .await;
    let f = failure(&report);
    assert_eq!(f.reason, Reason::CertificateInvalid, "{f:?}");
    assert_eq!(
        f.message,
        format!(
            "the certificate of 127.0.0.1:{} (subject \"CN=localhost\") is not trusted: its issuer \"CN=mailroom probe test CA\" is not a trusted root; add it with tls.caBundleRef",
            server.port
        )
    );
}

#[tokio::test]
async fn wrong_name_lists_the_names_it_carries() {
    let server = serve(vec![Tls("server")]).await;
    let mut t = trusting(target(server.port, Protocol::Imap, TlsMode::Implicit), CA);
    t.trust.server_name = Some("mail.example.com".into());
    let report = run(&t, &Login::None).await;
    let f = failure(&report);
    assert_eq!(f.reason, Reason::CertificateInvalid, "{f:?}");
    assert_eq!(
        f.message,
        format!(
            "the certificate of 127.0.0.1:{} (subject \"CN=localhost\") is not valid for \"mail.example.com\": it names localhost, 127.0.0.1; set tls.serverName to one of those names, or connect by a name it carries",
            server.port
        )
    );
}

#[tokio::test]
async fn expired_certificate_gives_not_after() {
    let server = serve(vec![Tls("expired")]).await;
    let t = trusting(target(server.port, Protocol::Imap, TlsMode::Implicit), CA);
    let report = run(&t, &Login::None).await;
    let f = failure(&report);
    assert_eq!(f.reason, Reason::CertificateInvalid, "{f:?}");
    assert!(
        f.message.starts_with(&format!(
            "the certificate of 127.0.0.1:{} (subject \"CN=localhost\") expired: notAfter 2001-01-01T00:00:00Z, now ",
            server.port
        )),
        "{}",
        f.message
    );
}

#[tokio::test]
async fn self_signed_certificate_can_be_pinned() {
    // Not pinned: refused, saying how to pin it.
    let server = serve(vec![Tls("pinned")]).await;
    let report = run(
        &target(server.port, Protocol::Imap, TlsMode::Implicit),
        &Login::None,
    )
    .await;
    let f = failure(&report);
    assert_eq!(f.reason, Reason::CertificateInvalid, "{f:?}");
    assert!(
        f.message.contains("tls.caBundleRef to pin it"),
        "{}",
        f.message
    );

    // Pinned: accepted, by IP and by name.
    for server_name in [None, Some("pinned.test")] {
        let server = serve(vec![
            Tls("pinned"),
            Say("* OK ready\r\n"),
            Cmd("CAPABILITY"),
            Say("* CAPABILITY IMAP4rev1\r\n$TAG OK done\r\n"),
            Cmd("LOGOUT"),
            Say("$TAG OK bye\r\n"),
        ])
        .await;
        let mut t = trusting(
            target(server.port, Protocol::Imap, TlsMode::Implicit),
            PINNED,
        );
        t.trust.server_name = server_name.map(String::from);
        let report = run(&t, &Login::None).await;
        assert!(report.passed(), "{report:#?}");
        let cert = report.findings.tls.unwrap().peer_certificate.unwrap();
        assert_eq!(cert.subject, "CN=pinned.test");
        server.seen().await;
    }

    // Pinned, but asked for another name: still refused.
    let server = serve(vec![Tls("pinned")]).await;
    let mut t = trusting(
        target(server.port, Protocol::Imap, TlsMode::Implicit),
        PINNED,
    );
    t.trust.server_name = Some("other.test".into());
    let report = run(&t, &Login::None).await;
    let f = failure(&report);
    assert_eq!(f.reason, Reason::CertificateInvalid, "{f:?}");
    assert!(
        f.message
            .contains("is not valid for \"other.test\": it names pinned.test, 127.0.0.1"),
        "{}",
        f.message
    );
}

#[tokio::test]
async fn insecure_skip_verify_accepts_and_records() {
    let server = serve(vec![
        Tls("expired"),
        Say("+OK ready\r\n"),
        Cmd("CAPA"),
        Say("-ERR unknown command\r\n"),
        Cmd("QUIT"),
        Say("+OK\r\n"),
    ])
    .await;
    let mut t = target(server.port, Protocol::Pop3, TlsMode::Implicit);
    t.trust.insecure_skip_verify = true;
    let report = run(&t, &Login::None).await;
    assert!(report.passed(), "{report:#?}");
    let cert = report
        .findings
        .tls
        .as_ref()
        .unwrap()
        .peer_certificate
        .as_ref()
        .unwrap();
    assert_eq!(cert.not_after, "2001-01-01T00:00:00Z");
    assert!(
        report.steps[2].detail.contains("NOT verified"),
        "{}",
        report.steps[2].detail
    );
    // A server without CAPA advertises nothing.
    assert!(report.findings.capabilities.is_empty());
    server.seen().await;
}

#[tokio::test]
async fn bad_ca_bundle_is_an_invalid_spec() {
    let server = serve(vec![Silence]).await;
    let t = trusting(
        target(server.port, Protocol::Imap, TlsMode::Implicit),
        b"hello",
    );
    let report = run(&t, &Login::None).await;
    let f = failure(&report);
    assert_eq!(f.reason, Reason::InvalidSpec, "{f:?}");
    assert_eq!(f.step, Step::TlsHandshake);
}

#[tokio::test]
async fn connection_refused() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let report = run(
        &target(port, Protocol::Pop3, TlsMode::Implicit),
        &Login::None,
    )
    .await;
    let f = failure(&report);
    assert_eq!(f.reason, Reason::ConnectionRefused, "{f:?}");
    assert_eq!(
        f.message,
        format!("TCP connection to 127.0.0.1:{port} refused (nothing listens on that port)")
    );
    assert_eq!(steps(&report), [("resolve", true), ("connect", false)]);
}

#[test]
fn debug_output_hides_secrets_and_pem() {
    let mut t = trusting(target(1, Protocol::Imap, TlsMode::Implicit), CA);
    t.trust.server_name = Some("x".into());
    let shown = format!("{t:?} {:?}", password(false));
    assert!(shown.contains("635 bytes of PEM"), "{shown}");
    assert!(!shown.contains(SECRET), "{shown}");
}

#[test]
fn the_test_future_is_send() {
    fn is_send<T: Send>(_: T) {}
    let t = target(1, Protocol::Imap, TlsMode::None);
    is_send(run(&t, &Login::None));
}

#[tokio::test]
async fn imap_authenticate_login_when_plain_is_missing() {
    let server = serve(vec![
        Say("* OK ready\r\n"),
        Cmd("CAPABILITY"),
        Say("* CAPABILITY IMAP4rev1 LOGINDISABLED AUTH=LOGIN\r\n$TAG OK done\r\n"),
        Cmd("AUTHENTICATE LOGIN"),
        Say("+ VXNlcm5hbWU6\r\n"),
        Any,
        Say("+ UGFzc3dvcmQ6\r\n"),
        Any,
        Say("$TAG OK Logged in\r\n"),
        Cmd("STATUS"),
        Say("* STATUS INBOX (MESSAGES 5)\r\n$TAG OK done\r\n"),
        Cmd("LOGOUT"),
        Say("$TAG OK bye\r\n"),
    ])
    .await;
    let report = run(
        &target(server.port, Protocol::Imap, TlsMode::None),
        &password(true),
    )
    .await;
    assert!(report.passed(), "{report:#?}");
    assert_eq!(report.findings.mechanism.as_deref(), Some("LOGIN"));
    assert_eq!(
        report.steps[4].detail,
        "AUTHENTICATE LOGIN as alice: OK Logged in"
    );
    // A server that sends no UNSEEN count leaves it unknown.
    assert_eq!(report.findings.mailbox.as_ref().unwrap().unseen, None);
    let seen = server.seen().await;
    assert_eq!(seen[2], "YWxpY2U=");
    assert_secret_kept(&report);
}

#[tokio::test]
async fn pop3_auth_login_rejected() {
    let server = serve(vec![
        Say("+OK ready\r\n"),
        Cmd("CAPA"),
        Say("+OK\r\nUSER\r\nSASL LOGIN\r\n.\r\n"),
        Cmd("AUTH LOGIN"),
        Say("+ VXNlcm5hbWU6\r\n"),
        Any,
        Say("+ UGFzc3dvcmQ6\r\n"),
        Any,
        Say("-ERR [AUTH] Authentication failed.\r\n"),
        Cmd("QUIT"),
        Say("+OK\r\n"),
    ])
    .await;
    let report = run(
        &target(server.port, Protocol::Pop3, TlsMode::None),
        &password(true),
    )
    .await;
    let f = failure(&report);
    assert_eq!(f.reason, Reason::AuthenticationFailed, "{f:?}");
    assert_eq!(
        f.message,
        format!(
            "POP3 AUTH LOGIN rejected by 127.0.0.1:{}: \"-ERR [AUTH] Authentication failed.\"",
            server.port
        )
    );
    assert_eq!(server.seen().await[1..3], ["AUTH LOGIN", "YWxpY2U="]);
    assert_secret_kept(&report);
}

#[tokio::test]
async fn pop3_without_any_usable_mechanism() {
    let server = serve(vec![
        Say("+OK ready\r\n"),
        Cmd("CAPA"),
        Say("+OK\r\nSTLS\r\nSASL XOAUTH2\r\n.\r\n"),
        Cmd("QUIT"),
        Say("+OK\r\n"),
    ])
    .await;
    let report = run(
        &target(server.port, Protocol::Pop3, TlsMode::None),
        &password(true),
    )
    .await;
    let f = failure(&report);
    assert_eq!(f.reason, Reason::AuthMechanismUnsupported, "{f:?}");
    assert_eq!(
        f.message,
        format!(
            "POP3 server 127.0.0.1:{} offers neither SASL PLAIN, SASL LOGIN nor USER/PASS (it offers SASL XOAUTH2); servers often allow passwords only over TLS: use tls.mode StartTLS or Implicit",
            server.port
        )
    );
    assert_eq!(server.seen().await, ["CAPA", "QUIT"]);
}

#[test]
fn oauth_mechanism_prefers_oauthbearer_and_respects_the_choice() {
    use session::Mechanism;
    let offered = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let pick = |list: &[&str], unknown, pref| {
        oauth_mechanism(Protocol::Imap, "h:993", &offered(list), unknown, pref)
    };
    assert_eq!(
        pick(
            &["PLAIN", "XOAUTH2", "OAUTHBEARER"],
            false,
            SaslMechanism::Auto
        )
        .unwrap(),
        Mechanism::OAuthBearer
    );
    assert_eq!(
        pick(&["PLAIN", "XOAUTH2"], false, SaslMechanism::Auto).unwrap(),
        Mechanism::XOAuth2
    );
    assert_eq!(
        pick(&["XOAUTH2", "OAUTHBEARER"], false, SaslMechanism::XOAuth2).unwrap(),
        Mechanism::XOAuth2
    );
    // A POP3 server without CAPA: nothing is known, XOAUTH2 is tried.
    assert_eq!(
        pick(&[], true, SaslMechanism::Auto).unwrap(),
        Mechanism::XOAuth2
    );
    let refused = pick(&["PLAIN", "LOGIN"], false, SaslMechanism::Auto).unwrap_err();
    assert_eq!(refused.reason, Reason::AuthMechanismUnsupported);
    assert!(
        refused.message.contains("it offers SASL PLAIN LOGIN"),
        "{}",
        refused.message
    );
    let refused = pick(&["XOAUTH2"], false, SaslMechanism::OAuthBearer).unwrap_err();
    assert!(
        refused
            .message
            .contains("OAUTHBEARER (oauth2.saslMechanism)"),
        "{}",
        refused.message
    );
}

/// Found by the pop3_response fuzz target: a control character in a CAPA line reached the
/// failure message (and the status) raw.
#[tokio::test]
async fn pop3_control_characters_are_escaped_everywhere() {
    let server = serve(vec![
        SayBytes(b"+OK \x1b[31mready\r\n".to_vec()),
        Cmd("CAPA"),
        SayBytes(b"+OK\r\nSASL PLAIN\x1fLOGIN\r\n.\r\n".to_vec()),
        Cmd("QUIT"),
        Say("+OK\r\n"),
    ])
    .await;
    let report = run(
        &target(server.port, Protocol::Pop3, TlsMode::None),
        &password(true),
    )
    .await;
    let f = failure(&report);
    assert_eq!(f.reason, Reason::AuthMechanismUnsupported, "{f:?}");
    assert!(
        // Escaped in the CAPA line, then upper-cased as a mechanism name.
        f.message.contains(r"(it offers SASL PLAIN\U{1F}LOGIN)"),
        "{}",
        f.message
    );
    assert_eq!(
        report.findings.greeting.as_deref(),
        Some(r"+OK \u{1b}[31mready")
    );
    assert_eq!(report.findings.capabilities, [r"SASL PLAIN\u{1f}LOGIN"]);
    let shown: Vec<&str> = report.steps.iter().map(|s| s.detail.as_str()).collect();
    assert!(
        !shown.iter().any(|d| d.chars().any(char::is_control)),
        "{shown:?}"
    );
    assert_eq!(server.seen().await, ["CAPA", "QUIT"]);
}

/// RFC 9051: a server that speaks only IMAP4rev2 lists no IMAP4rev1, and imap-proto
/// refuses such a capability list (in a greeting's code it is dropped, as an untagged
/// CAPABILITY it is a parse error). Tested like any other server.
#[tokio::test]
async fn imap4rev2_only_capabilities_in_the_greeting() {
    // No CAPABILITY asked, and SASL-IR is seen.
    let server = serve(vec![
        Tls("server"),
        Say("* OK [CAPABILITY IMAP4rev2 AUTH=PLAIN SASL-IR] IMAP4rev2 ready\r\n"),
        Cmd("AUTHENTICATE PLAIN "),
        Say("$TAG OK [CAPABILITY IMAP4rev2 AUTH=PLAIN] Logged in\r\n"),
        Cmd("STATUS \"INBOX\" (MESSAGES UNSEEN)"),
        Cmd("LOGOUT"),
        Say("* STATUS INBOX (MESSAGES 7 UNSEEN 2)\r\n$PREV OK Status completed.\r\n* BYE\r\n$TAG OK bye\r\n"),
    ])
    .await;
    let t = trusting(target(server.port, Protocol::Imap, TlsMode::Implicit), CA);
    let report = run(&t, &password(false)).await;
    assert!(report.passed(), "{report:#?}");
    assert_eq!(
        report.findings.capabilities,
        ["IMAP4rev2", "AUTH=PLAIN", "SASL-IR"]
    );
    assert_eq!(
        report.steps[4].detail,
        "IMAP4rev2 AUTH=PLAIN SASL-IR (from the greeting)"
    );
    assert_eq!(report.findings.mailbox.as_ref().unwrap().messages, 7);
    assert_eq!(server.seen().await.len(), 3);
}

#[tokio::test]
async fn imap4rev2_only_capabilities_asked_for() {
    // Before and after STARTTLS, each list in the same packet as the tagged OK.
    let server = serve(vec![
        Say("* OK IMAP4rev2 ready\r\n"),
        Cmd("CAPABILITY"),
        Say("* CAPABILITY IMAP4rev2 STARTTLS LOGINDISABLED\r\n$TAG OK done\r\n"),
        Cmd("STARTTLS"),
        Say("$TAG OK Begin TLS negotiation now.\r\n"),
        Tls("server"),
        Cmd("CAPABILITY"),
        Say("* CAPABILITY IMAP4rev2 AUTH=PLAIN\r\n$TAG OK done\r\n"),
        Cmd("AUTHENTICATE PLAIN"),
        // Untagged data before the continuation, the list among it.
        Say("* CAPABILITY IMAP4rev2 AUTH=PLAIN\r\n+ \r\n"),
        Any,
        Say("$TAG OK Logged in\r\n"),
        Cmd("STATUS"),
        Cmd("LOGOUT"),
        Say("* STATUS \"INBOX\" (MESSAGES 3 UNSEEN 0)\r\n$PREV OK done\r\n$TAG OK bye\r\n"),
    ])
    .await;
    let mut t = trusting(target(server.port, Protocol::Imap, TlsMode::StartTls), CA);
    t.host = "localhost".into();
    let report = run(&t, &password(false)).await;
    assert!(report.passed(), "{report:#?}");
    assert_eq!(report.findings.capabilities, ["IMAP4rev2", "AUTH=PLAIN"]);
    assert_eq!(report.steps[3].detail, "IMAP4rev2 STARTTLS LOGINDISABLED");
    assert_eq!(report.findings.mailbox.as_ref().unwrap().messages, 3);
    assert_secret_kept(&report);
    server.seen().await;
}

/// A server that does not advertise SASL-IR may send untagged data before its `+`; it is
/// skipped, not taken for the end of the exchange (which left the probe waiting for a
/// tagged reply while the server waited for the credentials, until the timeout).
#[tokio::test]
async fn imap_untagged_data_before_the_continuation_is_skipped() {
    let server = serve(vec![
        Say("* OK ready\r\n"),
        Cmd("CAPABILITY"),
        Say("* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n$TAG OK done\r\n"),
        Cmd("AUTHENTICATE PLAIN"),
        Say("* OK [ALERT] Maintenance tonight\r\n* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n+ \r\n"),
        Any,
        Say("$TAG OK Logged in\r\n"),
        Cmd("STATUS"),
        Say("* STATUS INBOX (MESSAGES 5 UNSEEN 1)\r\n$TAG OK done\r\n"),
        Cmd("LOGOUT"),
        Say("$TAG OK bye\r\n"),
    ])
    .await;
    let mut t = target(server.port, Protocol::Imap, TlsMode::None);
    t.timeout = Duration::from_secs(2);
    let report = run(&t, &password(true)).await;
    assert!(report.passed(), "{report:#?}");
    assert_eq!(
        report.steps[4].detail,
        "AUTHENTICATE PLAIN as alice: OK Logged in"
    );
    let seen = server.seen().await;
    let expected = sasl::encode(
        &sasl::Exchange::plain("alice", &SecretString::from(SECRET))
            .initial_response()
            .unwrap(),
    );
    assert_eq!(seen[2], *expected);
    assert_secret_kept(&report);

    // SASL LOGIN: before each of its two challenges.
    let server = serve(vec![
        Say("* OK ready\r\n"),
        Cmd("CAPABILITY"),
        Say("* CAPABILITY IMAP4rev1 LOGINDISABLED AUTH=LOGIN\r\n$TAG OK done\r\n"),
        Cmd("AUTHENTICATE LOGIN"),
        Say("* OK hello\r\n+ VXNlcm5hbWU6\r\n"),
        Any,
        Say("* OK still here\r\n+ UGFzc3dvcmQ6\r\n"),
        Any,
        Say("$TAG OK Logged in\r\n"),
        Cmd("STATUS"),
        Say("* STATUS INBOX (MESSAGES 5)\r\n$TAG OK done\r\n"),
        Cmd("LOGOUT"),
        Say("$TAG OK bye\r\n"),
    ])
    .await;
    let mut t = target(server.port, Protocol::Imap, TlsMode::None);
    t.timeout = Duration::from_secs(2);
    let report = run(&t, &password(true)).await;
    assert!(report.passed(), "{report:#?}");
    assert_eq!(report.findings.mechanism.as_deref(), Some("LOGIN"));
    let seen = server.seen().await;
    assert_eq!(seen[2], "YWxpY2U=");
    assert_secret_kept(&report);
}

/// RFC 1939 servers know no CAPA: USER/PASS is still tried (over TLS).
#[tokio::test]
async fn pop3_without_capa_logs_in_with_user_pass() {
    let server = serve(vec![
        Tls("server"),
        Say("+OK ready\r\n"),
        Cmd("CAPA"),
        Say("-ERR Unknown command\r\n"),
        Cmd("USER alice"),
        Say("+OK\r\n"),
        Cmd("PASS "),
        Say("+OK Logged in.\r\n"),
        Cmd("STAT"),
        Say("+OK 1 100\r\n"),
        Cmd("QUIT"),
        Say("+OK bye\r\n"),
    ])
    .await;
    let t = trusting(target(server.port, Protocol::Pop3, TlsMode::Implicit), CA);
    let report = run(&t, &password(false)).await;
    assert!(report.passed(), "{report:#?}");
    assert!(report.findings.capabilities.is_empty());
    assert_eq!(report.steps[4].detail, "none advertised");
    assert_eq!(report.findings.mechanism.as_deref(), Some("USER"));
    assert_eq!(report.findings.mailbox.as_ref().unwrap().messages, 1);
    assert_eq!(server.seen().await[2], format!("PASS {SECRET}"));
    assert_secret_kept(&report);
}

/// Capability names are case-insensitive (RFC 3501 §9): a server may list them in lower
/// case.
#[tokio::test]
async fn imap_capabilities_in_lower_case() {
    let server = serve(vec![
        Say("* OK [capability imap4rev1 auth=plain] ready\r\n"),
        Cmd("AUTHENTICATE PLAIN"),
        Say("+ \r\n"),
        Any,
        Say("$TAG OK Logged in\r\n"),
        Cmd("STATUS"),
        Say("* status INBOX (messages 4 unseen 4)\r\n$TAG OK done\r\n"),
        Cmd("LOGOUT"),
        Say("$TAG OK bye\r\n"),
    ])
    .await;
    let report = run(
        &target(server.port, Protocol::Imap, TlsMode::None),
        &password(true),
    )
    .await;
    assert!(report.passed(), "{report:#?}");
    assert_eq!(report.findings.mechanism.as_deref(), Some("PLAIN"));
    assert_eq!(report.findings.mailbox.as_ref().unwrap().unseen, Some(4));
    server.seen().await;

    // STARTTLS, LOGINDISABLED and SASL-IR likewise.
    let server = serve(vec![
        Say("* OK [capability imap4rev1 starttls logindisabled] ready\r\n"),
        Cmd("STARTTLS"),
        Say("$TAG OK go\r\n"),
        Tls("server"),
        Cmd("CAPABILITY"),
        Say("* capability imap4rev1 sasl-ir auth=plain\r\n$TAG ok done\r\n"),
        Cmd("AUTHENTICATE PLAIN "),
        Say("$TAG ok Logged in\r\n"),
        Cmd("STATUS"),
        Cmd("LOGOUT"),
        Say("* STATUS INBOX (MESSAGES 4 UNSEEN 4)\r\n$PREV ok done\r\n$TAG ok bye\r\n"),
    ])
    .await;
    let mut t = trusting(target(server.port, Protocol::Imap, TlsMode::StartTls), CA);
    t.host = "localhost".into();
    let report = run(&t, &password(false)).await;
    assert!(report.passed(), "{report:#?}");
    assert_eq!(report.findings.mechanism.as_deref(), Some("PLAIN"));
    server.seen().await;
}

/// imap-proto accepts any byte but NUL in an atom, so a capability may be non-ASCII: the
/// test ends in a verdict (a panic would leave the provider untested, its last status
/// standing).
#[tokio::test]
async fn a_capability_that_is_not_ascii_ends_in_a_verdict() {
    for (greeting, oauth) in [
        (
            "* OK [CAPABILITY IMAP4rev1 LOGINDISABLED AUTH\u{e9}X] hi\r\n",
            false,
        ),
        (
            "* OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2 \u{c4}\u{c4}\u{c4}] hi\r\n",
            true,
        ),
    ] {
        let server = serve(vec![Say(greeting), Any, Say("$TAG NO bye\r\n")]).await;
        let t = target(server.port, Protocol::Imap, TlsMode::None);
        let login = match oauth {
            false => password(true),
            true => Login::OAuth2 {
                username: "alice".into(),
                token: SecretString::from(SECRET),
                mechanism: SaslMechanism::Auto,
                allow_unencrypted: true,
            },
        };
        let report = tokio::spawn(async move { run(&t, &login).await }).await;
        let report = report.expect("the probe panicked");
        failure(&report);
    }
}

/// Gmail refuses a 16th concurrent session at login this way; the password is right.
#[tokio::test]
async fn gmail_too_many_simultaneous_connections_is_not_a_wrong_password() {
    let server = serve(vec![
        Say("* OK Gimap ready for requests from 10.0.0.1\r\n"),
        Cmd("CAPABILITY"),
        Say("* CAPABILITY IMAP4rev1 AUTH=XOAUTH2 AUTH=PLAIN\r\n$TAG OK Thats all she wrote!\r\n"),
        Cmd("AUTHENTICATE PLAIN"),
        Say("+ \r\n"),
        Any,
        Say("$TAG NO [ALERT] Too many simultaneous connections. (Failure)\r\n"),
        Cmd("LOGOUT"),
        Say("$TAG OK 73 good day (Success)\r\n"),
    ])
    .await;
    let t = target(server.port, Protocol::Imap, TlsMode::None);
    let f = failure(&run(&t, &password(true)).await).clone();
    assert_eq!(f.reason, Reason::ServerUnavailable, "{f:?}");
    assert!(
        f.message.contains("Too many simultaneous connections"),
        "{}",
        f.message
    );
    assert!(f.message.contains("not a wrong login"), "{}", f.message);
}

/// Microsoft 365 throttles a mailbox other clients use heavily, in words and without a
/// code, with BAD or NO, at the login or at STATUS: the server's doing, not a wrong
/// password (which would also make an OAuth2 token count as refused), nor a command it
/// did not understand, nor a missing mailbox.
#[tokio::test]
async fn exchange_throttling_is_the_server_at_login_and_at_status() {
    const GREETING: &str = "* OK The Microsoft Exchange IMAP4 service is ready.\r\n";
    const CAPABILITIES: &str = "* CAPABILITY IMAP4 IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2 SASL-IR\r\n$TAG OK CAPABILITY completed.\r\n";
    let login = Login::OAuth2 {
        username: "alice@example.com".into(),
        token: SecretString::from(SECRET),
        mechanism: SaslMechanism::Auto,
        allow_unencrypted: true,
    };
    let script = vec![
        Say(GREETING),
        Cmd("CAPABILITY"),
        Say(CAPABILITIES),
        Cmd("AUTHENTICATE XOAUTH2"),
        Say(
            "$TAG BAD Request is throttled. Suggested Backoff Time: 89117 milliseconds\r\n* BYE Connection closed. 14\r\n",
        ),
    ];
    let f = failed_against(script, Protocol::Imap, &login).await;
    assert_eq!(
        (f.reason, f.step),
        (Reason::ServerUnavailable, Step::Authenticate),
        "{f:?}"
    );
    assert!(
        f.message.contains("throttling") && f.message.contains("89117"),
        "{}",
        f.message
    );

    for reply in [
        "$PREV BAD Request is throttled. Suggested Backoff Time: 89117 milliseconds\r\n* BYE Connection closed. 14\r\n",
        "$PREV NO Request is throttled. Suggested Backoff Time: 299910 milliseconds\r\n* BYE bye\r\n$TAG OK LOGOUT completed.\r\n",
    ] {
        let script = vec![
            Say(GREETING),
            Cmd("CAPABILITY"),
            Say(CAPABILITIES),
            Cmd("AUTHENTICATE PLAIN"),
            Say("$TAG OK AUTHENTICATE completed.\r\n"),
            Cmd("STATUS"),
            Cmd("LOGOUT"),
            Say(reply),
        ];
        let f = failed_against(script, Protocol::Imap, &password(true)).await;
        assert_eq!(
            (f.reason, f.step),
            (Reason::ServerUnavailable, Step::Mailbox),
            "{reply}: {f:?}"
        );
    }
}

/// Gmail's daily IMAP limits ("[OVERQUOTA] Account exceeded command or bandwidth
/// limits") stop STATUS for up to a day: the account's limit, not the mailbox's name.
#[tokio::test]
async fn gmail_over_its_limits_is_the_server_not_the_mailbox() {
    let script = vec![
        Say("* OK Gimap ready for requests from 10.0.0.1\r\n"),
        Cmd("CAPABILITY"),
        Say(
            "* CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2 AUTH=PLAIN\r\n$TAG OK Thats all she wrote!\r\n",
        ),
        Cmd("AUTHENTICATE PLAIN"),
        Say("$TAG OK alice authenticated (Success)\r\n"),
        Cmd("STATUS"),
        Cmd("LOGOUT"),
        Say(
            "$PREV NO [OVERQUOTA] Account exceeded command or bandwidth limits. (Failure)\r\n* BYE LOGOUT Requested\r\n$TAG OK 73 good day (Success)\r\n",
        ),
    ];
    let f = failed_against(script, Protocol::Imap, &password(true)).await;
    assert_eq!(
        (f.reason, f.step),
        (Reason::ServerUnavailable, Step::Mailbox),
        "{f:?}"
    );
    assert!(f.message.contains("clears by itself"), "{}", f.message);
}

/// Exchange's POP3 answers PASS with "-ERR Server Unavailable. 21" when its mailbox
/// back end fails: not a wrong password.
#[tokio::test]
async fn exchange_pop3_server_unavailable_after_pass_is_not_a_wrong_password() {
    let script = vec![
        Say("+OK The Microsoft Exchange POP3 service is ready.\r\n"),
        Cmd("CAPA"),
        Say("+OK\r\nTOP\r\nUIDL\r\nUSER\r\n.\r\n"),
        Cmd("USER"),
        Say("+OK\r\n"),
        Cmd("PASS"),
        Say("-ERR Server Unavailable. 21\r\n"),
        Cmd("QUIT"),
        Say("+OK bye\r\n"),
    ];
    let f = failed_against(script, Protocol::Pop3, &password(true)).await;
    assert_eq!(
        (f.reason, f.step),
        (Reason::ServerUnavailable, Step::Authenticate),
        "{f:?}"
    );
    assert!(f.message.contains("not a wrong login"), "{}", f.message);
}

/// After the server agreed to STARTTLS/STLS, a failed handshake says so, and does not
/// advise the mode already in use.
#[tokio::test]
async fn a_handshake_failed_after_starttls_blames_the_servers_tls_not_the_mode() {
    // IMAP: the server closes instead of handshaking (broken TLS setup on its side).
    let server = serve(vec![
        Say("* OK ready\r\n"),
        Cmd("CAPABILITY"),
        Say("* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED\r\n$TAG OK done\r\n"),
        Cmd("STARTTLS"),
        Say("$TAG OK Begin TLS negotiation now.\r\n"),
    ])
    .await;
    let t = target(server.port, Protocol::Imap, TlsMode::StartTls);
    let f = failure(&run(&t, &password(false)).await).clone();
    assert_eq!(f.reason, Reason::TlsHandshakeFailed);
    assert!(!f.message.contains("tls.mode StartTLS"), "{}", f.message);
    assert!(
        f.message.contains("accepted STARTTLS but closed"),
        "{}",
        f.message
    );
    // POP3: the server answers the ClientHello in plaintext.
    let server = serve(vec![
        Say("+OK ready\r\n"),
        Cmd("CAPA"),
        Say("+OK\r\nSTLS\r\nUSER\r\n.\r\n"),
        Cmd("STLS"),
        Say("+OK Begin TLS negotiation\r\n"),
        Any,
        Say("-ERR Unknown command\r\n"),
    ])
    .await;
    let t = target(server.port, Protocol::Pop3, TlsMode::StartTls);
    let f = failure(&run(&t, &password(false)).await).clone();
    assert_eq!(f.reason, Reason::TlsHandshakeFailed);
    assert!(!f.message.contains("tls.mode StartTLS"), "{}", f.message);
    assert!(
        f.message
            .contains("accepted STLS but then answered in plaintext"),
        "{}",
        f.message
    );
}

/// Plaintext after the OK to STARTTLS, read before the handshake (response injection,
/// CVE-2011-0411): refused, as POP3 refuses it after STLS, and no credentials are sent.
#[tokio::test]
async fn imap_data_after_the_ok_to_starttls_is_refused() {
    let server = serve(vec![
        Say("* OK ready\r\n"),
        Cmd("CAPABILITY"),
        Say("* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED\r\n$TAG OK done\r\n"),
        Cmd("STARTTLS"),
        // Injected: a capability list the client would read as if after the handshake.
        Say("$TAG OK Begin TLS now.\r\n* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n"),
    ])
    .await;
    let mut t = trusting(target(server.port, Protocol::Imap, TlsMode::StartTls), CA);
    t.host = "localhost".into();
    let report = run(&t, &password(false)).await;
    let f = failure(&report).clone();
    assert_eq!((f.reason, f.step), (Reason::ProtocolError, Step::StartTls));
    assert!(f.message.contains("injecting"), "{}", f.message);
    assert_secret_kept(&report);
}

/// A pinned self-signed certificate naming its host only in the CN (no subjectAltName,
/// as old mail servers' certificate scripts made them): no tls.serverName can match, so
/// none is suggested.
#[tokio::test]
async fn a_certificate_naming_its_host_only_in_the_cn_says_to_reissue_it() {
    let server = serve(vec![Tls("cnonly")]).await;
    let pem = include_bytes!("testdata/cnonly.pem");
    let mut t = trusting(target(server.port, Protocol::Imap, TlsMode::Implicit), pem);
    t.host = "localhost".into();
    let f = failure(&run(&t, &Login::None).await).clone();
    assert_eq!(f.reason, Reason::CertificateInvalid);
    assert!(
        !f.message.contains("set tls.serverName to one of those"),
        "{}",
        f.message
    );
    assert!(
        f.message.contains("no subjectAltName") && f.message.contains("reissue"),
        "{}",
        f.message
    );
}

/// Exchange Online refuses a token in two words whatever the cause: the message lists the
/// usual causes. Another server's refusal carries no such list.
#[tokio::test]
async fn an_exchange_oauth2_refusal_lists_its_usual_causes() {
    for (greeting, listed) in [
        (
            "* OK The Microsoft Exchange IMAP4 service is ready.\r\n",
            true,
        ),
        ("* OK Dovecot ready.\r\n", false),
    ] {
        let server = serve(vec![
            Say(greeting),
            Cmd("CAPABILITY"),
            Say("* CAPABILITY IMAP4rev1 AUTH=XOAUTH2 SASL-IR\r\n$TAG OK CAPABILITY completed.\r\n"),
            Cmd("AUTHENTICATE XOAUTH2"),
            Say("$TAG NO AUTHENTICATE failed.\r\n"),
            Any,
            Say("* BYE\r\n$TAG OK\r\n"),
        ])
        .await;
        let login = Login::OAuth2 {
            username: "alice@example.com".into(),
            token: SecretString::from(SECRET),
            mechanism: SaslMechanism::Auto,
            allow_unencrypted: true,
        };
        let report = run(&target(server.port, Protocol::Imap, TlsMode::None), &login).await;
        let f = failure(&report);
        assert_eq!(f.reason, Reason::AuthenticationFailed, "{f:?}");
        assert!(f.message.contains("AUTHENTICATE failed."), "{}", f.message);
        assert_eq!(
            f.message.contains("https://outlook.office.com") && f.message.contains("FullAccess"),
            listed,
            "{}",
            f.message
        );
        assert_secret_kept(&report);
    }
}

/// A response code followed by a non-ASCII byte instead of a space made async-imap's
/// parser panic (found by fuzzing): the test fails as ProtocolError at that step.
#[tokio::test]
async fn a_reply_that_makes_the_imap_parser_panic_is_a_protocol_error_of_its_step() {
    let script = vec![SayBytes(
        b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN]\x8bDovecot ready\r\n".to_vec(),
    )];
    let f = failed_against(script, Protocol::Imap, &password(true)).await;
    assert_eq!(
        (f.reason, f.step),
        (Reason::ProtocolError, Step::Greeting),
        "{f:?}"
    );
    assert!(f.message.contains("could not read"), "{}", f.message);

    let script = vec![
        Say("* OK ready\r\n"),
        Cmd("CAPABILITY"),
        Say("* CAPABILITY IMAP4rev1\r\n$TAG OK done\r\n"),
        Cmd("LOGIN"),
        Say("$TAG OK [CAPABILITY IMAP4rev1]\u{e9} logged in\r\n"),
    ];
    let f = failed_against(script, Protocol::Imap, &password(true)).await;
    assert_eq!(
        (f.reason, f.step),
        (Reason::ProtocolError, Step::Authenticate),
        "{f:?}"
    );
}

/// `text` with the secret (and the base64 of alice's SASL PLAIN response with it) where
/// `{secret}` and `{plain}` stand, for a server that echoes what it was sent.
fn echoing(text: &str) -> &'static str {
    let plain = sasl::encode(
        &sasl::Exchange::plain("alice", &SecretString::from(SECRET))
            .initial_response()
            .unwrap(),
    );
    said(text.replace("{secret}", SECRET).replace("{plain}", &plain))
}

#[tokio::test]
async fn a_password_the_server_echoes_is_redacted_from_all_it_said() {
    let (port, report) = tested_against(
        vec![
            Say("* OK ready\r\n"),
            Cmd("CAPABILITY"),
            Say("* CAPABILITY IMAP4rev1\r\n$TAG OK done\r\n"),
            Cmd("LOGIN"),
            Say(echoing("$TAG NO you sent \"alice\" \"{secret}\"\r\n")),
            Cmd("LOGOUT"),
            Say(echoing(
                "* BYE bye {secret}\r\n$TAG OK Logout completed.\r\n",
            )),
        ],
        Protocol::Imap,
        &password(true),
    )
    .await;
    let f = failure(&report);
    assert_eq!(f.reason, Reason::AuthenticationFailed, "{f:?}");
    assert_eq!(
        f.message,
        format!(
            "IMAP LOGIN rejected by 127.0.0.1:{}: \"NO you sent \\\"alice\\\" \\\"[redacted]\\\"\"",
            port
        )
    );
    assert_secret_kept(&report);

    let (_, report) = tested_against(
        vec![
            Say("+OK ready\r\n"),
            Cmd("CAPA"),
            Say("+OK\r\nSASL PLAIN\r\n.\r\n"),
            Cmd("AUTH PLAIN"),
            Say("+ \r\n"),
            Any,
            Say(echoing("-ERR [AUTH] cannot take {plain} for {secret}\r\n")),
            Cmd("QUIT"),
            Say("+OK bye\r\n"),
        ],
        Protocol::Pop3,
        &password(true),
    )
    .await;
    let f = failure(&report);
    assert_eq!(f.reason, Reason::AuthenticationFailed, "{f:?}");
    assert!(
        f.message
            .ends_with("\"-ERR [AUTH] cannot take [redacted] for [redacted]\""),
        "{f:?}"
    );
    assert_secret_kept(&report);
}

/// `text` for the server to say, `'static` as scripts take it.
fn said(text: String) -> &'static str {
    Box::leak(text.into_boxed_str())
}

/// A POP3 server that refuses PASS with `reply`, tested with `login`.
async fn pop3_pass_refused(login: &Login, host: &str, reply: &'static str) -> Report {
    let server = serve(vec![
        Say("+OK ready\r\n"),
        Cmd("CAPA"),
        Say("+OK\r\nUSER\r\n.\r\n"),
        Cmd("USER"),
        Say("+OK\r\n"),
        Cmd("PASS"),
        Say(reply),
        Cmd("QUIT"),
        Say("+OK bye\r\n"),
    ])
    .await;
    let mut t = target(server.port, Protocol::Pop3, TlsMode::None);
    t.host = host.into();
    run(&t, login).await
}

fn plain_login(password: &str, allow_unencrypted: bool) -> Login {
    Login::Password {
        username: "alice".into(),
        password: SecretString::from(password),
        allow_unencrypted,
    }
}

/// The secret is taken out of the server's words before they are quoted (which escapes
/// `"`, `\` and combining marks) or cut (which would leave its first part).
#[tokio::test]
async fn an_echoed_secret_is_redacted_before_it_is_escaped_or_cut() {
    // Quoted as IMAP LOGIN sends it, with a `"` in it.
    let pw = "Tr0ub4dor\"&3xyz";
    let login = plain_login(pw, true);
    let (_, report) = tested_against(
        vec![
            Say("* OK ready\r\n"),
            Cmd("CAPABILITY"),
            Say("* CAPABILITY IMAP4rev1\r\n$TAG OK done\r\n"),
            Cmd("LOGIN"),
            Say(said(format!(
                "$TAG NO you sent \"alice\" \"{}\"\r\n",
                pw.replace('"', "\\\"")
            ))),
            Cmd("LOGOUT"),
            Say("* BYE bye\r\n$TAG OK Logout completed.\r\n"),
        ],
        Protocol::Imap,
        &login,
    )
    .await;
    let shown = format!("{report:?}");
    assert!(failure(&report).message.contains("[redacted]"), "{shown}");
    assert!(!shown.contains("Tr0ub4dor"), "{shown}");

    // With a combining mark, which quoting escapes.
    let pw = "cafe\u{301}-latte-42";
    let login = plain_login(pw, true);
    let reply = said(format!("-ERR bad password {pw}\r\n"));
    let report = pop3_pass_refused(&login, "127.0.0.1", reply).await;
    let shown = format!("{report:?}");
    assert!(shown.contains("bad password [redacted]"), "{shown}");
    assert!(!shown.contains("latte-42"), "{shown}");

    // Where a message cuts the reply (200 characters), inside the password.
    let pw = "CorrectHorseBatteryStaple";
    let login = plain_login(pw, true);
    let reply = said(format!("-ERR {} bad password {pw}\r\n", "x".repeat(170)));
    let report = pop3_pass_refused(&login, "127.0.0.1", reply).await;
    let shown = format!("{report:?}");
    assert!(!shown.contains("CorrectHorse"), "{shown}");

    // An OAuth2 token longer than the cut.
    let token = format!("ya29.{}", "A1b2C3d4".repeat(30));
    let login = Login::OAuth2 {
        username: "alice".into(),
        token: SecretString::from(token.clone()),
        mechanism: SaslMechanism::XOAuth2,
        allow_unencrypted: true,
    };
    let (_, report) = tested_against(
        vec![
            Say("* OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2 SASL-IR] ready\r\n"),
            Cmd("AUTHENTICATE"),
            Say(said(format!("$TAG NO invalid token {token}\r\n"))),
            Cmd("LOGOUT"),
            Say("* BYE bye\r\n$TAG OK Logout completed.\r\n"),
        ],
        Protocol::Imap,
        &login,
    )
    .await;
    let shown = format!("{report:?}");
    assert!(failure(&report).message.contains("[redacted]"), "{shown}");
    assert!(!shown.contains(&token[..20]), "{shown}");
}

/// mailroom's own words are never redacted: where `[redacted]` stood would tell the
/// password (one that names the host, or is the word "password").
#[tokio::test]
async fn mailrooms_own_words_are_not_taken_for_the_secret() {
    let login = plain_login("localhost", true);
    let reply = "-ERR [AUTH] Authentication failed.\r\n";
    let report = pop3_pass_refused(&login, "localhost", reply).await;
    let f = failure(&report);
    assert!(f.message.contains("by localhost:"), "{f:?}");
    assert!(!format!("{report:?}").contains("[redacted]"), "{report:?}");

    let login = plain_login("password", false);
    let (_, report) = tested_against(
        vec![
            Say("+OK ready\r\n"),
            Cmd("CAPA"),
            Say("+OK\r\nUSER\r\n.\r\n"),
            Cmd("QUIT"),
            Say("+OK bye\r\n"),
        ],
        Protocol::Pop3,
        &login,
    )
    .await;
    let shown = format!("{report:?}");
    assert!(failure(&report).message.contains("password"), "{shown}");
    assert!(!shown.contains("[redacted]"), "{shown}");
}
