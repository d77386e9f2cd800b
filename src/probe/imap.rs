//! IMAP (RFC 3501) over async-imap: the greeting, CAPABILITY, STARTTLS, LOGIN or
//! AUTHENTICATE PLAIN, STATUS and LOGOUT.
//!
//! async-imap parses responses and runs LOGIN and STARTTLS. CAPABILITY, AUTHENTICATE,
//! STATUS and LOGOUT are written by us (with our own `M` tags, distinct from async-imap's
//! `A0001`…) and read back through async-imap's parser, because its own helpers lose what
//! a test reports: `capabilities()` returns an unordered set, `status()` silently ignores
//! a STATUS reply whose mailbox name is spelled differently, and `authenticate()` takes
//! untagged data before the `+` for the end of the exchange and then waits for a tagged
//! reply while the server waits for the credentials. Failure messages quote the server's
//! tagged reply as it was sent, taken from the meter's record of recent lines (async-imap
//! only keeps a `Debug` rendering of it).
//!
//! A server that speaks only IMAP4rev2 (RFC 9051) lists no IMAP4rev1 among its
//! capabilities, and imap-proto refuses such a list: in a greeting's code it is left in the
//! text, as an untagged CAPABILITY it is a parse error. Both are read from the text instead
//! (see [`capability_list`]).

use std::io;

use async_imap::error::Error as ImapError;
use async_imap::imap_proto::{
    Capability, MailboxDatum, Outcome, Response, ResponseCode, Status, StatusAttribute,
};
use async_imap::{Client, Connection, Session};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use secrecy::{ExposeSecret, SecretString};
use tokio::io::AsyncWriteExt;

use super::classify::{self, quote};
use super::redact::Redactor;
use super::sasl::{self, Exchange};
use super::session::{Greeting, MailSession, Mechanism};
use super::stream::{Limits, Meter, Tcp, Wire, limit_exceeded};
use super::{Failure, MailboxInfo, Step};
use crate::api::{Protocol, Reason};

enum State {
    /// Not authenticated, or logged in other than by async-imap's LOGIN (PREAUTH, our own
    /// AUTHENTICATE): async-imap makes a `Session` only in its own login.
    Client(Client<Wire>),
    /// Logged in by LOGIN.
    Session(Session<Wire>),
    /// Handed away for STARTTLS, lost to a dropped future, or logged out.
    Closed,
}

/// An IMAP session.
pub(crate) struct Imap {
    state: State,
    endpoint: String,
    /// Set while a command is in flight; left set when it broke off.
    busy: bool,
    pending: Option<String>,
    next_tag: u32,
    /// The server advertised SASL-IR (RFC 4959) in its last capability list.
    sasl_ir: bool,
    /// The tag of a LOGOUT that went out with STATUS, whose reply is still to be read.
    logout_sent: Option<String>,
    /// Takes the login's secret out of the server's words (see `probe::redact`); the
    /// meter's recent lines, which most messages quote, are already without it.
    redactor: Redactor,
}

/// How a command we wrote ended.
struct Done {
    ok: bool,
    /// The tagged reply without its tag: `NO [NONEXISTENT] Mailbox doesn't exist: Foo`.
    text: String,
}

impl Imap {
    fn conn(&mut self) -> Option<&mut Connection<Wire>> {
        match &mut self.state {
            State::Client(client) => Some(&mut **client),
            State::Session(session) => Some(&mut **session),
            State::Closed => None,
        }
    }

    fn wire(&self) -> Option<&Wire> {
        match &self.state {
            State::Client(client) => Some(client.get_ref()),
            State::Session(session) => Some(session.get_ref()),
            State::Closed => None,
        }
    }

    fn closed(&self, step: Step) -> Failure {
        Failure::new(
            Reason::ProtocolError,
            step,
            format!(
                "the IMAP connection to {} is no longer usable",
                self.endpoint
            ),
        )
    }

    fn mark(&mut self) {
        if let Some(conn) = self.conn() {
            conn.get_mut().mark();
        }
    }

    /// The server's tagged reply to the last command, as sent.
    fn tagged_reply(&self) -> Option<String> {
        classify::tagged_reply(&self.recent())
    }

    /// A response read from the server, or why there is none (closed, I/O error).
    fn received<T>(&mut self, step: Step, read: io::Result<Option<T>>) -> Result<T, Failure> {
        match read {
            Ok(Some(response)) => {
                if let Some(conn) = self.conn() {
                    conn.get_mut().response_read();
                }
                Ok(response)
            }
            Ok(None) => Err(classify::connection_closed(
                step,
                &self.endpoint,
                &self.recent(),
            )),
            Err(err) => Err(self.io_failure(step, &err)),
        }
    }

    fn io_failure(&self, step: Step, err: &io::Error) -> Failure {
        let recent = self.recent();
        if limit_exceeded(err).is_none() && is_parse_error(err) {
            if step == Step::Greeting
                && let Some(first) = recent.first()
            {
                return classify::unexpected_greeting(
                    Protocol::Imap,
                    &self.endpoint,
                    first.as_bytes(),
                );
            }
            let said = recent
                .last()
                .map(|l| format!(": {}", quote(l)))
                .unwrap_or_default();
            return Failure::new(
                Reason::ProtocolError,
                step,
                format!(
                    "IMAP server {} sent something that is not IMAP at the {step} step{said}",
                    self.endpoint
                ),
            );
        }
        classify::io_failure(Protocol::Imap, step, &self.endpoint, err, &recent)
    }

    /// An async-imap error from `command`. `Ok(reason)` is used for a NO or BAD reply
    /// (after which the session is still usable).
    fn imap_failure(
        &mut self,
        step: Step,
        command: &str,
        err: ImapError,
        refused: Reason,
    ) -> Failure {
        match err {
            ImapError::No(_) | ImapError::Bad(_) => self.refusal(step, command, refused),
            ImapError::Io(io) => self.io_failure(step, &io),
            ImapError::ConnectionLost => {
                classify::connection_closed(step, &self.endpoint, &self.recent())
            }
            ImapError::Validate(_) => Failure::new(
                Reason::InvalidSpec,
                step,
                format!("{command} cannot be sent: a value contains a line break"),
            ),
            other => {
                // Cut by characters: the text may quote the server, and a cut inside a
                // character panics.
                let text: String = (self.redactor.apply(other.to_string()))
                    .chars()
                    .take(200)
                    .collect();
                Failure::new(
                    Reason::ProtocolError,
                    step,
                    format!("IMAP {command} with {} failed: {text}", self.endpoint),
                )
            }
        }
    }

    /// A NO or BAD reply to `command` (after which the session is still usable).
    fn refusal(&mut self, step: Step, command: &str, refused: Reason) -> Failure {
        self.busy = false;
        let reply = self.tagged_reply();
        let said = reply
            .as_deref()
            .map(quote)
            .unwrap_or_else(|| "a NO or BAD reply".into());
        if refused == Reason::AuthenticationFailed
            && let Some(failure) = reply
                .as_deref()
                .and_then(|r| classify::refused_login(Protocol::Imap, &self.endpoint, command, r))
        {
            return failure;
        }
        let message = if refused == Reason::AuthenticationFailed {
            format!("IMAP {command} rejected by {}: {said}", self.endpoint)
        } else {
            format!("IMAP server {} refused {command}: {said}", self.endpoint)
        };
        Failure::new(refused, step, message)
    }

    fn next_tag(&mut self) -> String {
        self.next_tag += 1;
        format!("M{}", self.next_tag)
    }

    /// Writes `command` (never a secret) with a tag of ours and reads responses until its
    /// tagged reply, handing the others to `on_data`.
    async fn command(
        &mut self,
        step: Step,
        command: &str,
        on_data: impl FnMut(&Response<'_>) + Send,
    ) -> Result<Done, Failure> {
        let (tag, _) = self.send(step, command, None).await?;
        self.read_until(step, &tag, on_data).await
    }

    /// Writes `command` (never a secret), and `then` in the same write if given, each with
    /// a tag of ours; returns their tags.
    async fn send(
        &mut self,
        step: Step,
        command: &str,
        then: Option<&str>,
    ) -> Result<(String, Option<String>), Failure> {
        self.busy = true;
        self.pending = Some(command.to_string());
        let tag = self.next_tag();
        let mut lines = format!("{tag} {command}\r\n");
        let then_tag = then.map(|then| {
            let then_tag = self.next_tag();
            lines.push_str(&format!("{then_tag} {then}\r\n"));
            then_tag
        });
        self.mark();
        self.write(step, &[&lines]).await?;
        Ok((tag, then_tag))
    }

    /// Writes `parts` and flushes them: one record, as the wire keeps what is written
    /// until the flush.
    async fn write(&mut self, step: Step, parts: &[&str]) -> Result<(), Failure> {
        let Some(conn) = self.conn() else {
            return Err(self.closed(step));
        };
        let written = async {
            let wire = conn.get_mut();
            for part in parts {
                wire.write_all(part.as_bytes()).await?;
            }
            wire.flush().await
        }
        .await;
        written.map_err(|err| self.io_failure(step, &err))
    }

    /// The list in an untagged CAPABILITY that imap-proto refused (one without IMAP4rev1),
    /// if that is what `err` is. async-imap's stream gives nothing more after a parse
    /// error, so the connection goes on under a fresh `Client`: the wire hands the parser
    /// one line at a time, and the error quotes the whole unparsed buffer, so it is checked
    /// that the line is all that is dropped. A `Session` cannot be rebuilt over the wire.
    fn refused_capabilities(&mut self, err: &io::Error) -> Option<Vec<String>> {
        if !is_parse_error(err) {
            return None;
        }
        let error = err.to_string();
        let caps = self.recent().iter().find_map(|line| {
            let caps = capability_list(line.strip_prefix("* ")?)?;
            let dropped = format!("during parsing of {:?}", format!("{line}\r\n"));
            error.ends_with(&dropped).then_some(caps)
        })?;
        match std::mem::replace(&mut self.state, State::Closed) {
            State::Client(client) => {
                let mut wire = client.into_inner();
                wire.response_read();
                self.state = State::Client(Client::new(wire));
                Some(caps)
            }
            other => {
                self.state = other;
                None
            }
        }
    }

    /// Reads responses until the tagged reply to `tag`, handing the others to `on_data`.
    async fn read_until(
        &mut self,
        step: Step,
        tag: &str,
        mut on_data: impl FnMut(&Response<'_>) + Send,
    ) -> Result<Done, Failure> {
        loop {
            let Some(conn) = self.conn() else {
                return Err(self.closed(step));
            };
            let read = conn.read_response().await;
            if let Err(err) = &read
                && let Some(caps) = self.refused_capabilities(err)
            {
                let list = caps.iter().map(|c| Capability::Atom(c.as_str().into()));
                on_data(&Response::Capabilities(list.collect()));
                continue;
            }
            let response = self.received(step, read)?;
            match response.parsed() {
                Response::Done {
                    tag: done_tag,
                    status,
                    outcome,
                } if done_tag.0 == tag => {
                    let ok = *status == Status::Ok;
                    let text =
                        classify::tagged_reply_to(&self.recent(), tag).unwrap_or_else(|| {
                            self.redactor.apply(format!(
                                "{status:?} {}",
                                outcome.information.as_deref().unwrap_or_default()
                            ))
                        });
                    self.busy = false;
                    return Ok(Done { ok, text });
                }
                other => on_data(other),
            }
        }
    }

    /// IMAP LOGIN, run by async-imap.
    async fn login(
        &mut self,
        command: &str,
        username: &str,
        password: &SecretString,
    ) -> Result<String, Failure> {
        let step = Step::Authenticate;
        if username.contains('\0') || password.expose_secret().contains('\0') {
            self.busy = false;
            return Err(Failure::new(
                Reason::InvalidSpec,
                step,
                "the username or password contains a NUL character, which IMAP LOGIN cannot send",
            ));
        }
        let client = self.take_client(step)?;
        match client.login(username, password.expose_secret()).await {
            Ok(session) => {
                self.state = State::Session(session);
                self.busy = false;
                Ok(self.tagged_reply().unwrap_or_else(|| "OK".into()))
            }
            Err((err, client)) => {
                self.state = State::Client(client);
                Err(self.imap_failure(step, command, err, Reason::AuthenticationFailed))
            }
        }
    }

    /// AUTHENTICATE (RFC 3501 §6.2.2): answers each `+` challenge until the tagged reply,
    /// skipping untagged data before, between and after them.
    async fn sasl(&mut self, command: &str, exchange: &mut Exchange) -> Result<String, Failure> {
        let step = Step::Authenticate;
        let tag = self.next_tag();
        // SASL-IR (RFC 4959): the initial response goes with the command, saving a round
        // trip.
        let initial = if self.sasl_ir {
            exchange.initial_response()
        } else {
            None
        };
        // Written in pieces (the wire keeps them for one flush): a line joined first would
        // leave another copy of the credentials behind.
        let encoded = initial.map(|initial| sasl::encode(&initial));
        let (space, initial) = match encoded.as_deref() {
            Some(encoded) => (" ", encoded.as_str()),
            None => ("", ""),
        };
        let mechanism = exchange.mechanism();
        let line = [
            tag.as_str(),
            " AUTHENTICATE ",
            mechanism,
            space,
            initial,
            "\r\n",
        ];
        self.write(step, &line).await?;
        loop {
            let Some(conn) = self.conn() else {
                return Err(self.closed(step));
            };
            let read = conn.read_response().await;
            if let Err(err) = &read
                && self.refused_capabilities(err).is_some()
            {
                continue;
            }
            let response = self.received(step, read)?;
            let challenge = match response.parsed() {
                Response::Continue(outcome) => outcome.information.as_deref().unwrap_or_default(),
                Response::Done {
                    tag: done_tag,
                    status,
                    ..
                } if done_tag.0 == tag => {
                    if *status != Status::Ok {
                        return Err(self.refusal(step, command, Reason::AuthenticationFailed));
                    }
                    self.busy = false;
                    let words = classify::tagged_reply_to(&self.recent(), &tag);
                    return Ok(words.unwrap_or_else(|| "OK".into()));
                }
                _ => continue,
            };
            let Ok(challenge) = sasl::decode_challenge(challenge) else {
                // Worded as async-imap's error was; cut by characters, as it may quote anything.
                let text = format!("parse: unable to parse authentication response: {challenge}");
                let text: String = self.redactor.apply(text).chars().take(200).collect();
                return Err(Failure::new(
                    Reason::ProtocolError,
                    step,
                    format!("IMAP {command} with {} failed: {text}", self.endpoint),
                ));
            };
            // The challenge is kept for messages, not read.
            let challenge = self.redactor.apply_bytes(&challenge);
            let response = sasl::encode(&exchange.respond(&challenge));
            self.write(step, &[&response, "\r\n"]).await?;
        }
    }

    fn take_client(&mut self, step: Step) -> Result<Client<Wire>, Failure> {
        match std::mem::replace(&mut self.state, State::Closed) {
            State::Client(client) => Ok(client),
            other => {
                self.state = other;
                Err(Failure::new(
                    Reason::ProtocolError,
                    step,
                    "the IMAP session is not in the not-authenticated state",
                ))
            }
        }
    }
}

/// async-imap reports a response it cannot parse as an `io::Error` of kind Other.
fn is_parse_error(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::Other && err.to_string().contains("during parsing of")
}

/// A capability as the server wrote it.
fn capability_text(cap: &Capability<'_>) -> String {
    match cap {
        Capability::Imap4rev1 => "IMAP4rev1".into(),
        // imap-proto lets DEL (0x7f) into an atom (found by fuzzing): escaped, as every
        // control character a server sends is where it is shown.
        Capability::Auth(mech) => classify::printable(&format!("AUTH={mech}")),
        Capability::Atom(atom) => classify::printable(atom),
    }
}

/// The mechanism an `AUTH=` capability names. Compared by bytes: a server may send a
/// capability that is not ASCII, and slicing it at a fixed index could split a character.
fn sasl_name(capability: &str) -> Option<&str> {
    let prefix = capability.get(..5)?;
    let name = capability.get(5..)?;
    (prefix.eq_ignore_ascii_case("AUTH=") && !name.is_empty()).then_some(name)
}

fn has_capability(caps: &[String], name: &str) -> bool {
    caps.iter().any(|c| c.eq_ignore_ascii_case(name))
}

/// The list in `CAPABILITY IMAP4rev2 AUTH=PLAIN ...` (an untagged response without its
/// `* `, or a greeting's code without its brackets), read from the text for the lists
/// imap-proto refuses: those without IMAP4rev1. `None` unless there is a name and every
/// one is printable ASCII, as IMAP atoms are.
fn capability_list(text: &str) -> Option<Vec<String>> {
    let (word, list) = text.split_once(' ')?;
    let caps: Vec<String> = list
        .split(' ')
        .filter(|c| !c.is_empty())
        .map(str::to_string)
        .collect();
    let atom = |c: &String| c.bytes().all(|b| b.is_ascii_graphic());
    (word.eq_ignore_ascii_case("CAPABILITY") && !caps.is_empty() && caps.iter().all(atom))
        .then_some(caps)
}

/// A mailbox name as an IMAP quoted string, in modified UTF-7 (RFC 3501 §5.1.3).
pub(crate) fn mailbox_argument(name: &str) -> Result<String, &'static str> {
    if name.contains(['\r', '\n', '\0']) {
        return Err("contains a line break or NUL character");
    }
    let encoded = modified_utf7(name);
    let mut quoted = String::with_capacity(encoded.len() + 2);
    quoted.push('"');
    for c in encoded.chars() {
        if c == '"' || c == '\\' {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('"');
    Ok(quoted)
}

/// RFC 3501 §5.1.3: printable ASCII as is (`&` as `&-`), the rest as UTF-16 in base64
/// with `,` for `/`, between `&` and `-`.
pub(crate) fn modified_utf7(name: &str) -> String {
    fn flush(out: &mut String, pending: &mut Vec<u16>) {
        if pending.is_empty() {
            return;
        }
        let bytes: Vec<u8> = pending.iter().flat_map(|u| u.to_be_bytes()).collect();
        out.push('&');
        out.push_str(&STANDARD_NO_PAD.encode(bytes).replace('/', ","));
        out.push('-');
        pending.clear();
    }
    let mut out = String::new();
    let mut pending = Vec::new();
    for c in name.chars() {
        if (' '..='~').contains(&c) {
            flush(&mut out, &mut pending);
            if c == '&' {
                out.push_str("&-");
            } else {
                out.push(c);
            }
        } else {
            let mut units = [0u16; 2];
            pending.extend_from_slice(c.encode_utf16(&mut units));
        }
    }
    flush(&mut out, &mut pending);
    out
}

impl MailSession for Imap {
    fn limits() -> Limits {
        Limits::for_imap()
    }

    fn open(wire: Wire, endpoint: String) -> Imap {
        Imap {
            redactor: wire.meter().redactor().clone(),
            state: State::Client(Client::new(wire)),
            endpoint,
            busy: false,
            pending: None,
            next_tag: 0,
            sasl_ir: false,
            logout_sent: None,
        }
    }

    async fn greeting(&mut self) -> Result<Greeting, Failure> {
        let step = Step::Greeting;
        self.busy = true;
        self.pending = None;
        self.mark();
        let Some(conn) = self.conn() else {
            return Err(self.closed(step));
        };
        let read = conn.read_response().await;
        let response = self.received(step, read)?;
        let line = self.recent().into_iter().next().unwrap_or_default();
        let capabilities = match response.parsed() {
            Response::Data {
                outcome:
                    Outcome {
                        code: Some(ResponseCode::Capabilities(list)),
                        ..
                    },
                ..
            } => Some(list.iter().map(capability_text).collect::<Vec<_>>()),
            // A list imap-proto refused stays in the text: `[CAPABILITY IMAP4rev2 ...] ready`.
            Response::Data {
                outcome:
                    Outcome {
                        code: None,
                        information: Some(text),
                    },
                ..
            } => text
                .strip_prefix('[')
                .and_then(|t| t.split_once(']'))
                .and_then(|(code, _)| capability_list(code)),
            _ => None,
        };
        let preauth = match response.parsed() {
            Response::Data {
                status: Status::Ok, ..
            } => false,
            Response::Data {
                status: Status::PreAuth,
                ..
            } => true,
            Response::Data {
                status: Status::Bye,
                ..
            } => {
                return Err(classify::refused_session(
                    Protocol::Imap,
                    &self.endpoint,
                    &line,
                ));
            }
            _ => {
                return Err(classify::unexpected_greeting(
                    Protocol::Imap,
                    &self.endpoint,
                    line.as_bytes(),
                ));
            }
        };
        if let Some(caps) = &capabilities {
            self.sasl_ir = has_capability(caps, "SASL-IR");
        }
        self.busy = false;
        Ok(Greeting {
            text: classify::printable(line.trim()),
            preauth,
            capabilities,
        })
    }

    async fn capabilities(&mut self) -> Result<Vec<String>, Failure> {
        let step = Step::Capabilities;
        let mut caps = Vec::new();
        let done = self
            .command(step, "CAPABILITY", |response| {
                if let Response::Capabilities(list) = response {
                    caps.extend(list.iter().map(capability_text));
                }
            })
            .await?;
        if !done.ok {
            return Err(Failure::new(
                Reason::ProtocolError,
                step,
                format!(
                    "IMAP server {} refused CAPABILITY: {}",
                    self.endpoint,
                    quote(&done.text)
                ),
            ));
        }
        self.sasl_ir = has_capability(&caps, "SASL-IR");
        Ok(caps)
    }

    fn offers_starttls(&self, caps: &[String]) -> bool {
        has_capability(caps, "STARTTLS")
    }

    async fn start_tls(&mut self) -> Result<(Tcp, Meter, String), Failure> {
        let step = Step::StartTls;
        self.busy = true;
        self.pending = Some("STARTTLS".into());
        self.mark();
        let State::Client(client) = &mut self.state else {
            return Err(self.closed(step));
        };
        if let Err(err) = client.run_command_and_check_ok("STARTTLS", None).await {
            return Err(self.imap_failure(step, "STARTTLS", err, Reason::StartTlsUnavailable));
        }
        let words = self.tagged_reply().unwrap_or_else(|| "OK".into());
        let client = self.take_client(step)?;
        let wire = client.into_inner();
        if wire.unread() > 0 {
            return Err(Failure::new(
                Reason::ProtocolError,
                step,
                format!(
                    "IMAP server {} sent data after its OK to STARTTLS, before the TLS \
                     handshake; refusing to continue (someone may be injecting responses)",
                    self.endpoint
                ),
            ));
        }
        let (tcp, meter) = wire.into_plain().ok_or_else(|| {
            Failure::new(
                Reason::ProtocolError,
                step,
                "STARTTLS on a connection that is already TLS",
            )
        })?;
        Ok((tcp, meter, words))
    }

    fn resume(&mut self, wire: Wire) {
        self.state = State::Client(Client::new(wire));
        self.busy = false;
    }

    fn is_tls(&self) -> bool {
        self.wire().is_some_and(Wire::is_tls)
    }

    fn choose_mechanism(&self, caps: &[String]) -> Result<Mechanism, Failure> {
        if has_capability(caps, "AUTH=PLAIN") {
            return Ok(Mechanism::SaslPlain);
        }
        if has_capability(caps, "AUTH=LOGIN") {
            return Ok(Mechanism::SaslLogin);
        }
        if !has_capability(caps, "LOGINDISABLED") {
            return Ok(Mechanism::ImapLogin);
        }
        let offered: Vec<&str> = caps
            .iter()
            .filter(|c| sasl_name(c).is_some())
            .map(String::as_str)
            .collect();
        let offered = if offered.is_empty() {
            " and no AUTH= mechanism".to_string()
        } else {
            format!(
                " and neither AUTH=PLAIN nor AUTH=LOGIN (it offers {})",
                offered.join(" ")
            )
        };
        let hint = if self.is_tls() {
            ""
        } else {
            "; servers often allow logins only over TLS: use tls.mode StartTLS or Implicit"
        };
        Err(Failure::new(
            Reason::AuthMechanismUnsupported,
            Step::Authenticate,
            format!(
                "IMAP server {} advertises LOGINDISABLED{offered}{hint}",
                self.endpoint
            ),
        ))
    }

    fn sasl_offered(&self, caps: &[String]) -> Vec<String> {
        caps.iter()
            .filter_map(|c| sasl_name(c))
            .map(|m| m.to_ascii_uppercase())
            .collect()
    }

    async fn authenticate(
        &mut self,
        mechanism: Mechanism,
        username: &str,
        password: &SecretString,
    ) -> Result<String, Failure> {
        let step = Step::Authenticate;
        let command = mechanism.command(Protocol::Imap);
        self.busy = true;
        self.pending = Some(command.to_string());
        self.mark();
        let mut exchange = match mechanism {
            Mechanism::XOAuth2 => Exchange::xoauth2(username, password),
            Mechanism::OAuthBearer => Exchange::oauthbearer(username, password, &self.endpoint),
            Mechanism::SaslPlain => Exchange::plain(username, password),
            Mechanism::SaslLogin => Exchange::login(username, password),
            Mechanism::ImapLogin | Mechanism::UserPass => {
                return self.login(command, username, password).await;
            }
        };
        if let Err(why) = exchange.check() {
            self.busy = false;
            return Err(Failure::new(Reason::InvalidSpec, step, why));
        }
        let result = self.sasl(command, &mut exchange).await;
        result.map_err(|mut failure| {
            for challenge in exchange.later_challenges() {
                failure
                    .message
                    .push_str(&sasl::describe_challenge(challenge));
            }
            failure
        })
    }

    async fn inspect(&mut self, mailbox: &str) -> Result<(MailboxInfo, String), Failure> {
        let step = Step::Mailbox;
        let argument = mailbox_argument(mailbox).map_err(|why| {
            Failure::new(
                Reason::InvalidSpec,
                step,
                format!("the mailbox name {} (check.mailbox) {why}", quote(mailbox)),
            )
        })?;
        let command = format!("STATUS {argument} (MESSAGES UNSEEN)");
        // LOGOUT follows whatever STATUS answers, so it goes out with it (RFC 3501 §5.5
        // allows commands in flight together): one round trip fewer.
        let (tag, logout) = self.send(step, &command, Some("LOGOUT")).await?;
        self.logout_sent = logout;
        let mut counts: Option<(Option<u64>, Option<u64>)> = None;
        let done = self
            .read_until(step, &tag, |response| {
                if let Response::MailboxData(MailboxDatum::Status { status, .. }) = response
                    && counts.is_none()
                {
                    let mut messages = None;
                    let mut unseen = None;
                    for attribute in status {
                        match attribute {
                            StatusAttribute::Messages(n) => messages = Some(u64::from(*n)),
                            StatusAttribute::Unseen(n) => unseen = Some(u64::from(*n)),
                            _ => {}
                        }
                    }
                    counts = Some((messages, unseen));
                }
            })
            .await?;
        if !done.ok {
            return Err(classify::refused_mailbox(
                Protocol::Imap,
                &self.endpoint,
                &format!("STATUS {argument}"),
                &done.text,
            ));
        }
        let Some((Some(messages), unseen)) = counts else {
            return Err(Failure::new(
                Reason::ProtocolError,
                step,
                format!(
                    "IMAP server {} answered STATUS {argument} with {} but sent no message count",
                    self.endpoint,
                    quote(&done.text)
                ),
            ));
        };
        let words = match unseen {
            Some(unseen) => format!("{mailbox}: {}, {unseen} unseen", super::messages(messages)),
            None => format!("{mailbox}: {}", super::messages(messages)),
        };
        Ok((
            MailboxInfo {
                name: mailbox.to_string(),
                messages,
                unseen,
            },
            words,
        ))
    }

    fn can_quit(&self) -> bool {
        !self.busy && !matches!(self.state, State::Closed)
    }

    async fn quit(&mut self) -> Result<String, Failure> {
        let done = match self.logout_sent.take() {
            Some(tag) => {
                self.busy = true;
                self.pending = Some("LOGOUT".into());
                self.read_until(Step::Logout, &tag, |_| {}).await?
            }
            None => self.command(Step::Logout, "LOGOUT", |_| {}).await?,
        };
        self.state = State::Closed;
        Ok(done.text)
    }

    fn pending(&self) -> Option<String> {
        self.pending.clone()
    }

    fn recent(&self) -> Vec<String> {
        self.wire().map(|w| w.meter().recent()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mailbox_names_are_quoted_in_modified_utf7() {
        assert_eq!(mailbox_argument("INBOX").unwrap(), "\"INBOX\"");
        assert_eq!(mailbox_argument("a \"b\\c").unwrap(), "\"a \\\"b\\\\c\"");
        assert_eq!(modified_utf7("Entwürfe"), "Entw&APw-rfe");
        assert_eq!(modified_utf7("R&D"), "R&-D");
        assert_eq!(modified_utf7("日本語"), "&ZeVnLIqe-");
        assert_eq!(
            modified_utf7("~peter/mail/台北/日本語"),
            "~peter/mail/&U,BTFw-/&ZeVnLIqe-"
        );
        assert!(mailbox_argument("a\r\nb").is_err());
    }

    #[test]
    fn capabilities_render_as_sent() {
        assert_eq!(capability_text(&Capability::Imap4rev1), "IMAP4rev1");
        assert_eq!(
            capability_text(&Capability::Auth("PLAIN".into())),
            "AUTH=PLAIN"
        );
        assert_eq!(capability_text(&Capability::Atom("IDLE".into())), "IDLE");
        assert_eq!(
            capability_text(&Capability::Atom("LITERAL+\u{7f}".into())),
            "LITERAL+\\u{7f}"
        );
        assert_eq!(
            capability_text(&Capability::Auth("PLAIN\u{7f}".into())),
            "AUTH=PLAIN\\u{7f}"
        );
    }

    #[test]
    fn capability_lists_imap_proto_refuses_are_read_from_the_text() {
        assert_eq!(
            capability_list("CAPABILITY IMAP4rev2 AUTH=PLAIN SASL-IR").unwrap(),
            ["IMAP4rev2", "AUTH=PLAIN", "SASL-IR"]
        );
        assert_eq!(
            capability_list("capability imap4rev2").unwrap(),
            ["imap4rev2"]
        );
        // Stray spaces, as some servers send, are no names.
        assert_eq!(
            capability_list("CAPABILITY IMAP4rev2  IDLE ").unwrap(),
            ["IMAP4rev2", "IDLE"]
        );
        assert_eq!(capability_list("CAPABILITY"), None);
        assert_eq!(capability_list("CAPABILITY "), None);
        assert_eq!(capability_list("CAPABILITY IMAP4rev2 \x1b[31m"), None);
        assert_eq!(capability_list("CAPABILITY IMAP4rev2 Stra\u{df}e"), None);
        assert_eq!(capability_list("OK IMAP4rev2"), None);
    }
}
