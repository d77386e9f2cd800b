//! Entry points for the fuzz targets in `fuzz/` (a separate crate, see `scripts/fuzz`).
//! Each plays a server whose bytes come from the fuzzer and hands back what mailroom made
//! of them, so the target can check what a user relies on: no panic, no more memory than
//! the bounds allow, and either a parsed answer or a classified [`Failure`]. Not part of
//! mailroom's API.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use super::pop3::Lines;
use super::session::MailSession;
use super::stream::{LimitExceeded, Limits, Meter, Wire, limit_exceeded};
use super::{Failure, Login, Recorder, Report, Step, Target, Trust};
use super::{classify, imap, pop3, sasl, talk};
use crate::api::{Protocol, TlsMode};

/// Longest line the server may send (bytes, including CRLF).
pub const MAX_LINE: usize = super::stream::MAX_LINE;
/// Most bytes one test may read from the server.
pub const MAX_TOTAL: u64 = super::stream::MAX_TOTAL;

/// The host and port named in messages.
pub const HOST: &str = "fuzz.invalid";
pub const PORT: u16 = 1;

/// Runs a test from the greeting on (capabilities, STARTTLS, authentication, the mailbox,
/// logout) against `server`, the way [`run`](super::run) does once connected. A STARTTLS the
/// server agrees to ends in a failure: the in-memory server has no TLS.
pub async fn session(
    protocol: Protocol,
    tls_mode: TlsMode,
    login: &Login,
    server: impl AsyncRead + AsyncWrite + Send + Unpin + 'static,
) -> Report {
    let target = Target {
        host: HOST.into(),
        port: PORT,
        protocol,
        tls_mode,
        trust: Trust::default(),
        mailbox: "INBOX".into(),
        timeout: Duration::from_secs(30),
    };
    let endpoint = classify::endpoint(HOST, PORT);
    let mut rec = Recorder::start(&target);
    let redactor = super::redact::Redactor::of(login, &endpoint);
    let result = match protocol {
        Protocol::Imap => {
            let meter = Meter::new(imap::Imap::limits()).redacting(redactor);
            let wire = Wire::memory(server, meter);
            talk::<imap::Imap>(wire, &target, login, &endpoint, &mut rec).await
        }
        Protocol::Pop3 => {
            let meter = Meter::new(pop3::Pop3::limits()).redacting(redactor);
            let wire = Wire::memory(server, meter);
            talk::<pop3::Pop3>(wire, &target, login, &endpoint, &mut rec).await
        }
    };
    rec.into_report(result)
}

/// How reading lines ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LineEnd {
    /// The server closed the connection.
    Closed,
    /// A line longer than [`MAX_LINE`].
    LineTooLong,
    /// More than [`MAX_TOTAL`] bytes.
    OverBudget,
    /// An IMAP literal larger than what was left of the budget.
    LiteralTooLarge,
    /// Any other I/O error.
    Other(String),
}

/// What the POP3 line reader made of a server's bytes.
#[derive(Debug)]
pub struct LineRead {
    /// How many lines were read.
    pub lines: usize,
    pub end: LineEnd,
    /// How the end would be reported, at the capabilities step.
    pub failure: Failure,
    /// The most the reader held between lines (it may never exceed [`MAX_LINE`]).
    pub most_buffered: usize,
    /// What the meter counted.
    pub bytes_read: u64,
    /// The meter's record of the last lines, for messages.
    pub recent: Vec<String>,
}

/// Reads lines from `server` with the POP3 reader until it stops, under POP3's bounds or,
/// with `imap_bounds`, IMAP's (which also refuse an oversized literal), handing each line
/// (without its line ending) to `each`.
pub async fn read_lines(
    server: impl AsyncRead + AsyncWrite + Send + Unpin + 'static,
    imap_bounds: bool,
    mut each: impl FnMut(Vec<u8>),
) -> LineRead {
    let limits = if imap_bounds {
        Limits::for_imap()
    } else {
        Limits::for_pop3()
    };
    let mut reader = Lines::new(Wire::memory(server, Meter::new(limits)));
    let mut lines = 0;
    let mut most_buffered = 0;
    let err = loop {
        let read = reader.read_line().await;
        most_buffered = most_buffered.max(reader.buf.len());
        match read {
            Ok(line) => {
                // Each line stands for a response here: the bound on lines without one is
                // the session's business.
                reader.wire.response_read();
                lines += 1;
                each(line);
            }
            Err(err) => break err,
        }
    };
    let end = match limit_exceeded(&err) {
        Some(LimitExceeded::Line { .. }) => LineEnd::LineTooLong,
        Some(LimitExceeded::Total { .. }) => LineEnd::OverBudget,
        Some(LimitExceeded::Literal { .. }) => LineEnd::LiteralTooLarge,
        Some(other @ LimitExceeded::ResponseLines { .. }) => LineEnd::Other(other.to_string()),
        None if err.kind() == io::ErrorKind::UnexpectedEof => LineEnd::Closed,
        None => LineEnd::Other(err.to_string()),
    };
    let meter = reader.wire.meter();
    let recent = meter.recent();
    let failure = classify::io_failure(
        Protocol::Pop3,
        Step::Capabilities,
        &classify::endpoint(HOST, PORT),
        &err,
        &recent,
    );
    LineRead {
        lines,
        end,
        failure,
        most_buffered,
        bytes_read: meter.total(),
        recent,
    }
}

/// The SASL mechanisms an exchange can use.
pub const MECHANISMS: [&str; 4] = ["PLAIN", "LOGIN", "XOAUTH2", "OAUTHBEARER"];

/// One client side of a SASL exchange, driven the way POP3 AUTH drives it.
#[derive(Debug)]
pub struct SaslRun {
    /// The raw response to each challenge that decoded, in order (the initial response
    /// first if it was sent with the command). These hold the secret.
    pub responses: Vec<Vec<u8>>,
    /// The index of the first challenge that was not base64 (the exchange stops there:
    /// POP3 reports it as a protocol error).
    pub not_base64: Option<usize>,
    /// What a failure message would append for the challenges after the credentials.
    pub described: Vec<String>,
    /// Those challenges as kept for the message.
    pub later: Vec<String>,
}

/// Answers `challenges` (each the text after `+ `, base64) as `mechanism` (one of
/// [`MECHANISMS`]), starting with the initial response if `inline`.
pub fn sasl_exchange(
    mechanism: &str,
    username: &str,
    secret: &str,
    inline: bool,
    challenges: &[String],
) -> SaslRun {
    let secret = secrecy::SecretString::from(secret);
    let mut exchange = match mechanism {
        "PLAIN" => sasl::Exchange::plain(username, &secret),
        "LOGIN" => sasl::Exchange::login(username, &secret),
        "XOAUTH2" => sasl::Exchange::xoauth2(username, &secret),
        _ => sasl::Exchange::oauthbearer(username, &secret, &classify::endpoint(HOST, PORT)),
    };
    let mut responses = Vec::new();
    if inline && let Some(initial) = exchange.initial_response() {
        responses.push(initial.as_ref().to_vec());
    }
    let mut not_base64 = None;
    for (i, text) in challenges.iter().enumerate() {
        match sasl::decode_challenge(text) {
            Ok(challenge) => {
                let response = exchange.respond(&challenge);
                // What goes on the wire must be base64 of exactly these bytes.
                let encoded = sasl::encode(&response);
                assert_eq!(
                    sasl::decode_challenge(&encoded).ok().as_deref(),
                    Some(response.as_ref())
                );
                responses.push(response.as_ref().to_vec());
            }
            Err(_) => {
                not_base64 = Some(i);
                break;
            }
        }
    }
    let later = exchange.later_challenges().to_vec();
    let described = later.iter().map(|c| sasl::describe_challenge(c)).collect();
    SaslRun {
        responses,
        not_base64,
        described,
        later,
    }
}
