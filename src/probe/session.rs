//! The one vocabulary both protocols speak: the steps of a test, which the IMAP and POP3
//! modules each fill in. `mod.rs` runs them in order and records them.

use secrecy::SecretString;

use super::stream::{Limits, Meter, Tcp, Wire};
use super::{Failure, MailboxInfo};
use crate::api::Protocol;

/// The server's greeting.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Greeting {
    /// The greeting line as sent, without CRLF.
    pub text: String,
    /// IMAP `* PREAUTH`: the connection is already authenticated.
    pub preauth: bool,
    /// IMAP `[CAPABILITY ...]` in the greeting (RFC 3501 7.1): the list a CAPABILITY
    /// command would return, one round trip sooner. Never set for POP3.
    pub capabilities: Option<Vec<String>>,
}

/// How a password is presented. The strongest both sides allow is chosen by
/// [`MailSession::choose_mechanism`]; an OAuth2 access token goes by XOAUTH2 or
/// OAUTHBEARER (chosen in `mod.rs` from what the server advertises).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mechanism {
    /// SASL PLAIN (RFC 4616): IMAP `AUTHENTICATE PLAIN`, POP3 `AUTH PLAIN`.
    SaslPlain,
    /// SASL LOGIN: for servers that offer no PLAIN (Dovecot with `auth_mechanisms =
    /// login` then also refuses IMAP LOGIN and POP3 PASS).
    SaslLogin,
    /// IMAP `LOGIN`.
    ImapLogin,
    /// POP3 `USER` and `PASS`.
    UserPass,
    /// SASL XOAUTH2 with an OAuth2 access token.
    XOAuth2,
    /// SASL OAUTHBEARER (RFC 7628) with an OAuth2 access token.
    OAuthBearer,
}

impl Mechanism {
    /// The name reported in `Findings::mechanism`.
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::SaslPlain => "PLAIN",
            Mechanism::SaslLogin | Mechanism::ImapLogin => "LOGIN",
            Mechanism::UserPass => "USER",
            Mechanism::XOAuth2 => "XOAUTH2",
            Mechanism::OAuthBearer => "OAUTHBEARER",
        }
    }

    /// The command as people know it, for messages.
    pub fn command(self, protocol: Protocol) -> &'static str {
        match (self, protocol) {
            (Mechanism::SaslPlain, Protocol::Imap) => "AUTHENTICATE PLAIN",
            (Mechanism::SaslPlain, Protocol::Pop3) => "AUTH PLAIN",
            (Mechanism::SaslLogin, Protocol::Imap) => "AUTHENTICATE LOGIN",
            (Mechanism::SaslLogin, Protocol::Pop3) => "AUTH LOGIN",
            (Mechanism::ImapLogin, _) => "LOGIN",
            (Mechanism::UserPass, _) => "USER/PASS",
            (Mechanism::XOAuth2, Protocol::Imap) => "AUTHENTICATE XOAUTH2",
            (Mechanism::XOAuth2, Protocol::Pop3) => "AUTH XOAUTH2",
            (Mechanism::OAuthBearer, Protocol::Imap) => "AUTHENTICATE OAUTHBEARER",
            (Mechanism::OAuthBearer, Protocol::Pop3) => "AUTH OAUTHBEARER",
        }
    }
}

/// One mail session, driven step by step. Each method is one step (or part of one); a
/// method that fails returns a classified [`Failure`]. If a method's future is dropped
/// (the deadline passed) the session is left unusable and [`can_quit`](Self::can_quit)
/// says so.
pub(crate) trait MailSession: Send + Sized {
    /// The byte bounds this protocol's reader needs.
    fn limits() -> Limits;

    /// A session over a fresh connection (plaintext, or implicit TLS already done).
    fn open(wire: Wire, endpoint: String) -> Self;

    /// Reads and checks the greeting.
    async fn greeting(&mut self) -> Result<Greeting, Failure>;

    /// IMAP CAPABILITY or POP3 CAPA, in the server's order. A POP3 server without CAPA
    /// yields an empty list.
    async fn capabilities(&mut self) -> Result<Vec<String>, Failure>;

    /// Whether `caps` advertise STARTTLS (IMAP) or STLS (POP3).
    fn offers_starttls(&self, caps: &[String]) -> bool;

    /// Sends STARTTLS/STLS and, once the server agreed, hands back the plaintext
    /// connection for the TLS handshake, with the server's words. The session is closed
    /// until [`resume`](Self::resume).
    async fn start_tls(&mut self) -> Result<(Tcp, Meter, String), Failure>;

    /// Continues over the TLS connection after STARTTLS.
    fn resume(&mut self, wire: Wire);

    /// Whether the connection is encrypted.
    fn is_tls(&self) -> bool;

    /// The strongest mechanism both sides allow, or why there is none: SASL PLAIN, then
    /// SASL LOGIN, then the protocol's own command (IMAP LOGIN, POP3 USER/PASS).
    fn choose_mechanism(&self, caps: &[String]) -> Result<Mechanism, Failure>;

    /// The SASL mechanisms `caps` advertise (IMAP `AUTH=X`, POP3 `SASL X Y`), upper case.
    fn sasl_offered(&self, caps: &[String]) -> Vec<String>;

    /// Logs in; returns the server's words. `secret` is the password, or the access
    /// token for XOAUTH2 and OAUTHBEARER.
    async fn authenticate(
        &mut self,
        mechanism: Mechanism,
        username: &str,
        secret: &SecretString,
    ) -> Result<String, Failure>;

    /// IMAP STATUS of `mailbox`, or POP3 STAT; returns the counts and a description.
    async fn inspect(&mut self, mailbox: &str) -> Result<(MailboxInfo, String), Failure>;

    /// Whether the connection is in a state where LOGOUT/QUIT makes sense.
    fn can_quit(&self) -> bool;

    /// LOGOUT or QUIT; returns the server's words.
    async fn quit(&mut self) -> Result<String, Failure>;

    /// What the session last sent and waits an answer to, such as `STATUS "INBOX"` (never
    /// a secret), for timeout messages.
    fn pending(&self) -> Option<String>;

    /// The lines the server sent since the current step began (for timeout messages).
    fn recent(&self) -> Vec<String>;
}
