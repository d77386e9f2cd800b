//! POP3 (RFC 1939) with CAPA (RFC 2449), STLS (RFC 2595) and AUTH (RFC 5034): our own
//! small client, because no maintained crate does STLS over tokio-rustls. It only needs
//! what a test needs: the greeting, CAPA, STLS, USER/PASS or AUTH PLAIN, STAT and QUIT.
//!
//! Every line is read through a bounded reader over the metered [`Wire`], so a server
//! cannot make it hold more than one line (at most 64 KiB) at a time.

use secrecy::zeroize::Zeroizing;
use secrecy::{ExposeSecret, SecretString};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::classify::{self, quote};
use super::redact::Redactor;
use super::sasl::{self, Exchange};
use super::session::{Greeting, MailSession, Mechanism};
use super::stream::{LimitExceeded, Limits, MAX_LINE, Meter, Tcp, Wire};
use super::{Failure, MailboxInfo, Step};
use crate::api::{Protocol, Reason};

/// The longest AUTH command that may carry its initial response inline (RFC 5034 §4).
const MAX_AUTH_LINE: usize = 255;
/// The most lines a multi-line reply (CAPA) may have.
const MAX_MULTILINE: usize = 1000;
/// The most challenges one AUTH exchange may bring.
const MAX_CHALLENGES: usize = 4;

/// A POP3 server's one-line reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Reply {
    /// `+OK text`
    Ok(String),
    /// `-ERR text`
    Err(String),
    /// `+ base64` (an AUTH challenge)
    Continue(String),
}

/// Reads a reply line (without CRLF); `None` if it is not POP3.
pub(crate) fn parse_reply(line: &[u8]) -> Option<Reply> {
    let line = String::from_utf8_lossy(line);
    let line = line.trim_end_matches(['\r', '\n']);
    let after = |prefix: &str| -> Option<String> {
        let head = line.get(..prefix.len())?;
        if !head.eq_ignore_ascii_case(prefix) {
            return None;
        }
        let rest = &line[prefix.len()..];
        if rest.is_empty() {
            Some(String::new())
        } else {
            rest.strip_prefix(' ').map(str::to_string)
        }
    };
    if let Some(text) = after("+OK") {
        Some(Reply::Ok(text))
    } else if let Some(text) = after("-ERR") {
        Some(Reply::Err(text))
    } else {
        after("+").map(Reply::Continue)
    }
}

/// One line of a multi-line reply, dot-unstuffed; `None` for the terminating ".".
pub(crate) fn unstuff(line: &[u8]) -> Option<&[u8]> {
    match line {
        b"." => None,
        [b'.', rest @ ..] => Some(rest),
        _ => Some(line),
    }
}

/// `STAT`'s "+OK nn mm": message count and size in octets.
pub(crate) fn parse_stat(text: &str) -> Option<(u64, u64)> {
    let mut words = text.split_whitespace();
    let count = words.next()?.parse().ok()?;
    let size = words.next()?.parse().ok()?;
    Some((count, size))
}

/// The SASL mechanisms a CAPA list offers (`SASL PLAIN LOGIN`).
pub(crate) fn sasl_mechanisms(caps: &[String]) -> Vec<String> {
    caps.iter()
        .filter_map(|c| {
            let mut words = c.split_whitespace();
            let first = words.next()?;
            first
                .eq_ignore_ascii_case("SASL")
                .then(|| words.map(str::to_ascii_uppercase).collect::<Vec<_>>())
        })
        .flatten()
        .collect()
}

fn has_capability(caps: &[String], name: &str) -> bool {
    caps.iter().any(|c| {
        c.split_whitespace()
            .next()
            .is_some_and(|w| w.eq_ignore_ascii_case(name))
    })
}

/// Where the first LF in `buf` is, looking from `from` on.
fn line_end(buf: &[u8], from: usize) -> Option<usize> {
    buf[from..]
        .iter()
        .position(|&b| b == b'\n')
        .map(|i| from + i)
}

/// A line reader that never holds more than [`MAX_LINE`] bytes. (`pub(super)` for the
/// fuzz target that checks exactly that.)
pub(super) struct Lines {
    pub(super) wire: Wire,
    pub(super) buf: Vec<u8>,
}

impl Lines {
    pub(super) fn new(wire: Wire) -> Lines {
        Lines {
            wire,
            buf: Vec::new(),
        }
    }

    /// The next line, without its line ending.
    pub(super) async fn read_line(&mut self) -> std::io::Result<Vec<u8>> {
        // How much of `buf` is known to hold no LF: each byte is looked at once, however
        // small the pieces a server sends a long line in.
        let mut scanned = 0;
        loop {
            if let Some(pos) = line_end(&self.buf, scanned) {
                let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            scanned = self.buf.len();
            if self.buf.len() >= MAX_LINE {
                return Err(std::io::Error::other(LimitExceeded::Line {
                    limit: MAX_LINE,
                }));
            }
            let mut chunk = [0u8; 4096];
            let room = (MAX_LINE - self.buf.len()).min(chunk.len());
            let n = self.wire.read(&mut chunk[..room]).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Sends `lines` in one write (more than one only where the server allows PIPELINING).
    async fn send(&mut self, lines: &[&[u8]]) -> std::io::Result<()> {
        let size = lines.iter().map(|l| l.len() + 2).sum();
        let mut out = Zeroizing::new(Vec::with_capacity(size));
        for line in lines {
            out.extend_from_slice(line);
            out.extend_from_slice(b"\r\n");
        }
        self.wire.write_all(&out).await?;
        self.wire.flush().await
    }
}

/// A POP3 session.
pub(crate) struct Pop3 {
    conn: Option<Lines>,
    endpoint: String,
    /// Set while a command is in flight; left set when it broke off (I/O error, garbage,
    /// or its future was dropped at the deadline), so QUIT is not attempted.
    busy: bool,
    pending: Option<String>,
    /// The last CAPA listed PIPELINING (RFC 2449 §6.6): commands may go out together.
    pipelining: bool,
    /// QUIT went out with STAT; its reply is still to be read.
    quit_sent: bool,
    /// Takes the login's secret out of replies quoted in messages (see `probe::redact`).
    redactor: Redactor,
}

impl Pop3 {
    fn lines(&mut self, step: Step) -> Result<&mut Lines, Failure> {
        self.conn.as_mut().ok_or_else(|| {
            Failure::new(
                Reason::ProtocolError,
                step,
                "the POP3 connection is no longer usable",
            )
        })
    }

    fn recent_lines(&self) -> Vec<String> {
        self.conn
            .as_ref()
            .map(|c| c.wire.meter().recent())
            .unwrap_or_default()
    }

    fn io_failure(&self, step: Step, err: &std::io::Error) -> Failure {
        classify::io_failure(
            Protocol::Pop3,
            step,
            &self.endpoint,
            err,
            &self.recent_lines(),
        )
    }

    /// Reads one reply line; `shown` names the command in messages.
    async fn read_reply(&mut self, step: Step, shown: &str) -> Result<(Reply, String), Failure> {
        let read = self.lines(step)?.read_line().await;
        let line = read.map_err(|err| self.io_failure(step, &err))?;
        // The reply as messages quote it; the protocol reads `line`.
        let raw = self
            .redactor
            .apply(String::from_utf8_lossy(&line).into_owned());
        match parse_reply(&line) {
            Some(reply) => {
                self.busy = false;
                Ok((reply, raw))
            }
            None => Err(Failure::new(
                Reason::ProtocolError,
                step,
                format!(
                    "POP3 server {} answered {shown} with {}, which is not POP3",
                    self.endpoint,
                    quote(&raw)
                ),
            )),
        }
    }

    /// Sends `line` (which may hold a secret; `shown` never does) and reads the reply.
    async fn command(
        &mut self,
        step: Step,
        shown: &str,
        line: &[u8],
    ) -> Result<(Reply, String), Failure> {
        self.command_then(step, shown, line, None).await
    }

    /// [`command`](Self::command), with `then` written in the same packet (PIPELINING);
    /// only the reply to `line` is read.
    async fn command_then(
        &mut self,
        step: Step,
        shown: &str,
        line: &[u8],
        then: Option<&[u8]>,
    ) -> Result<(Reply, String), Failure> {
        self.busy = true;
        self.pending = Some(shown.to_string());
        let lines = self.lines(step)?;
        lines.wire.mark();
        let out: Vec<&[u8]> = std::iter::once(line).chain(then).collect();
        if let Err(err) = lines.send(&out).await {
            return Err(self.io_failure(step, &err));
        }
        self.read_reply(step, shown).await
    }

    /// The lines of a multi-line reply after its +OK.
    async fn read_multiline(&mut self, step: Step) -> Result<Vec<String>, Failure> {
        self.busy = true;
        let mut out = Vec::new();
        loop {
            let read = self.lines(step)?.read_line().await;
            let line = read.map_err(|err| self.io_failure(step, &err))?;
            match unstuff(&line) {
                None => break,
                Some(text) => {
                    if out.len() == MAX_MULTILINE {
                        return Err(Failure::new(
                            Reason::ProtocolError,
                            step,
                            format!(
                                "POP3 server {} sent more than {MAX_MULTILINE} lines at the {step} step",
                                self.endpoint
                            ),
                        ));
                    }
                    out.push(classify::printable(&String::from_utf8_lossy(text)));
                }
            }
        }
        self.busy = false;
        Ok(out)
    }

    async fn user_pass(
        &mut self,
        username: &str,
        password: &SecretString,
    ) -> Result<String, Failure> {
        let step = Step::Authenticate;
        let (reply, raw) = self
            .command(step, "USER", format!("USER {username}").as_bytes())
            .await?;
        if let Reply::Err(_) = reply {
            return Err(self.rejected("USER", &raw, &[]));
        }
        let mut line = Zeroizing::new(b"PASS ".to_vec());
        line.extend_from_slice(password.expose_secret().as_bytes());
        let (reply, raw) = self.command(step, "PASS", &line).await?;
        match reply {
            Reply::Ok(_) => Ok(raw),
            _ => Err(self.rejected("PASS", &raw, &[])),
        }
    }

    async fn auth(&mut self, mut exchange: Exchange) -> Result<String, Failure> {
        let step = Step::Authenticate;
        let mechanism = exchange.mechanism();
        let shown = format!("AUTH {mechanism}");
        // The two-line form first: every server that has AUTH takes it (RFC 1734 and
        // 5034), and it is the only form for responses longer than an AUTH line may be
        // (OAuth2 tokens). A server that refuses it before any credential was sent gets
        // the inline form (RFC 5034 initial response) once, if the mechanism has one,
        // unless its refusal says it is unavailable or the mailbox in use ([SYS/TEMP],
        // [IN-USE]): then nothing more is sent.
        let (mut reply, mut raw) = self.command(step, &shown, shown.as_bytes()).await?;
        let mut tried_inline = false;
        for _ in 0..=MAX_CHALLENGES {
            match reply {
                Reply::Ok(_) => return Ok(raw),
                Reply::Continue(text) => {
                    let challenge = sasl::decode_challenge(&text).map_err(|_| {
                        Failure::new(
                            Reason::ProtocolError,
                            step,
                            format!(
                                "POP3 server {} sent an AUTH challenge that is not base64: {}",
                                self.endpoint,
                                quote(&raw)
                            ),
                        )
                    })?;
                    // The challenge is kept for messages, not read.
                    let challenge = self.redactor.apply_bytes(&challenge);
                    let response = sasl::encode(&exchange.respond(&challenge));
                    (reply, raw) = self
                        .command(step, &format!("the {shown} response"), response.as_bytes())
                        .await?;
                }
                Reply::Err(_) if !exchange.credentials_sent() && !tried_inline => {
                    if let Some(failure) = classify::refused_before_credentials(
                        Protocol::Pop3,
                        &self.endpoint,
                        &shown,
                        &raw,
                    ) {
                        return Err(failure);
                    }
                    tried_inline = true;
                    let Some(initial) = exchange.initial_response() else {
                        return Err(self.mechanism_refused(&shown, &raw));
                    };
                    let response = sasl::encode(&initial);
                    let mut line = Zeroizing::new(format!("{shown} ").into_bytes());
                    line.extend_from_slice(response.as_bytes());
                    if line.len() > MAX_AUTH_LINE {
                        return Err(self.mechanism_refused(&shown, &raw));
                    }
                    (reply, raw) = self.command(step, &shown, &line).await?;
                }
                Reply::Err(_) if !exchange.credentials_sent() => {
                    return Err(self.mechanism_refused(&shown, &raw));
                }
                Reply::Err(_) => {
                    return Err(self.rejected(&shown, &raw, exchange.later_challenges()));
                }
            }
        }
        Err(Failure::new(
            Reason::ProtocolError,
            step,
            format!(
                "POP3 server {} sent more than {MAX_CHALLENGES} challenges to {shown}",
                self.endpoint
            ),
        ))
    }

    fn rejected(&self, command: &str, raw: &str, challenges: &[String]) -> Failure {
        if let Some(failure) = classify::refused_login(Protocol::Pop3, &self.endpoint, command, raw)
        {
            return failure;
        }
        let mut message = format!(
            "POP3 {command} rejected by {}: {}",
            self.endpoint,
            quote(raw)
        );
        for challenge in challenges {
            message.push_str(&sasl::describe_challenge(challenge));
        }
        Failure::new(Reason::AuthenticationFailed, Step::Authenticate, message)
    }

    /// A refusal of `command` before any credential was sent: the mechanism, unless the
    /// server's code or words say it is unavailable.
    fn mechanism_refused(&self, command: &str, raw: &str) -> Failure {
        if let Some(failure) =
            classify::refused_before_credentials(Protocol::Pop3, &self.endpoint, command, raw)
        {
            return failure;
        }
        Failure::new(
            Reason::AuthMechanismUnsupported,
            Step::Authenticate,
            format!(
                "POP3 server {} refused {command} before any credential was sent: {}",
                self.endpoint,
                quote(raw)
            ),
        )
    }
}

/// Refuses line breaks (and NUL) in what goes on a command line.
fn check_line_safe(what: &str, value: &str) -> Result<(), Failure> {
    if value.contains(['\r', '\n', '\0']) {
        return Err(Failure::new(
            Reason::InvalidSpec,
            Step::Authenticate,
            format!("the {what} contains a line break or NUL character, which POP3 cannot send"),
        ));
    }
    Ok(())
}

impl MailSession for Pop3 {
    fn limits() -> Limits {
        Limits::for_pop3()
    }

    fn open(wire: Wire, endpoint: String) -> Pop3 {
        Pop3 {
            redactor: wire.meter().redactor().clone(),
            conn: Some(Lines::new(wire)),
            endpoint,
            busy: false,
            pending: None,
            pipelining: false,
            quit_sent: false,
        }
    }

    async fn greeting(&mut self) -> Result<Greeting, Failure> {
        let step = Step::Greeting;
        self.busy = true;
        self.pending = None;
        self.lines(step)?.wire.mark();
        let read = self.lines(step)?.read_line().await;
        let line = read.map_err(|err| self.io_failure(step, &err))?;
        let raw = String::from_utf8_lossy(&line).into_owned();
        match parse_reply(&line) {
            Some(Reply::Ok(_)) => {
                self.busy = false;
                Ok(Greeting {
                    text: classify::printable(raw.trim()),
                    preauth: false,
                    capabilities: None,
                })
            }
            Some(Reply::Err(_)) => Err(classify::refused_session(
                Protocol::Pop3,
                &self.endpoint,
                raw.trim_end(),
            )),
            _ => Err(classify::unexpected_greeting(
                Protocol::Pop3,
                &self.endpoint,
                &line,
            )),
        }
    }

    async fn capabilities(&mut self) -> Result<Vec<String>, Failure> {
        let step = Step::Capabilities;
        let (reply, _) = self.command(step, "CAPA", b"CAPA").await?;
        let caps = match reply {
            Reply::Ok(_) => self.read_multiline(step).await?,
            // An RFC 1939 server without CAPA: nothing is advertised.
            _ => Vec::new(),
        };
        self.pipelining = has_capability(&caps, "PIPELINING");
        Ok(caps)
    }

    fn offers_starttls(&self, caps: &[String]) -> bool {
        has_capability(caps, "STLS")
    }

    async fn start_tls(&mut self) -> Result<(Tcp, Meter, String), Failure> {
        let step = Step::StartTls;
        let (reply, raw) = self.command(step, "STLS", b"STLS").await?;
        if !matches!(reply, Reply::Ok(_)) {
            return Err(Failure::new(
                Reason::StartTlsUnavailable,
                step,
                format!(
                    "POP3 server {} refused STLS: {}",
                    self.endpoint,
                    quote(&raw)
                ),
            ));
        }
        let lines = self.conn.take().expect("a command just succeeded on it");
        if !lines.buf.is_empty() {
            return Err(Failure::new(
                Reason::ProtocolError,
                step,
                format!(
                    "POP3 server {} sent data after its +OK to STLS, before the TLS handshake; \
                     refusing to continue (someone may be injecting commands)",
                    self.endpoint
                ),
            ));
        }
        let (tcp, meter) = lines.wire.into_plain().ok_or_else(|| {
            Failure::new(
                Reason::ProtocolError,
                step,
                "STLS on a connection that is already TLS",
            )
        })?;
        Ok((tcp, meter, raw))
    }

    fn resume(&mut self, wire: Wire) {
        self.conn = Some(Lines::new(wire));
        self.busy = false;
    }

    fn is_tls(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| c.wire.is_tls())
    }

    fn choose_mechanism(&self, caps: &[String]) -> Result<Mechanism, Failure> {
        let sasl = sasl_mechanisms(caps);
        if sasl.iter().any(|m| m == "PLAIN") {
            return Ok(Mechanism::SaslPlain);
        }
        if sasl.iter().any(|m| m == "LOGIN") {
            return Ok(Mechanism::SaslLogin);
        }
        // Without CAPA nothing is known: USER/PASS is what RFC 1939 servers have.
        if caps.is_empty() || has_capability(caps, "USER") {
            return Ok(Mechanism::UserPass);
        }
        let offered = if sasl.is_empty() {
            String::new()
        } else {
            format!(" (it offers SASL {})", sasl.join(" "))
        };
        let hint = if self.is_tls() {
            ""
        } else {
            "; servers often allow passwords only over TLS: use tls.mode StartTLS or Implicit"
        };
        Err(Failure::new(
            Reason::AuthMechanismUnsupported,
            Step::Authenticate,
            format!(
                "POP3 server {} offers neither SASL PLAIN, SASL LOGIN nor USER/PASS{offered}{hint}",
                self.endpoint
            ),
        ))
    }

    fn sasl_offered(&self, caps: &[String]) -> Vec<String> {
        sasl_mechanisms(caps)
    }

    async fn authenticate(
        &mut self,
        mechanism: Mechanism,
        username: &str,
        password: &SecretString,
    ) -> Result<String, Failure> {
        match mechanism {
            Mechanism::XOAuth2 | Mechanism::OAuthBearer => {
                let exchange = if mechanism == Mechanism::XOAuth2 {
                    Exchange::xoauth2(username, password)
                } else {
                    Exchange::oauthbearer(username, password, &self.endpoint)
                };
                exchange
                    .check()
                    .map_err(|why| Failure::new(Reason::InvalidSpec, Step::Authenticate, why))?;
                self.auth(exchange).await
            }
            Mechanism::SaslPlain | Mechanism::SaslLogin => {
                let exchange = if mechanism == Mechanism::SaslPlain {
                    Exchange::plain(username, password)
                } else {
                    Exchange::login(username, password)
                };
                exchange
                    .check()
                    .map_err(|why| Failure::new(Reason::InvalidSpec, Step::Authenticate, why))?;
                self.auth(exchange).await
            }
            Mechanism::UserPass | Mechanism::ImapLogin => {
                check_line_safe("username", username)?;
                check_line_safe("password", password.expose_secret())?;
                self.user_pass(username, password).await
            }
        }
    }

    async fn inspect(&mut self, _mailbox: &str) -> Result<(MailboxInfo, String), Failure> {
        let step = Step::Mailbox;
        // QUIT follows whatever STAT answers; with PIPELINING it goes out with it.
        let then = self.pipelining.then_some(&b"QUIT"[..]);
        self.quit_sent = then.is_some();
        let (reply, raw) = self.command_then(step, "STAT", b"STAT", then).await?;
        match reply {
            Reply::Ok(text) => {
                let (messages, size) = parse_stat(&text).ok_or_else(|| {
                    Failure::new(
                        Reason::ProtocolError,
                        step,
                        format!(
                            "POP3 server {} answered STAT with {}, not a message count and size",
                            self.endpoint,
                            quote(&raw)
                        ),
                    )
                })?;
                Ok((
                    MailboxInfo {
                        name: "INBOX".into(),
                        messages,
                        unseen: None,
                    },
                    format!("STAT: {}, {size} octets", super::messages(messages)),
                ))
            }
            _ => Err(classify::refused_mailbox(
                Protocol::Pop3,
                &self.endpoint,
                "STAT",
                raw.trim_end(),
            )),
        }
    }

    fn can_quit(&self) -> bool {
        self.conn.is_some() && !self.busy
    }

    async fn quit(&mut self) -> Result<String, Failure> {
        let (_, raw) = if self.quit_sent {
            self.busy = true;
            self.pending = Some("QUIT".into());
            self.read_reply(Step::Logout, "QUIT").await?
        } else {
            self.command(Step::Logout, "QUIT", b"QUIT").await?
        };
        self.conn = None;
        Ok(raw)
    }

    fn pending(&self) -> Option<String> {
        self.pending.clone()
    }

    fn recent(&self) -> Vec<String> {
        self.recent_lines()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies() {
        assert_eq!(
            parse_reply(b"+OK Dovecot ready."),
            Some(Reply::Ok("Dovecot ready.".into()))
        );
        assert_eq!(parse_reply(b"+OK"), Some(Reply::Ok(String::new())));
        assert_eq!(
            parse_reply(b"-ERR [AUTH] Authentication failed."),
            Some(Reply::Err("[AUTH] Authentication failed.".into()))
        );
        assert_eq!(parse_reply(b"+ "), Some(Reply::Continue(String::new())));
        assert_eq!(parse_reply(b"+"), Some(Reply::Continue(String::new())));
        assert_eq!(parse_reply(b"+ eyJ9"), Some(Reply::Continue("eyJ9".into())));
        assert_eq!(parse_reply(b"+OKAY"), None);
        assert_eq!(parse_reply(b"* OK IMAP ready"), None);
        assert_eq!(parse_reply(b"\xff\x00garbage"), None);
    }

    #[test]
    fn dot_unstuffing() {
        assert_eq!(unstuff(b"."), None);
        assert_eq!(unstuff(b".."), Some(&b"."[..]));
        assert_eq!(unstuff(b"..hidden"), Some(&b".hidden"[..]));
        assert_eq!(unstuff(b"USER"), Some(&b"USER"[..]));
        assert_eq!(unstuff(b""), Some(&b""[..]));
    }

    /// The fuzz runs' slowest inputs were long lines sent in small pieces: the reader looked
    /// through the whole buffer again after every piece. Now each byte is looked at once.
    #[tokio::test]
    async fn a_long_line_in_one_byte_pieces() {
        use tokio::io::AsyncWriteExt as _;
        let (client, mut server) = tokio::io::duplex(1);
        let long = vec![b'x'; MAX_LINE - 2];
        let mut sent = long.clone();
        sent.extend_from_slice(b"\r\n+OK\r\n");
        tokio::spawn(async move { server.write_all(&sent).await });
        let mut lines = Lines::new(Wire::memory(client, Meter::new(Limits::for_pop3())));
        assert_eq!(lines.read_line().await.unwrap(), long);
        assert_eq!(lines.read_line().await.unwrap(), b"+OK");
        assert!(lines.buf.is_empty());
        assert_eq!(line_end(b"ab\ncd\n", 0), Some(2));
        assert_eq!(line_end(b"ab\ncd\n", 3), Some(5));
        assert_eq!(line_end(b"ab", 2), None);
    }

    #[test]
    fn stat_and_capabilities() {
        assert_eq!(parse_stat("2 320"), Some((2, 320)));
        assert_eq!(parse_stat("2"), None);
        assert_eq!(parse_stat("x 1"), None);
        let caps: Vec<String> = ["TOP", "USER", "SASL PLAIN login", "STLS"]
            .map(String::from)
            .to_vec();
        assert_eq!(sasl_mechanisms(&caps), ["PLAIN", "LOGIN"]);
        assert!(has_capability(&caps, "stls"));
        assert!(!has_capability(&caps, "UIDL"));
    }
}
