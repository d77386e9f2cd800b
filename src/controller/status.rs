//! What status follows from a test, and whether it differs enough from the last one to be
//! written. Pure functions of values, so they are unit-tested without a cluster.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::api::{
    CertificateStatus, Endpoint, EndpointStatus, IncomingMailProviderStatus as Status,
    MailboxStatus, Reason, ServerStatus, TlsMode, TlsStatus,
};
use crate::check::Outcome;
use crate::probe::Step;

pub const READY: &str = "Ready";
pub const REACHABLE: &str = "Reachable";
pub const AUTHENTICATED: &str = "Authenticated";

/// The inputs every new status needs besides the outcome.
pub struct Context<'a> {
    pub generation: Option<i64>,
    pub now: Timestamp,
    pub check_request: Option<&'a str>,
    /// The test of a changed Secret or ConfigMap: like a new spec, a new value (a fixed
    /// password, a new CA) counts its failures from zero.
    pub new_references: bool,
}

/// Longest server or certificate text kept in status (characters), and most items of a
/// list. The server decides how long its greeting, its capability list and its
/// certificate's names are (a POP3 CAPA answer may be 1,000 lines of 64 KiB within the
/// probe's bounds), and every status write and watch event carries them: status keeps
/// what a person reads, `mailroom check` shows everything.
const TEXT_MAX: usize = 256;
const LIST_MAX: usize = 32;

/// `text` cut to [`TEXT_MAX`] characters, `…` marking a cut.
fn cut(text: &str) -> String {
    crate::probe::cut(text, TEXT_MAX)
}

/// At most [`LIST_MAX`] items, each cut; the last says how many were left out.
fn cut_list(items: &[String]) -> Vec<String> {
    if items.len() <= LIST_MAX {
        return items.iter().map(|i| cut(i)).collect();
    }
    let mut kept: Vec<String> = items[..LIST_MAX - 1].iter().map(|i| cut(i)).collect();
    kept.push(format!("… {} more", items.len() - kept.len()));
    kept
}

/// The status after a test.
pub fn after_test(old: Option<&Status>, outcome: &Outcome, ctx: &Context) -> Status {
    let old = old.cloned().unwrap_or_default();
    // A new spec, or a new value of what it references, starts afresh: the failures
    // before are not its own, its retries start again at 10 s (a count carried over would
    // put them at the interval), and a GitOps health check gives it its three tests.
    let failed_before = if old.observed_generation == ctx.generation && !ctx.new_references {
        old.consecutive_failures
    } else {
        0
    };
    let mut new = Status {
        observed_generation: ctx.generation,
        conditions: old.conditions.clone(),
        endpoint: old.endpoint.clone(),
        // What this test did not reach stays as last seen: "last known" beats "unknown".
        server: old.server.clone(),
        tls: old.tls.clone(),
        mailbox: old.mailbox.clone(),
        last_check_time: Some(Time(ctx.now)),
        last_success_time: old.last_success_time.clone(),
        last_check_duration: outcome.report.as_ref().map(|r| format_duration(r.duration)),
        consecutive_failures: if outcome.is_ready() {
            0
        } else {
            failed_before.saturating_add(1)
        },
        last_handled_check_request: ctx
            .check_request
            .map(str::to_string)
            .or(old.last_handled_check_request.clone()),
    };
    tested_at(&mut new, &outcome.endpoint);
    if outcome.anonymous {
        // No login, no mailbox: counts kept from a login before would read as today's.
        new.mailbox = None;
    }
    if outcome.is_ready() {
        new.last_success_time = Some(Time(ctx.now));
    }
    if let Some(report) = &outcome.report {
        let f = &report.findings;
        if let Some(greeting) = &f.greeting {
            new.server = Some(ServerStatus {
                greeting: Some(cut(greeting)),
                capabilities: cut_list(&f.capabilities),
            });
        }
        if let Some(tls) = &f.tls {
            new.tls = Some(TlsStatus {
                version: tls.version.clone(),
                cipher_suite: tls.cipher_suite.clone(),
                peer_certificate: tls.peer_certificate.as_ref().map(|c| CertificateStatus {
                    subject: cut(&c.subject),
                    issuer: cut(&c.issuer),
                    not_after: c.not_after.clone(),
                    dns_names: cut_list(&c.dns_names),
                }),
            });
        }
        if let Some(m) = &f.mailbox {
            new.mailbox = Some(MailboxStatus {
                name: m.name.clone(),
                messages: m.messages as i64,
                unseen: m.unseen.map(|u| u as i64),
            });
        }
    }
    let (reachable, authenticated) = sub_conditions(outcome);
    let generation = ctx.generation;
    set_condition(
        &mut new.conditions,
        READY,
        outcome.reason.ready_status(),
        outcome.reason.as_str(),
        &outcome.message,
        generation,
        ctx.now,
    );
    set_condition(
        &mut new.conditions,
        REACHABLE,
        reachable.0,
        reachable.1,
        &reachable.2,
        generation,
        ctx.now,
    );
    set_condition(
        &mut new.conditions,
        AUTHENTICATED,
        authenticated.0,
        authenticated.1,
        &authenticated.2,
        generation,
        ctx.now,
    );
    new
}

/// The status while `spec.suspend` is true: Ready Unknown, and Reachable and
/// Authenticated Unknown `NotTested` (a paused mailbox is not one that is down, for a
/// dashboard or alert that reads them); what the last test found (server, TLS, mailbox,
/// times) stays, and the endpoint is the spec's.
pub fn suspended(old: Option<&Status>, endpoint: &Endpoint, ctx: &Context) -> Status {
    let message = "spec.suspend is true: no tests run until it is false";
    let mut new = unknown(old, endpoint, ctx, Reason::Suspended, message);
    for kind in [REACHABLE, AUTHENTICATED] {
        set_condition(
            &mut new.conditions,
            kind,
            "Unknown",
            "NotTested",
            &format!("no connection was attempted: {message}"),
            ctx.generation,
            ctx.now,
        );
    }
    new
}

/// Ready Unknown (Checking) while the first test after `spec.suspend` went back to false
/// runs: the Suspended message ("no tests run") would say the opposite of what happens.
pub fn resuming(old: Option<&Status>, endpoint: &Endpoint, ctx: &Context) -> Status {
    unknown(
        old,
        endpoint,
        ctx,
        Reason::Checking,
        "spec.suspend is false again: testing",
    )
}

/// Whether Ready says the provider is suspended.
pub fn says_suspended(old: Option<&Status>) -> bool {
    ready(old).is_some_and(|r| r.reason == Reason::Suspended.as_str())
}

/// The status of a provider whose first test has not finished (its endpoint shown
/// already: the PORT column reads it).
pub fn checking(old: Option<&Status>, endpoint: &Endpoint, ctx: &Context) -> Status {
    unknown(
        old,
        endpoint,
        ctx,
        Reason::Checking,
        "the first test is running",
    )
}

/// Ready Unknown (Checking) while the test of a changed Secret or ConfigMap runs: the
/// verdict before it was on the old value, and a GitOps health check (Flux, Argo CD) or
/// `kubectl wait` reading it then would take it for the new one's.
///
/// Its message names the verdict it hides: a person reads what was the case, and the
/// result compared with it, not with Checking, when this test never ends (a rollout, a
/// lost Lease): the same failure again is no news, and a fix is.
pub fn checking_again(old: Option<&Status>, endpoint: &Endpoint, ctx: &Context) -> Status {
    let message = match hidden_verdict(ready(old)) {
        Some(reason) => format!("{CHECKING_AGAIN} ({LAST_RESULT}{reason})"),
        None => CHECKING_AGAIN.to_string(),
    };
    unknown(old, endpoint, ctx, Reason::Checking, &message)
}

const CHECKING_AGAIN: &str = "a referenced Secret or ConfigMap changed: testing again";
const LAST_RESULT: &str = "the last result was ";

/// The verdict Ready gives, or, while it says Checking, the one `checking_again` hid.
fn hidden_verdict(ready: Option<&Condition>) -> Option<Reason> {
    let ready = ready?;
    if ready.reason != Reason::Checking.as_str() {
        return Reason::named(&ready.reason);
    }
    let hidden = ready.message.strip_prefix(CHECKING_AGAIN)?;
    Reason::named(
        hidden
            .strip_prefix(" (")?
            .strip_prefix(LAST_RESULT)?
            .strip_suffix(')')?,
    )
}

/// Ready Unknown for `reason`, the endpoint the spec gives, everything else as last seen.
fn unknown(
    old: Option<&Status>,
    endpoint: &Endpoint,
    ctx: &Context,
    reason: Reason,
    message: &str,
) -> Status {
    let mut new = old.cloned().unwrap_or_default();
    new.observed_generation = ctx.generation;
    tested_at(&mut new, endpoint);
    set_condition(
        &mut new.conditions,
        READY,
        "Unknown",
        reason.as_str(),
        message,
        ctx.generation,
        ctx.now,
    );
    new
}

/// Sets the status's endpoint. What was found of another one (its greeting, certificate
/// and mailbox) goes: after a change of host, port, protocol or TLS mode, it would be read
/// as this one's.
fn tested_at(status: &mut Status, endpoint: &Endpoint) {
    let endpoint = endpoint_status(endpoint);
    if status.endpoint.as_ref().is_some_and(|e| *e != endpoint) {
        status.server = None;
        status.tls = None;
        status.mailbox = None;
    }
    status.endpoint = Some(endpoint);
}

fn endpoint_status(e: &Endpoint) -> EndpointStatus {
    EndpointStatus {
        host: e.host.clone(),
        port: i32::from(e.port),
        protocol: e.protocol,
        tls_mode: e.tls_mode,
    }
}

type Cond = (&'static str, &'static str, String);

/// Reachable (DNS, TCP, TLS, greeting) and Authenticated, from where the test stopped.
fn sub_conditions(outcome: &Outcome) -> (Cond, Cond) {
    let not_tested = || {
        (
            "Unknown",
            "NotTested",
            format!("no connection was attempted: {}", outcome.reason),
        )
    };
    let not_reached = || {
        (
            "Unknown",
            "NotReached",
            "the server was not reached far enough to log in".to_string(),
        )
    };
    let Some(report) = &outcome.report else {
        return (not_tested(), not_tested());
    };
    let failed_step = report.failure.as_ref().map(|f| f.step);
    // Reachable: DNS, TCP, TLS and the greeting worked. Capabilities come after the
    // greeting, and after TLS unless STARTTLS is still ahead.
    let tls_done = outcome.endpoint.tls_mode == TlsMode::None || report.findings.tls.is_some();
    let reached = match failed_step {
        None | Some(Step::Authenticate | Step::Mailbox | Step::Logout) => true,
        Some(Step::Capabilities) => report.findings.greeting.is_some() && tls_done,
        Some(_) => false,
    };
    let reachable: Cond = if reached {
        let greeting = report.findings.greeting.clone().unwrap_or_default();
        (
            "True",
            "Connected",
            format!(
                "{} {} answered: {greeting}",
                outcome.endpoint.protocol.as_str(),
                outcome.endpoint
            ),
        )
    } else {
        ("False", outcome.reason.as_str(), outcome.message.clone())
    };
    let authenticated: Cond = if !reached || failed_step == Some(Step::Capabilities) {
        not_reached()
    } else if outcome.anonymous {
        (
            "True",
            "NotRequired",
            "authentication.method is None: no login is tested".to_string(),
        )
    } else if failed_step == Some(Step::Authenticate)
        || outcome.reason == Reason::AuthenticationFailed
    {
        // (A login a server took but opens no mailbox with fails later, and is no login.)
        // A server failing on its side tells nothing of the login.
        let known = if outcome.reason == Reason::ServerUnavailable {
            "Unknown"
        } else {
            "False"
        };
        (known, outcome.reason.as_str(), outcome.message.clone())
    } else {
        let mech = report
            .findings
            .mechanism
            .clone()
            .unwrap_or_else(|| "password".into());
        (
            "True",
            "LoginAccepted",
            format!("the server accepted the login ({mech})"),
        )
    };
    (reachable, authenticated)
}

/// Sets one condition, keeping lastTransitionTime when the status did not change.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) {
    let message: String = message.chars().take(1024).collect();
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = Time(now);
            }
            c.status = status.into();
            c.reason = reason.into();
            c.message = message;
            c.observed_generation = generation;
        }
        None => conditions.push(Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message,
            observed_generation: generation,
            last_transition_time: Time(now),
        }),
    }
    conditions.sort_by_key(|c| match c.type_.as_str() {
        READY => 0,
        REACHABLE => 1,
        AUTHENTICATED => 2,
        _ => 3,
    });
}

/// True when `new` says something `old` did not: anything but the timing fields
/// (lastCheckTime, lastCheckDuration, lastSuccessTime), which alone are only worth a
/// heartbeat write.
pub fn differs(old: Option<&Status>, new: &Status) -> bool {
    let Some(old) = old else { return true };
    let strip = |s: &Status| Status {
        last_check_time: None,
        last_check_duration: None,
        last_success_time: None,
        ..s.clone()
    };
    strip(old) != strip(new)
}

/// Whether a verdict reached without a test (a read refused, a spec mailroom cannot use)
/// is worth a write: once, not at every look, for each of these looks counts a failure
/// and each write brings the next look; again for a new spec or a new test request, which
/// `mailroom retest` and `kubectl wait` wait to see answered.
pub fn untested_news(old: Option<&Status>, new: &Status) -> bool {
    let said = |s: Option<&Status>| {
        let ready = ready(s).map(|c| (c.reason.clone(), c.message.clone()));
        let answered = s.map(|s| (s.observed_generation, s.last_handled_check_request.clone()));
        (ready, answered)
    };
    said(old) != said(Some(new))
}

/// Whether going from `old` to `new` is worth an Event: Ready changed, and this is not a
/// first result that works. That one changes nothing anybody has seen (the status says
/// it), and 10,000 providers applied at once would mean 10,000 Events for the API server
/// to store. A first failure is one (a Warning), and so is every later change of Ready.
pub fn worth_an_event(old: Option<&Status>, new: &Status) -> bool {
    let Some(after) = ready(Some(new)) else {
        return false;
    };
    match ready(old) {
        Some(before) if before.status == after.status && before.reason == after.reason => false,
        Some(before) if before.reason != Reason::Checking.as_str() => true,
        // A test of a changed Secret that never ended: compared with what it hid.
        before => match hidden_verdict(before) {
            Some(hidden) => hidden.as_str() != after.reason,
            None => after.status != "True",
        },
    }
}

/// The Ready condition of a status, if any.
pub fn ready(status: Option<&Status>) -> Option<&Condition> {
    status?.conditions.iter().find(|c| c.type_ == READY)
}

/// "143ms", "2.5s": short, for people.
pub fn format_duration(d: std::time::Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests;
