//! The probe: one test of one mailbox, the "Test button" (DESIGN §3).
//!
//! Given an endpoint, a trust configuration and a login, [`run`] resolves, connects,
//! secures, greets, asks for capabilities, authenticates, inspects the mailbox and logs out,
//! each step bounded by what is left of [`Target::timeout`] and every read bounded in bytes.
//! It returns a [`Report`]: the steps it took with their timings and the server's words,
//! what it learned, and, if the test failed, a classified [`Failure`] whose message says
//! what was expected, what happened, and what to do.
//!
//! The probe knows nothing of Kubernetes; the controller and `mailroom check` both call
//! [`run`]. IMAP and POP3 differ only in wire format: each fills in the same steps
//! ([`session::MailSession`]), and this module runs them in order.
//!
//! Layout: `net` (resolve, connect), `stream` (the metered plain/TLS stream), `tls`
//! (configuration, verifier, certificate details), `imap` and `pop3` (the two dialects),
//! `sasl` (mechanism encodings), `classify` (errors to reasons and messages, pure).

mod classify;
// Reachable from the fuzz targets in fuzz/ (a separate crate), which feed the readers a
// scripted server; not part of the API.
#[doc(hidden)]
pub mod fuzzing;
mod imap;
mod net;
mod pop3;
mod redact;
mod sasl;
mod session;
mod stream;
mod tls;

use std::fmt;
use std::future::Future;
use std::time::Duration;

use futures::FutureExt;
use secrecy::SecretString;
use tokio::time::Instant;
use tracing::Instrument;

use crate::api::{Protocol, Reason, SaslMechanism, TlsMode};
pub(crate) use classify::{cut, printable};
use session::{Greeting, MailSession};
use stream::{Meter, Tcp, Wire};
pub(crate) use tls::sha256;

/// Where to connect and how.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    /// DNS name or IP literal (IPv6 without brackets).
    pub host: String,
    pub port: u16,
    pub protocol: Protocol,
    pub tls_mode: TlsMode,
    pub trust: Trust,
    /// IMAP: the folder whose `STATUS (MESSAGES UNSEEN)` is read. Ignored for POP3.
    pub mailbox: String,
    /// Bound on the whole test.
    pub timeout: Duration,
}

/// Which server certificates are accepted.
#[derive(Clone, Default, PartialEq)]
pub struct Trust {
    /// PEM certificates trusted besides the platform's roots. A self-signed server
    /// certificate placed here is trusted exactly (pinned).
    pub extra_roots_pem: Option<Vec<u8>>,
    /// The name to verify (and send as SNI) instead of the host.
    pub server_name: Option<String>,
    /// Accept any certificate (it is still recorded).
    pub insecure_skip_verify: bool,
}

impl fmt::Debug for Trust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Trust")
            .field(
                "extra_roots_pem",
                &self
                    .extra_roots_pem
                    .as_ref()
                    .map(|p| format!("{} bytes of PEM", p.len())),
            )
            .field("server_name", &self.server_name)
            .field("insecure_skip_verify", &self.insecure_skip_verify)
            .finish()
    }
}

/// How to log in. The password stays a [`SecretString`] until it is written to the socket.
#[derive(Clone, Debug)]
pub enum Login {
    /// Connectivity, greeting and capabilities only.
    None,
    Password {
        username: String,
        password: SecretString,
        /// Allow the password over a connection without TLS.
        allow_unencrypted: bool,
    },
    /// An OAuth2 access token, by SASL XOAUTH2 or OAUTHBEARER.
    OAuth2 {
        username: String,
        token: SecretString,
        mechanism: SaslMechanism,
        /// Allow the token over a connection without TLS.
        allow_unencrypted: bool,
    },
}

/// The outcome of one test.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// Every step attempted, in order.
    pub steps: Vec<StepRecord>,
    /// Whatever was learned, also when the test failed.
    pub findings: Findings,
    /// `None`: the test passed (the provider would be Ready).
    pub failure: Option<Failure>,
    pub duration: Duration,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.failure.is_none()
    }
}

/// One step of a test.
#[derive(Clone, Debug, PartialEq)]
pub struct StepRecord {
    pub step: Step,
    pub duration: Duration,
    pub ok: bool,
    /// The server's words or what happened; never a secret.
    pub detail: String,
}

/// The steps of a test, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Step {
    Resolve,
    Connect,
    TlsHandshake,
    Greeting,
    Capabilities,
    StartTls,
    Authenticate,
    Mailbox,
    Logout,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Resolve => "resolve",
            Step::Connect => "connect",
            Step::TlsHandshake => "TLS handshake",
            Step::Greeting => "greeting",
            Step::Capabilities => "capabilities",
            Step::StartTls => "STARTTLS",
            Step::Authenticate => "authenticate",
            Step::Mailbox => "mailbox",
            Step::Logout => "logout",
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a test learned about the server.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Findings {
    /// The server's greeting, trimmed. `Some` means the server was reachable.
    pub greeting: Option<String>,
    /// IMAP CAPABILITY or POP3 CAPA lines, in the server's order (after STARTTLS, the
    /// list the server gave over TLS).
    pub capabilities: Vec<String>,
    pub tls: Option<TlsInfo>,
    pub authenticated: bool,
    /// The mechanism tried: "PLAIN", "LOGIN" (IMAP LOGIN), "USER" (POP3 USER/PASS) or
    /// "PREAUTH" (the IMAP server greeted with PREAUTH).
    pub mechanism: Option<String>,
    pub mailbox: Option<MailboxInfo>,
}

/// The negotiated TLS session.
#[derive(Clone, Debug, PartialEq)]
pub struct TlsInfo {
    /// "TLSv1.3" or "TLSv1.2".
    pub version: String,
    /// IANA name, such as "TLS13_AES_256_GCM_SHA384".
    pub cipher_suite: String,
    pub peer_certificate: Option<CertInfo>,
}

/// The server's (end-entity) certificate.
#[derive(Clone, Debug, PartialEq)]
pub struct CertInfo {
    pub subject: String,
    pub issuer: String,
    /// RFC 3339, such as "2027-01-31T12:00:00Z".
    pub not_after: String,
    pub dns_names: Vec<String>,
}

/// The mailbox's counts: IMAP STATUS, or POP3 STAT (no unseen count).
#[derive(Clone, Debug, PartialEq)]
pub struct MailboxInfo {
    pub name: String,
    pub messages: u64,
    pub unseen: Option<u64>,
}

/// "1 message", "3 messages": as the step lines and the Ready message count them.
pub fn messages(n: u64) -> String {
    match n {
        1 => "1 message".into(),
        n => format!("{n} messages"),
    }
}

/// Why a test failed: a Ready reason, the step, and a message for people that quotes the
/// server where it said anything and never contains a secret.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub reason: Reason,
    pub step: Step,
    pub message: String,
}

impl Failure {
    /// Control characters the server sent are escaped here, whatever built the message.
    pub(crate) fn new(reason: Reason, step: Step, message: impl Into<String>) -> Failure {
        Failure {
            reason,
            step,
            message: classify::printable(&message.into()),
        }
    }
}

/// Runs one test. Never panics and never takes (much) longer than `target.timeout`.
pub async fn run(target: &Target, login: &Login) -> Report {
    let mut rec = Recorder::start(target);
    let span = tracing::debug_span!(
        "probe",
        host = %target.host,
        port = target.port,
        protocol = target.protocol.as_str(),
        tls = target.tls_mode.as_str(),
    );
    let result = async {
        match target.protocol {
            Protocol::Imap => drive::<imap::Imap>(target, login, &mut rec).await,
            Protocol::Pop3 => drive::<pop3::Pop3>(target, login, &mut rec).await,
        }
    }
    .instrument(span)
    .await;
    rec.into_report(result)
}

/// Connects, then lets the protocol's session take the steps, then says goodbye.
async fn drive<S: MailSession>(
    target: &Target,
    login: &Login,
    rec: &mut Recorder<'_>,
) -> Result<(), Failure> {
    let endpoint = classify::endpoint(&target.host, target.port);

    let t = rec
        .timed(Step::Resolve, net::resolve(&target.host, target.port))
        .await;
    let addrs = rec.settle(
        t,
        |waited, total| {
            classify::timeout_failure(Step::Resolve, &endpoint, None, waited, total, &[])
        },
        |addrs| net::describe_addrs(addrs),
    )?;

    let deadline = rec.deadline;
    let t = rec
        .timed(Step::Connect, net::connect(&addrs, &endpoint, deadline))
        .await;
    let (tcp, _) = rec.settle(
        t,
        |waited, total| net::connect_timeout(&endpoint, waited, total),
        |(_, addr)| format!("connected to {addr}"),
    )?;

    // The reader takes the login's secret out of the server's words (see `redact`).
    let meter = Meter::new(S::limits()).redacting(redact::Redactor::of(login, &endpoint));
    let mut wire = Wire::plain(Tcp::new(tcp), meter);
    if target.tls_mode == TlsMode::Implicit {
        let (tcp, meter) = wire.into_plain().expect("a new connection is plaintext");
        wire = handshake(target, &endpoint, rec, tcp, meter).await?;
    }

    talk::<S>(wire, target, login, &endpoint, rec).await
}

/// The session over a connected (and, for implicit TLS, secured) wire: the steps from the
/// greeting on, then goodbye.
async fn talk<S: MailSession>(
    wire: Wire,
    target: &Target,
    login: &Login,
    endpoint: &str,
    rec: &mut Recorder<'_>,
) -> Result<(), Failure> {
    let mut session = S::open(wire, endpoint.to_string());
    let result = converse(&mut session, target, login, endpoint, rec).await;

    if session.can_quit() && Instant::now() < rec.deadline {
        let t = rec.timed(Step::Logout, session.quit()).await;
        let _ = rec.settle(
            t,
            |waited, total| {
                classify::timeout_failure(
                    Step::Logout,
                    endpoint,
                    session.pending(),
                    waited,
                    total,
                    &session.recent(),
                )
            },
            |words| words.clone(),
        );
    }
    result
}

/// Greeting, capabilities, STARTTLS, authentication and the mailbox.
async fn converse<S: MailSession>(
    session: &mut S,
    target: &Target,
    login: &Login,
    endpoint: &str,
    rec: &mut Recorder<'_>,
) -> Result<(), Failure> {
    let protocol = target.protocol;
    let t = rec.timed(Step::Greeting, session.greeting()).await;
    let greeting: Greeting = rec.settle(
        t,
        |waited, total| {
            classify::greeting_timeout(
                protocol,
                target.tls_mode,
                endpoint,
                waited,
                total,
                &session.recent(),
            )
        },
        |g| g.text.clone(),
    )?;
    rec.findings.greeting = Some(greeting.text.clone());

    let mut caps = match greeting.capabilities {
        // Listed in the greeting: the same list, without asking.
        Some(caps) => {
            rec.record(
                Step::Capabilities,
                Duration::ZERO,
                true,
                format!("{} (from the greeting)", caps.join(" ")),
            );
            rec.findings.capabilities = caps.clone();
            caps
        }
        None => capabilities(session, endpoint, rec).await?,
    };

    if target.tls_mode == TlsMode::StartTls {
        if greeting.preauth {
            return rec.fail_now(Failure::new(
                Reason::StartTlsUnavailable,
                Step::StartTls,
                format!(
                    "IMAP server {endpoint} greeted with PREAUTH, which rules out STARTTLS: \
                     use tls.mode Implicit, or None if the connection needs no TLS"
                ),
            ));
        }
        if !session.offers_starttls(&caps) {
            return rec.fail_now(classify::starttls_not_offered(protocol, endpoint, &caps));
        }
        let t = rec.timed(Step::StartTls, session.start_tls()).await;
        let (tcp, meter, _) = rec.settle(
            t,
            |waited, total| {
                classify::timeout_failure(
                    Step::StartTls,
                    endpoint,
                    session.pending(),
                    waited,
                    total,
                    &session.recent(),
                )
            },
            |(_, _, words)| words.clone(),
        )?;
        let wire = handshake(target, endpoint, rec, tcp, meter).await?;
        session.resume(wire);
        caps = capabilities(session, endpoint, rec).await?;
    }

    let (username, password, allow_unencrypted, oauth) = match login {
        Login::None => return Ok(()),
        Login::Password {
            username,
            password,
            allow_unencrypted,
        } => (username, password, allow_unencrypted, None),
        Login::OAuth2 {
            username,
            token,
            mechanism,
            allow_unencrypted,
        } => (username, token, allow_unencrypted, Some(*mechanism)),
    };

    if greeting.preauth {
        rec.findings.authenticated = true;
        rec.findings.mechanism = Some("PREAUTH".into());
        rec.record(
            Step::Authenticate,
            Duration::ZERO,
            true,
            "the server pre-authenticated the connection (PREAUTH); no credentials were sent"
                .into(),
        );
    } else {
        if !session.is_tls() && !allow_unencrypted {
            let what = if oauth.is_some() {
                "an access token"
            } else {
                "a password"
            };
            return rec.fail_now(Failure::new(
                Reason::InvalidSpec,
                Step::Authenticate,
                format!(
                    "refusing to send {what} without TLS (tls.mode None); set \
                     authentication.allowUnencrypted: true to allow it"
                ),
            ));
        }
        let chosen = match oauth {
            Some(preference) => oauth_mechanism(
                protocol,
                endpoint,
                &session.sasl_offered(&caps),
                caps.is_empty(),
                preference,
            ),
            None => session.choose_mechanism(&caps),
        };
        let mechanism = match chosen {
            Ok(m) => m,
            Err(failure) => return rec.fail_now(failure),
        };
        rec.findings.mechanism = Some(mechanism.name().into());
        let mut t = rec
            .timed(
                Step::Authenticate,
                session.authenticate(mechanism, username, password),
            )
            .await;
        if let Err(Stop::Failed(f)) = &mut t.outcome
            && f.reason == Reason::AuthenticationFailed
        {
            let greeting = rec.findings.greeting.as_deref().unwrap_or_default();
            f.message.push_str(match oauth {
                None => classify::oauth2_hint(greeting, &caps),
                Some(_) => classify::exchange_oauth2_hint(greeting),
            });
        }
        rec.settle(
            t,
            |waited, total| {
                classify::timeout_failure(
                    Step::Authenticate,
                    endpoint,
                    session.pending(),
                    waited,
                    total,
                    &session.recent(),
                )
            },
            |words| format!("{} as {username}: {words}", mechanism.command(protocol)),
        )?;
        rec.findings.authenticated = true;
    }

    let t = rec
        .timed(Step::Mailbox, session.inspect(&target.mailbox))
        .await;
    let info = rec.settle(
        t,
        |waited, total| {
            classify::timeout_failure(
                Step::Mailbox,
                endpoint,
                session.pending(),
                waited,
                total,
                &session.recent(),
            )
        },
        |(_, words)| words.clone(),
    )?;
    rec.findings.mailbox = Some(info.0);
    Ok(())
}

/// The SASL mechanism for an access token: the one asked for, or with `Auto` what the
/// server advertises, OAUTHBEARER (the standard) before XOAUTH2. A POP3 server without
/// CAPA (`unknown`) gets the one asked for, or XOAUTH2, the more widely deployed.
pub(crate) fn oauth_mechanism(
    protocol: Protocol,
    endpoint: &str,
    offered: &[String],
    unknown: bool,
    preference: SaslMechanism,
) -> Result<session::Mechanism, Failure> {
    use session::Mechanism;
    let has = |name: &str| offered.iter().any(|m| m.eq_ignore_ascii_case(name));
    let wanted = match preference {
        SaslMechanism::OAuthBearer => Some(Mechanism::OAuthBearer),
        SaslMechanism::XOAuth2 => Some(Mechanism::XOAuth2),
        SaslMechanism::Auto if has("OAUTHBEARER") => Some(Mechanism::OAuthBearer),
        SaslMechanism::Auto if has("XOAUTH2") || unknown => Some(Mechanism::XOAuth2),
        SaslMechanism::Auto => None,
    };
    if let Some(m) = wanted
        && (unknown || has(m.name()))
    {
        return Ok(m);
    }
    let offers = if offered.is_empty() {
        "no SASL mechanism".to_string()
    } else {
        format!("SASL {}", offered.join(" "))
    };
    let asked = match wanted {
        Some(m) => format!("{} (oauth2.saslMechanism)", m.name()),
        None => "XOAUTH2 or OAUTHBEARER".to_string(),
    };
    Err(Failure::new(
        Reason::AuthMechanismUnsupported,
        Step::Authenticate,
        format!(
            "{} server {endpoint} does not offer {asked} for an OAuth2 access token; it offers {offers}",
            protocol.as_str()
        ),
    ))
}

async fn capabilities<S: MailSession>(
    session: &mut S,
    endpoint: &str,
    rec: &mut Recorder<'_>,
) -> Result<Vec<String>, Failure> {
    let t = rec.timed(Step::Capabilities, session.capabilities()).await;
    let caps = rec.settle(
        t,
        |waited, total| {
            classify::timeout_failure(
                Step::Capabilities,
                endpoint,
                session.pending(),
                waited,
                total,
                &session.recent(),
            )
        },
        |caps| {
            if caps.is_empty() {
                "none advertised".into()
            } else {
                caps.join(" ")
            }
        },
    )?;
    rec.findings.capabilities = caps.clone();
    Ok(caps)
}

/// The TLS handshake over `tcp`, recording what was negotiated.
async fn handshake(
    target: &Target,
    endpoint: &str,
    rec: &mut Recorder<'_>,
    mut tcp: Tcp,
    meter: Meter,
) -> Result<Wire, Failure> {
    let setup = match tls::Setup::new(target) {
        Ok(setup) => setup,
        Err(failure) => return rec.fail_now(failure),
    };
    tcp.reset_sniff();
    let t = rec
        .timed(Step::TlsHandshake, setup.handshake(tcp, endpoint))
        .await;
    let (stream, info) = rec.settle(
        t,
        |waited, total| setup.timeout_failure(endpoint, waited, total),
        |(_, info)| tls::describe(info, target.trust.insecure_skip_verify),
    )?;
    rec.findings.tls = Some(info);
    Ok(Wire::tls(stream, meter))
}

/// Why a step stopped early.
enum Stop {
    Failed(Failure),
    TimedOut,
}

/// A step's outcome with its timing, before it is recorded.
struct Timed<T> {
    step: Step,
    elapsed: Duration,
    outcome: Result<T, Stop>,
}

/// Collects the steps and findings of one test and keeps its deadline.
struct Recorder<'t> {
    steps: Vec<StepRecord>,
    findings: Findings,
    started: Instant,
    deadline: Instant,
    timeout: Duration,
    /// What is tested, to name the server in a failure no step could explain (`timed`).
    target: &'t Target,
}

impl<'t> Recorder<'t> {
    /// A test of `target` starting now, with its timeout for all its steps.
    fn start(target: &'t Target) -> Recorder<'t> {
        let started = Instant::now();
        Recorder {
            steps: Vec::new(),
            findings: Findings::default(),
            started,
            deadline: started + target.timeout,
            timeout: target.timeout,
            target,
        }
    }

    fn into_report(self, result: Result<(), Failure>) -> Report {
        Report {
            steps: self.steps,
            findings: self.findings,
            failure: result.err(),
            duration: self.started.elapsed(),
        }
    }

    /// Runs one step within what is left of the deadline.
    async fn timed<T, F>(&mut self, step: Step, fut: F) -> Timed<T>
    where
        F: Future<Output = Result<T, Failure>>,
    {
        let started = Instant::now();
        let span = tracing::debug_span!("step", step = step.as_str());
        // A parser that panics on what a server sent (async-imap's did, on a response
        // code followed by a non-ASCII byte, found by fuzzing) fails this test, as any
        // reply that cannot be read does, instead of the whole test: the connection is
        // then left unused, and dropped.
        let step_fut = std::panic::AssertUnwindSafe(fut.instrument(span)).catch_unwind();
        let outcome = match tokio::time::timeout_at(self.deadline, step_fut).await {
            Ok(Ok(Ok(value))) => Ok(value),
            Ok(Ok(Err(failure))) => Err(Stop::Failed(failure)),
            Ok(Err(_panic)) => Err(Stop::Failed(Failure::new(
                Reason::ProtocolError,
                step,
                format!(
                    "{} server {} sent a reply at the {step} step that mailroom could not read",
                    self.target.protocol.as_str(),
                    classify::endpoint(&self.target.host, self.target.port)
                ),
            ))),
            Err(_) => Err(Stop::TimedOut),
        };
        Timed {
            step,
            elapsed: started.elapsed(),
            outcome,
        }
    }

    /// Records a step's outcome. `on_timeout` gets how long the step waited and the whole
    /// test's timeout, and explains; `detail` describes a success.
    fn settle<T>(
        &mut self,
        timed: Timed<T>,
        on_timeout: impl FnOnce(Duration, Duration) -> Failure,
        detail: impl FnOnce(&T) -> String,
    ) -> Result<T, Failure> {
        let Timed {
            step,
            elapsed,
            outcome,
        } = timed;
        match outcome {
            Ok(value) => {
                self.record(step, elapsed, true, detail(&value));
                Ok(value)
            }
            Err(stop) => {
                let failure = match stop {
                    Stop::Failed(failure) => failure,
                    Stop::TimedOut => on_timeout(elapsed, self.timeout),
                };
                self.record(step, elapsed, false, failure.message.clone());
                Err(failure)
            }
        }
    }

    /// Records a failure decided without I/O (the step took no time).
    fn fail_now<T>(&mut self, failure: Failure) -> Result<T, Failure> {
        self.record(failure.step, Duration::ZERO, false, failure.message.clone());
        Err(failure)
    }

    fn record(&mut self, step: Step, duration: Duration, ok: bool, detail: String) {
        let detail = classify::printable(&detail);
        tracing::debug!(
            step = step.as_str(),
            ok,
            elapsed_ms = duration.as_millis() as u64,
            detail = %detail,
            "probe step"
        );
        self.steps.push(StepRecord {
            step,
            duration,
            ok,
            detail,
        });
    }
}

#[cfg(test)]
mod tests;
