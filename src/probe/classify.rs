//! From what happened to a Ready reason and a message people can act on. Pure functions:
//! no I/O, so every message is unit-tested.
//!
//! Messages say what was expected, what the server said (quoted, cut to a readable
//! length) and what to do; they never contain a secret, because nothing here ever sees one.

use std::io;
use std::time::Duration;

use super::stream::limit_exceeded;
use super::{Failure, Step};
use crate::api::{Protocol, Reason, TlsMode};

/// Longest server text quoted in a message (characters).
const QUOTE_MAX: usize = 200;

/// `host:port`, with brackets around an IPv6 literal.
pub(crate) fn endpoint(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// A duration for people: "5s", "1.5s", "250ms".
pub(crate) fn human(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        let secs = d.as_secs_f64();
        let text = format!("{secs:.2}");
        let text = text.trim_end_matches('0').trim_end_matches('.');
        format!("{text}s")
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// "within 5s", or, when earlier steps used part of the budget, "within 3.2s (what was
/// left of the 5s timeout)".
pub(crate) fn within(waited: Duration, total: Duration) -> String {
    if waited.as_secs_f64() >= total.as_secs_f64() * 0.9 {
        format!("within {}", human(total))
    } else {
        format!(
            "within {} (what was left of the {} timeout)",
            human(waited),
            human(total)
        )
    }
}

/// Server text in double quotes, control characters escaped, cut to a readable length.
pub(crate) fn quote(text: &str) -> String {
    let text = text.trim_end_matches(['\r', '\n']);
    format!("{:?}", cut(text, QUOTE_MAX))
}

/// `text` cut to `max` characters, `…` marking a cut.
pub(crate) fn cut(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        None => text.to_string(),
        Some((at, _)) => format!("{}…", &text[..at]),
    }
}

/// Server text shown without quotes (a greeting, a capability, a step's detail), with
/// control characters escaped as `\u{1b}` so that a server cannot put raw ones into a
/// status, an Event or a terminal. Idempotent: escaped text has none left.
pub(crate) fn printable(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Raw server bytes, quoted like [`quote`].
pub(crate) fn quote_bytes(bytes: &[u8]) -> String {
    quote(&String::from_utf8_lossy(bytes))
}

/// The text of a tagged IMAP reply among `lines` (the last line whose first word is neither
/// `*` nor `+`), without its tag: `NO [AUTHENTICATIONFAILED] Authentication failed.`
pub(crate) fn tagged_reply(lines: &[String]) -> Option<String> {
    lines.iter().rev().find_map(|line| {
        let (tag, rest) = line.split_once(' ')?;
        if tag == "*" || tag.starts_with('+') || tag.is_empty() {
            return None;
        }
        let word = rest.split(' ').next().unwrap_or("");
        ["OK", "NO", "BAD"]
            .iter()
            .any(|s| word.eq_ignore_ascii_case(s))
            .then(|| rest.to_string())
    })
}

/// The text of the tagged IMAP reply to `tag` among `lines`, without its tag (with
/// commands in flight together, the last tagged line may answer another).
pub(crate) fn tagged_reply_to(lines: &[String], tag: &str) -> Option<String> {
    lines.iter().find_map(|line| {
        let (t, rest) = line.split_once(' ')?;
        (t == tag).then(|| rest.to_string())
    })
}

/// What a server's refusal of a login says, by its response code (POP3: RFC 2449 and
/// 3206; IMAP: RFC 5530). Most refusals are the credentials; these are not, and a user
/// told "wrong password" would change a password that works.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// Wrong credentials, or an account the server will not let in.
    Credentials,
    /// POP3 `[IN-USE]`: logged in, but another session holds the maildrop.
    MailboxInUse,
    /// The server's own failure, or a login too soon after the last; what it means.
    ServerSide(&'static str),
    /// IMAP `[PRIVACYREQUIRED]`: no login over a connection without TLS.
    PrivacyRequired,
}

/// Reads the response code of a refusal: `-ERR [SYS/TEMP] ...`, `NO [UNAVAILABLE] ...`.
fn refusal(reply: &str) -> Refusal {
    let code = reply
        .split_once(' ')
        .and_then(|(_, rest)| rest.strip_prefix('['))
        .and_then(|rest| rest.split_once(']'))
        .map(|(code, _)| {
            code.split_whitespace()
                .next()
                .unwrap_or("")
                .to_ascii_uppercase()
        });
    match code.as_deref() {
        Some("IN-USE") => Refusal::MailboxInUse,
        Some("SYS/TEMP") | Some("UNAVAILABLE") => {
            Refusal::ServerSide("the server reports a temporary failure on its side")
        }
        Some("SYS/PERM") => Refusal::ServerSide(
            "the server refuses on its side, for good (it will not clear by itself: act on its message)",
        ),
        Some("SERVERBUG") => Refusal::ServerSide("the server reports a failure on its side"),
        Some("PRIVACYREQUIRED") => Refusal::PrivacyRequired,
        Some("LOGIN-DELAY") => Refusal::ServerSide(
            "the server refuses a login this soon after the previous one (a spec.check.interval longer than its delay avoids this)",
        ),
        Some("LIMIT") => Refusal::ServerSide(TOO_MANY_SESSIONS),
        Some("AUTHENTICATIONFAILED") | Some("AUTH") => Refusal::Credentials,
        // Gmail's daily IMAP bandwidth and command limits: "NO [OVERQUOTA] Account
        // exceeded command or bandwidth limits. (Failure)".
        Some("OVERQUOTA") => Refusal::ServerSide(
            "the account is over a limit of the server's (Gmail says so of its daily IMAP bandwidth and command limits), which clears by itself",
        ),
        _ => refusal_in_words(&reply.to_ascii_lowercase()),
    }
}

/// What a refusal without a code says in words that servers are known to use: Gmail
/// caps an account's sessions ("Too many simultaneous connections. (Failure)"), and
/// Microsoft Exchange, which sends no codes at all, throttles a busy mailbox ("BAD
/// Request is throttled. Suggested Backoff Time: 89117 milliseconds", at any command)
/// and fails on its side ("-ERR Server Unavailable. 21" after PASS).
fn refusal_in_words(reply: &str) -> Refusal {
    if reply.contains("too many simultaneous connections") || reply.contains("too many connections")
    {
        Refusal::ServerSide(TOO_MANY_SESSIONS)
    } else if reply.contains("request is throttled") {
        Refusal::ServerSide(
            "the server is throttling this mailbox (Microsoft 365 does when other clients use it heavily), which clears by itself",
        )
    } else if reply.contains("server unavailable") {
        Refusal::ServerSide(
            "the server reports a failure on its side (Exchange says so too when POP or IMAP is turned off for the mailbox, or the mailbox has no licence or, for an app, no permission on it: those do not clear by themselves)",
        )
    } else {
        Refusal::Credentials
    }
}

const TOO_MANY_SESSIONS: &str = "the account has as many sessions open as the server allows (other clients of this mailbox hold them), and it takes no more until some close";

/// The failure a refused login (`reply`, the server's line) stands for when its code
/// says it is not the credentials; `None` when it is (the caller says so its own way).
pub(crate) fn refused_login(
    protocol: Protocol,
    endpoint: &str,
    command: &str,
    reply: &str,
) -> Option<Failure> {
    let said = quote(reply);
    let protocol = protocol.as_str();
    match refusal(reply) {
        Refusal::Credentials => None,
        Refusal::MailboxInUse => Some(Failure::new(
            Reason::MailboxUnavailable,
            Step::Mailbox,
            format!(
                "{protocol} server {endpoint} accepted the login ({command}), but another session holds the mailbox: {said}"
            ),
        )),
        Refusal::ServerSide(what) => Some(Failure::new(
            Reason::ServerUnavailable,
            Step::Authenticate,
            format!(
                "{protocol} {command} refused by {endpoint}: {what}, not a wrong login: {said}"
            ),
        )),
        Refusal::PrivacyRequired => Some(Failure::new(
            Reason::AuthMechanismUnsupported,
            Step::Authenticate,
            format!(
                "{protocol} server {endpoint} takes no login over a connection it does not consider encrypted: {said}; set spec.tls.mode to StartTLS or Implicit (if TLS is on already, a proxy in between may speak plaintext to the server)"
            ),
        )),
    }
}

/// The failure a refusal of `command` (POP3 `AUTH PLAIN`, `reply` the server's line)
/// stands for when it came before any credential was sent and its code or words say the
/// server is unavailable or the mailbox in use (RFC 2449, 3206): not the mechanism, nor
/// the login, which was never tried. `None` when it refuses the mechanism (the caller says
/// so its own way, and may try another form).
pub(crate) fn refused_before_credentials(
    protocol: Protocol,
    endpoint: &str,
    command: &str,
    reply: &str,
) -> Option<Failure> {
    let said = quote(reply);
    let name = protocol.as_str();
    match refusal(reply) {
        Refusal::Credentials => None,
        Refusal::MailboxInUse => Some(Failure::new(
            Reason::MailboxUnavailable,
            Step::Authenticate,
            format!(
                "{name} server {endpoint} refused {command} before any credential was sent: another session holds the mailbox: {said}"
            ),
        )),
        Refusal::ServerSide(what) => Some(Failure::new(
            Reason::ServerUnavailable,
            Step::Authenticate,
            format!(
                "{name} server {endpoint} refused {command} before any credential was sent: {what}, not the mechanism or the login: {said}"
            ),
        )),
        // The same words as after the credentials: no login without TLS.
        Refusal::PrivacyRequired => refused_login(protocol, endpoint, command, reply),
    }
}

/// The hint for a refused password login on Microsoft Exchange that offers OAuth2:
/// Microsoft 365 refuses every password over IMAP and POP3 (basic authentication is
/// off), in the words of a wrong one. Other servers offering OAuth2 (Gmail, Dovecot) take
/// passwords, so a refusal there is the password.
pub(crate) fn oauth2_hint(greeting: &str, capabilities: &[String]) -> &'static str {
    let exchange = greeting.to_ascii_lowercase().contains("microsoft exchange");
    let offers = capabilities.iter().any(|c| {
        let c = c.to_ascii_uppercase();
        c.contains("XOAUTH2") || c.contains("OAUTHBEARER")
    });
    if exchange && offers {
        " (Microsoft 365 refuses every password over IMAP and POP3, in these words: if the password is right, use authentication.method OAuth2, see docs/oauth2.md)"
    } else {
        ""
    }
}

/// The hint for a refused OAuth2 login on Microsoft Exchange, which says only
/// "AUTHENTICATE failed." (no error challenge, unlike Gmail) whatever the cause.
pub(crate) fn exchange_oauth2_hint(greeting: &str) -> &'static str {
    if greeting.to_ascii_lowercase().contains("microsoft exchange") {
        " (Exchange Online refuses an OAuth2 login in these words when the token is for \
         another audience than https://outlook.office.com (a Graph scope, say), when \
         authentication.username is neither the signed-in user nor a mailbox it has \
         FullAccess to, when IMAP or POP is turned off for the mailbox, or, with \
         ClientCredentials, when the app's service principal has no access to the mailbox in \
         Exchange; see docs/oauth2.md)"
    } else {
        ""
    }
}

/// A refused STATUS or STAT (`reply`: the server's line). Its code may say the server
/// failed on its side; Microsoft 365's "User is authenticated but not connected" means the
/// login was taken but opens no mailbox; an IMAP `BAD` is a command the server did not
/// understand; anything else is the mailbox.
pub(crate) fn refused_mailbox(
    protocol: Protocol,
    endpoint: &str,
    command: &str,
    reply: &str,
) -> Failure {
    let said = quote(reply);
    let name = protocol.as_str();
    if reply
        .to_ascii_lowercase()
        .contains("authenticated but not connected")
    {
        return Failure::new(
            Reason::AuthenticationFailed,
            Step::Mailbox,
            format!(
                "{name} server {endpoint} took the login but opens no mailbox with it ({command}: {said}): Microsoft 365 answers so when the mailbox is not the signed-in account's (check spec.authentication.username) or an app-only (ClientCredentials) app has no access to it (Add-MailboxPermission, see docs/oauth2.md)"
            ),
        );
    }
    match refusal(reply) {
        Refusal::ServerSide(what) => Failure::new(
            Reason::ServerUnavailable,
            Step::Mailbox,
            format!("{name} server {endpoint} refused {command}: {what}: {said}"),
        ),
        _ if protocol == Protocol::Imap
            && reply
                .split(' ')
                .next()
                .is_some_and(|w| w.eq_ignore_ascii_case("BAD")) =>
        {
            Failure::new(
                Reason::ProtocolError,
                Step::Mailbox,
                format!("{name} server {endpoint} did not understand {command}: {said}"),
            )
        }
        _ => Failure::new(
            Reason::MailboxUnavailable,
            Step::Mailbox,
            format!("{name} server {endpoint} refused {command}: {said}"),
        ),
    }
}

/// A greeting that refuses the session (IMAP `* BYE`, POP3 `-ERR`): the server is busy,
/// limiting connections or broken, unless the line is another protocol's.
pub(crate) fn refused_session(protocol: Protocol, endpoint: &str, line: &str) -> Failure {
    if other_protocol_hint(protocol, line.as_bytes()).is_some() {
        return unexpected_greeting(protocol, endpoint, line.as_bytes());
    }
    Failure::new(
        Reason::ServerUnavailable,
        Step::Greeting,
        format!(
            "{} server {endpoint} refused the session: {}",
            protocol.as_str(),
            quote(line)
        ),
    )
}

/// What else the first line a server sent suggests it is, as a hint for people.
pub(crate) fn other_protocol_hint(expected: Protocol, first_line: &[u8]) -> Option<&'static str> {
    let starts =
        |p: &[u8]| first_line.len() >= p.len() && first_line[..p.len()].eq_ignore_ascii_case(p);
    if first_line.len() >= 2 && (0x14..=0x18).contains(&first_line[0]) && first_line[1] == 0x03 {
        return Some("the server speaks TLS from the first byte: set tls.mode Implicit");
    }
    match expected {
        Protocol::Imap if starts(b"+OK") || starts(b"-ERR") => Some("is this a POP3 port?"),
        Protocol::Pop3 if starts(b"* OK") || starts(b"* PREAUTH") || starts(b"* BYE") => {
            Some("is this an IMAP port?")
        }
        _ if starts(b"220 ") || starts(b"220-") || starts(b"554 ") => Some("is this an SMTP port?"),
        _ if starts(b"HTTP/") => Some("is this an HTTP port?"),
        _ if starts(b"SSH-") => Some("is this an SSH port?"),
        _ => None,
    }
}

/// The server's first line is not the greeting the protocol starts with.
pub(crate) fn unexpected_greeting(protocol: Protocol, endpoint: &str, line: &[u8]) -> Failure {
    let article = match protocol {
        Protocol::Imap => "an IMAP",
        Protocol::Pop3 => "a POP3",
    };
    let mut message = format!(
        "expected {article} greeting from {endpoint}, got {}",
        quote_bytes(line)
    );
    if let Some(hint) = other_protocol_hint(protocol, line) {
        message.push_str(&format!(" ({hint})"));
    }
    Failure::new(Reason::ProtocolError, Step::Greeting, message)
}

/// The greeting did not arrive in time.
pub(crate) fn greeting_timeout(
    protocol: Protocol,
    mode: TlsMode,
    endpoint: &str,
    waited: Duration,
    total: Duration,
    recent: &[String],
) -> Failure {
    let within = within(waited, total);
    match recent.first() {
        None => {
            let mut message = format!("no greeting from {endpoint} {within}");
            if mode != TlsMode::Implicit {
                message.push_str(
                    "; the server sent nothing (a port that expects TLS from the first byte, \
                     such as 993, 995 or IMAP's legacy 585, stays silent like this: try tls.mode \
                     Implicit)",
                );
            }
            Failure::new(Reason::Timeout, Step::Greeting, message)
        }
        Some(first) => {
            if other_protocol_hint(protocol, first.as_bytes()).is_some() {
                return unexpected_greeting(protocol, endpoint, first.as_bytes());
            }
            Failure::new(
                Reason::Timeout,
                Step::Greeting,
                format!(
                    "no complete {} greeting from {endpoint} {within}; it sent {}",
                    protocol.as_str(),
                    quote(first)
                ),
            )
        }
    }
}

/// A step other than the greeting ran out of time.
pub(crate) fn timeout_failure(
    step: Step,
    endpoint: &str,
    pending: Option<String>,
    waited: Duration,
    total: Duration,
    recent: &[String],
) -> Failure {
    let within = within(waited, total);
    let mut message = match (step, pending) {
        (Step::Resolve, _) => format!("resolving the host of {endpoint} did not finish {within}"),
        (Step::Connect, _) => format!("no TCP connection to {endpoint} {within}"),
        (Step::TlsHandshake, _) => format!("TLS handshake with {endpoint} did not finish {within}"),
        (_, Some(command)) => format!("no answer to {command} from {endpoint} {within}"),
        (step, None) => format!("the {step} step with {endpoint} did not finish {within}"),
    };
    if let Some(last) = recent.last() {
        message.push_str(&format!("; it last sent {}", quote(last)));
    }
    Failure::new(Reason::Timeout, step, message)
}

/// The command that turns a protocol's plaintext session into TLS, and its usual
/// implicit-TLS port.
pub(crate) fn starttls_of(protocol: Protocol) -> (&'static str, u16) {
    match protocol {
        Protocol::Imap => ("STARTTLS", 993),
        Protocol::Pop3 => ("STLS", 995),
    }
}

/// STARTTLS was asked for, but the server does not advertise it.
pub(crate) fn starttls_not_offered(protocol: Protocol, endpoint: &str, caps: &[String]) -> Failure {
    let (command, port) = starttls_of(protocol);
    let listed = if caps.is_empty() {
        "it lists no capabilities".to_string()
    } else {
        format!("capabilities: {}", caps.join(" "))
    };
    Failure::new(
        Reason::StartTlsUnavailable,
        Step::StartTls,
        format!(
            "{} server {endpoint} does not offer {command} ({listed}); no credentials were \
             sent. Use tls.mode Implicit on the TLS port (usually {port})",
            protocol.as_str()
        ),
    )
}

/// An I/O error in the middle of a session: a broken bound, a closed connection, a TLS
/// error after the handshake, or anything else.
pub(crate) fn io_failure(
    protocol: Protocol,
    step: Step,
    endpoint: &str,
    err: &io::Error,
    recent: &[String],
) -> Failure {
    if let Some(limit) = limit_exceeded(err) {
        return Failure::new(
            Reason::ProtocolError,
            step,
            format!("server {endpoint} sent {limit} at the {step} step"),
        );
    }
    if let Some(tls) = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        return Failure::new(
            Reason::ProtocolError,
            step,
            format!("TLS error with {endpoint} at the {step} step: {tls}"),
        );
    }
    match err.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => connection_closed(step, endpoint, recent),
        _ => {
            let mut text = err.to_string();
            if text.len() > QUOTE_MAX {
                text = text.chars().take(QUOTE_MAX).collect::<String>() + "…";
            }
            let mut message = format!(
                "{} session with {endpoint} failed at the {step} step: {text}",
                protocol.as_str()
            );
            if let Some(last) = recent.last() {
                message.push_str(&format!(" (it last sent {})", quote(last)));
            }
            Failure::new(Reason::ProtocolError, step, message)
        }
    }
}

/// The server closed the connection when an answer was due. After an IMAP `* BYE` it
/// said why: a server giving up (storage failing, overload), not another protocol.
pub(crate) fn connection_closed(step: Step, endpoint: &str, recent: &[String]) -> Failure {
    if let Some(last) = recent.last()
        && last
            .get(..5)
            .is_some_and(|start| start.eq_ignore_ascii_case("* BYE"))
        && step != Step::Logout
    {
        return Failure::new(
            Reason::ServerUnavailable,
            step,
            format!(
                "{endpoint} ended the session at the {step} step: {}",
                quote(last)
            ),
        );
    }
    let message = match recent.last() {
        Some(last) => format!(
            "{endpoint} closed the connection at the {step} step after saying {}",
            quote(last)
        ),
        None if step == Step::Greeting => {
            format!("{endpoint} closed the connection without sending a greeting")
        }
        None => format!("{endpoint} closed the connection at the {step} step"),
    };
    Failure::new(Reason::ProtocolError, step, message)
}

/// The Ready reason for a failed TCP connect.
pub(crate) fn connect_reason(err: &io::Error) -> Reason {
    match err.kind() {
        io::ErrorKind::ConnectionRefused => Reason::ConnectionRefused,
        io::ErrorKind::TimedOut => Reason::ConnectionTimedOut,
        io::ErrorKind::NetworkUnreachable | io::ErrorKind::HostUnreachable => {
            Reason::NetworkUnreachable
        }
        // Anything else (host down, network down, a local firewall's EPERM): the packets
        // do not get there.
        _ => Reason::NetworkUnreachable,
    }
}

/// How one connection attempt ended, in words.
pub(crate) fn connect_error_words(err: &io::Error) -> String {
    match err.kind() {
        io::ErrorKind::ConnectionRefused => "refused (nothing listens on that port)".into(),
        io::ErrorKind::TimedOut => "timed out".into(),
        io::ErrorKind::NetworkUnreachable => "network unreachable (no route)".into(),
        io::ErrorKind::HostUnreachable => "host unreachable".into(),
        _ => err.to_string(),
    }
}

/// Which attempt decides the reason when several addresses failed: a refusal proves the
/// host answered, so it says the most; then a timeout; then unreachability.
pub(crate) fn connect_priority(reason: Reason) -> u8 {
    match reason {
        Reason::ConnectionRefused => 3,
        Reason::ConnectionTimedOut => 2,
        _ => 1,
    }
}

/// A name that could not be resolved. `err` is the resolver's error.
pub(crate) fn resolve_failure(host: &str, err: &io::Error) -> Failure {
    let text = err.to_string();
    let text = text
        .strip_prefix("failed to lookup address information: ")
        .unwrap_or(&text);
    Failure::new(
        Reason::DnsResolutionFailed,
        Step::Resolve,
        format!("could not resolve {host}: {text}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_is_the_credentials_unless_its_code_says_otherwise() {
        for (reply, expected) in [
            ("-ERR [AUTH] Authentication failed.", Refusal::Credentials),
            ("-ERR Authentication failed.", Refusal::Credentials),
            (
                "NO [AUTHENTICATIONFAILED] Authentication failed.",
                Refusal::Credentials,
            ),
            ("NO [CONTACTADMIN] Login disabled", Refusal::Credentials),
            (
                "-ERR [IN-USE] Mailbox is locked by another POP3 session.",
                Refusal::MailboxInUse,
            ),
            ("-ERR [in-use] locked", Refusal::MailboxInUse),
            ("NO [ALERT] [UNAVAILABLE] not first", Refusal::Credentials),
            ("-ERR", Refusal::Credentials),
            ("-ERR [", Refusal::Credentials),
        ] {
            assert_eq!(refusal(reply), expected, "{reply}");
        }
        for reply in [
            "-ERR [SYS/TEMP] Temporary authentication failure. [vm:2026-11-29 23:55:34]",
            "-ERR [SYS/PERM] Storage gone",
            "-ERR [LOGIN-DELAY] Wait 900 seconds",
            "NO [UNAVAILABLE] Temporary authentication failure.",
            "NO [SERVERBUG] Internal error",
            "NO [LIMIT] Too many open sessions",
            // Gmail's, past 15 sessions of one account: no code of its own.
            "NO [ALERT] Too many simultaneous connections. (Failure)",
            "-ERR too many connections from this account",
            // Gmail's daily limits, Microsoft 365 throttling a busy mailbox (BAD or NO,
            // at any command) and Exchange POP3 failing on its side after PASS.
            "NO [OVERQUOTA] Account exceeded command or bandwidth limits. (Failure)",
            "BAD Request is throttled. Suggested Backoff Time: 89117 milliseconds",
            "NO Request is throttled. Suggested Backoff Time: 299910 milliseconds",
            "-ERR Server Unavailable. 21",
        ] {
            assert!(matches!(refusal(reply), Refusal::ServerSide(_)), "{reply}");
        }
        // A code that says "the credentials" is taken over the words.
        for reply in [
            "NO [AUTHENTICATIONFAILED] too many connections? no: wrong password",
            "-ERR [AUTH] server unavailable to you with this password",
        ] {
            assert_eq!(refusal(reply), Refusal::Credentials, "{reply}");
        }
    }
    use crate::probe::stream::LimitExceeded;

    #[test]
    fn endpoints_bracket_ipv6() {
        assert_eq!(endpoint("mail.example.com", 993), "mail.example.com:993");
        assert_eq!(endpoint("::1", 143), "[::1]:143");
    }

    #[test]
    fn human_durations() {
        assert_eq!(human(Duration::from_secs(5)), "5s");
        assert_eq!(human(Duration::from_millis(1500)), "1.5s");
        assert_eq!(human(Duration::from_millis(4950)), "4.95s");
        assert_eq!(human(Duration::from_millis(250)), "250ms");
        assert_eq!(
            within(Duration::from_secs(5), Duration::from_secs(5)),
            "within 5s"
        );
        assert_eq!(
            within(Duration::from_secs(2), Duration::from_secs(5)),
            "within 2s (what was left of the 5s timeout)"
        );
    }

    #[test]
    fn quotes_are_escaped_and_cut() {
        assert_eq!(quote("+OK ready\r\n"), "\"+OK ready\"");
        assert_eq!(quote_bytes(b"\x01\xffx"), "\"\\u{1}\u{fffd}x\"");
        let long = "x".repeat(1000);
        let q = quote(&long);
        assert!(q.len() < 220 * 3, "{}", q.len());
        assert!(q.ends_with("…\""));
    }

    #[test]
    fn printable_escapes_control_characters_once() {
        assert_eq!(printable("+OK Dovecot ready."), "+OK Dovecot ready.");
        let shown = printable("SASL PLAIN\u{1f}LOGIN \u{1b}[31mred\tend\u{85}");
        assert_eq!(shown, "SASL PLAIN\\u{1f}LOGIN \\u{1b}[31mred\\tend\\u{85}");
        assert_eq!(printable(&shown), shown);
    }

    #[test]
    fn finds_tagged_replies() {
        let lines: Vec<String> = [
            "* CAPABILITY IMAP4rev1",
            "A0002 NO [AUTHENTICATIONFAILED] Authentication failed.",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            tagged_reply(&lines).as_deref(),
            Some("NO [AUTHENTICATIONFAILED] Authentication failed.")
        );
        let lines = vec!["* BYE bye".to_string(), "+ go on".to_string()];
        assert_eq!(tagged_reply(&lines), None);
    }

    #[test]
    fn greeting_of_the_wrong_protocol_says_so() {
        let f = unexpected_greeting(Protocol::Imap, "127.0.0.1:1234", b"+OK Dovecot ready.");
        assert_eq!(f.reason, Reason::ProtocolError);
        assert_eq!(
            f.message,
            "expected an IMAP greeting from 127.0.0.1:1234, got \"+OK Dovecot ready.\" (is this a POP3 port?)"
        );
        let f = unexpected_greeting(
            Protocol::Pop3,
            "h:110",
            b"* OK [CAPABILITY IMAP4rev1] ready",
        );
        assert!(
            f.message.ends_with("(is this an IMAP port?)"),
            "{}",
            f.message
        );
        let f = unexpected_greeting(Protocol::Pop3, "h:25", b"220 mx ESMTP");
        assert!(
            f.message.ends_with("(is this an SMTP port?)"),
            "{}",
            f.message
        );
    }

    #[test]
    fn greeting_timeouts_explain() {
        let f = greeting_timeout(
            Protocol::Imap,
            TlsMode::None,
            "127.0.0.1:993",
            Duration::from_secs(5),
            Duration::from_secs(5),
            &[],
        );
        assert_eq!(f.reason, Reason::Timeout);
        assert!(
            f.message
                .starts_with("no greeting from 127.0.0.1:993 within 5s; the server sent nothing")
        );
        assert!(f.message.contains("tls.mode Implicit"));
        let f = greeting_timeout(
            Protocol::Imap,
            TlsMode::Implicit,
            "h:1",
            Duration::from_secs(5),
            Duration::from_secs(5),
            &["+OK hi".into()],
        );
        assert_eq!(f.reason, Reason::ProtocolError);
        let f = greeting_timeout(
            Protocol::Imap,
            TlsMode::Implicit,
            "h:1",
            Duration::from_secs(5),
            Duration::from_secs(5),
            &["garbage".into()],
        );
        assert_eq!(f.reason, Reason::Timeout);
        assert_eq!(
            f.message,
            "no complete IMAP greeting from h:1 within 5s; it sent \"garbage\""
        );
    }

    #[test]
    fn io_errors_are_classified() {
        let limit = io::Error::other(LimitExceeded::Line { limit: 65536 });
        let f = io_failure(
            Protocol::Imap,
            Step::Greeting,
            "127.0.0.1:1234",
            &limit,
            &[],
        );
        assert_eq!(f.reason, Reason::ProtocolError);
        assert_eq!(
            f.message,
            "server 127.0.0.1:1234 sent a line longer than 65536 bytes at the greeting step"
        );
        let eof = io::Error::new(io::ErrorKind::UnexpectedEof, "eof");
        let f = io_failure(
            Protocol::Pop3,
            Step::Authenticate,
            "h:110",
            &eof,
            &["-ERR bye".into()],
        );
        assert_eq!(
            f.message,
            "h:110 closed the connection at the authenticate step after saying \"-ERR bye\""
        );
        let tls = io::Error::new(io::ErrorKind::InvalidData, rustls::Error::DecryptError);
        let f = io_failure(Protocol::Imap, Step::Mailbox, "h:993", &tls, &[]);
        assert_eq!(f.reason, Reason::ProtocolError);
        assert!(
            f.message
                .starts_with("TLS error with h:993 at the mailbox step"),
            "{}",
            f.message
        );
    }

    #[test]
    fn connect_errors_map_to_reasons() {
        let e = |k| io::Error::from(k);
        assert_eq!(
            connect_reason(&e(io::ErrorKind::ConnectionRefused)),
            Reason::ConnectionRefused
        );
        assert_eq!(
            connect_reason(&e(io::ErrorKind::TimedOut)),
            Reason::ConnectionTimedOut
        );
        assert_eq!(
            connect_reason(&e(io::ErrorKind::NetworkUnreachable)),
            Reason::NetworkUnreachable
        );
        assert_eq!(
            connect_reason(&e(io::ErrorKind::HostUnreachable)),
            Reason::NetworkUnreachable
        );
        assert_eq!(
            connect_reason(&io::Error::from_raw_os_error(111)),
            Reason::ConnectionRefused
        );
        assert_eq!(
            connect_reason(&io::Error::from_raw_os_error(101)),
            Reason::NetworkUnreachable
        );
        assert_eq!(
            connect_reason(&io::Error::from_raw_os_error(113)),
            Reason::NetworkUnreachable
        );
        assert_eq!(
            connect_reason(&io::Error::from_raw_os_error(110)),
            Reason::ConnectionTimedOut
        );
        assert!(
            connect_priority(Reason::ConnectionRefused)
                > connect_priority(Reason::NetworkUnreachable)
        );
    }

    #[test]
    fn dns_failures_name_the_host() {
        let err =
            io::Error::other("failed to lookup address information: Name or service not known");
        let f = resolve_failure("mail.invalid", &err);
        assert_eq!(f.reason, Reason::DnsResolutionFailed);
        assert_eq!(
            f.message,
            "could not resolve mail.invalid: Name or service not known"
        );
    }

    #[test]
    fn starttls_missing() {
        let f = starttls_not_offered(Protocol::Pop3, "h:110", &["USER".into(), "TOP".into()]);
        assert_eq!(f.reason, Reason::StartTlsUnavailable);
        assert_eq!(
            f.message,
            "POP3 server h:110 does not offer STLS (capabilities: USER TOP); no credentials were sent. Use tls.mode Implicit on the TLS port (usually 995)"
        );
    }
}
