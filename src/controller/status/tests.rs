use std::time::Duration;

use super::*;
use crate::api::{Endpoint, Protocol, TlsMode};
use crate::probe::{Failure, Findings, MailboxInfo, Report};

fn at(secs: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + secs).unwrap()
}

fn endpoint() -> Endpoint {
    Endpoint {
        host: "127.0.0.1".into(),
        port: 993,
        protocol: Protocol::Imap,
        tls_mode: TlsMode::Implicit,
    }
}

fn findings() -> Findings {
    Findings {
        greeting: Some("* OK Dovecot ready.".into()),
        capabilities: vec!["IMAP4rev1".into()],
        tls: None,
        authenticated: true,
        mechanism: Some("PLAIN".into()),
        mailbox: Some(MailboxInfo {
            name: "INBOX".into(),
            messages: 3,
            unseen: Some(2),
        }),
    }
}

fn success() -> Outcome {
    Outcome {
        endpoint: endpoint(),
        report: Some(Report {
            steps: vec![],
            findings: findings(),
            failure: None,
            duration: Duration::from_millis(21),
        }),
        reason: Reason::Connected,
        message: "ok".into(),
        anonymous: false,
    }
}

fn failure(step: Step, reason: Reason, f: Findings) -> Outcome {
    Outcome {
        endpoint: endpoint(),
        report: Some(Report {
            steps: vec![],
            findings: f,
            failure: Some(Failure {
                reason,
                step,
                message: "server said no".into(),
            }),
            duration: Duration::from_millis(5),
        }),
        reason,
        message: "server said no".into(),
        anonymous: false,
    }
}

fn ctx(now: i64) -> Context<'static> {
    Context {
        generation: Some(3),
        now: at(now),
        check_request: None,
        new_references: false,
    }
}

fn cond<'a>(s: &'a Status, t: &str) -> &'a Condition {
    s.conditions.iter().find(|c| c.type_ == t).unwrap()
}

#[test]
fn a_success_fills_everything_in() {
    let s = after_test(None, &success(), &ctx(0));
    assert_eq!(s.observed_generation, Some(3));
    assert_eq!(cond(&s, READY).status, "True");
    assert_eq!(cond(&s, READY).reason, "Connected");
    assert_eq!(cond(&s, REACHABLE).status, "True");
    assert_eq!(cond(&s, AUTHENTICATED).status, "True");
    assert_eq!(s.mailbox.as_ref().unwrap().unseen, Some(2));
    assert_eq!(s.last_check_duration.as_deref(), Some("21ms"));
    assert_eq!(s.consecutive_failures, 0);
    assert!(s.last_success_time.is_some());
    let types: Vec<_> = s.conditions.iter().map(|c| c.type_.as_str()).collect();
    assert_eq!(types, vec![READY, REACHABLE, AUTHENTICATED]);
}

#[test]
fn an_auth_failure_is_reachable_but_not_authenticated() {
    let mut f = findings();
    f.authenticated = false;
    f.mailbox = None;
    let first = after_test(None, &success(), &ctx(0));
    let s = after_test(
        Some(&first),
        &failure(Step::Authenticate, Reason::AuthenticationFailed, f),
        &ctx(10),
    );
    assert_eq!(cond(&s, READY).status, "False");
    assert_eq!(cond(&s, REACHABLE).status, "True");
    assert_eq!(cond(&s, AUTHENTICATED).reason, "AuthenticationFailed");
    assert_eq!(s.consecutive_failures, 1);
    // What this test did not reach stays as last seen.
    assert_eq!(s.mailbox, first.mailbox);
    assert_eq!(s.last_success_time, first.last_success_time);
}

#[test]
fn a_login_taken_that_opens_no_mailbox_is_not_authenticated() {
    let mut f = findings();
    f.mailbox = None;
    let s = after_test(
        None,
        &failure(Step::Mailbox, Reason::AuthenticationFailed, f),
        &ctx(0),
    );
    assert_eq!(cond(&s, REACHABLE).status, "True");
    assert_eq!(cond(&s, AUTHENTICATED).status, "False");
    assert_eq!(cond(&s, AUTHENTICATED).reason, "AuthenticationFailed");
    // A mailbox that does not exist, after a login, is still a login accepted.
    let s = after_test(
        None,
        &failure(Step::Mailbox, Reason::MailboxUnavailable, findings()),
        &ctx(0),
    );
    assert_eq!(cond(&s, AUTHENTICATED).status, "True");
}

#[test]
fn capabilities_failing_after_the_greeting_and_tls_leave_the_server_reachable() {
    let greeted = Findings {
        tls: Some(crate::probe::TlsInfo {
            version: "TLSv1.3".into(),
            cipher_suite: "TLS13_AES_128_GCM_SHA256".into(),
            peer_certificate: None,
        }),
        authenticated: false,
        mechanism: None,
        mailbox: None,
        ..findings()
    };
    let s = after_test(
        None,
        &failure(Step::Capabilities, Reason::Timeout, greeted.clone()),
        &ctx(0),
    );
    assert_eq!(cond(&s, REACHABLE).status, "True");
    assert_eq!(cond(&s, AUTHENTICATED).status, "Unknown");
    assert_eq!(cond(&s, READY).reason, "Timeout");
    // Before STARTTLS, TLS has not worked yet.
    let mut starttls = failure(
        Step::Capabilities,
        Reason::Timeout,
        Findings {
            tls: None,
            ..greeted
        },
    );
    starttls.endpoint.tls_mode = TlsMode::StartTls;
    let s = after_test(None, &starttls, &ctx(0));
    assert_eq!(cond(&s, REACHABLE).status, "False");
}

#[test]
fn a_connection_failure_leaves_authentication_unknown() {
    let f = Findings::default();
    let s = after_test(
        None,
        &failure(Step::Connect, Reason::ConnectionRefused, f),
        &ctx(0),
    );
    assert_eq!(cond(&s, REACHABLE).status, "False");
    assert_eq!(cond(&s, REACHABLE).reason, "ConnectionRefused");
    assert_eq!(cond(&s, AUTHENTICATED).status, "Unknown");
}

#[test]
fn transition_time_moves_only_when_the_status_does() {
    let a = after_test(None, &success(), &ctx(0));
    let b = after_test(Some(&a), &success(), &ctx(60));
    assert_eq!(
        cond(&b, READY).last_transition_time,
        cond(&a, READY).last_transition_time
    );
    let c = after_test(
        Some(&b),
        &failure(
            Step::Connect,
            Reason::ConnectionRefused,
            Findings::default(),
        ),
        &ctx(120),
    );
    assert_eq!(cond(&c, READY).last_transition_time.0, at(120));
}

#[test]
fn only_news_is_worth_a_write() {
    let a = after_test(None, &success(), &ctx(0));
    let b = after_test(Some(&a), &success(), &ctx(60));
    assert!(!differs(Some(&a), &b), "only the timing moved");
    let mut more_mail = success();
    more_mail
        .report
        .as_mut()
        .unwrap()
        .findings
        .mailbox
        .as_mut()
        .unwrap()
        .messages = 4;
    assert!(differs(
        Some(&a),
        &after_test(Some(&a), &more_mail, &ctx(60))
    ));
    let requested = Context {
        check_request: Some("now"),
        ..ctx(60)
    };
    assert!(differs(
        Some(&a),
        &after_test(Some(&a), &success(), &requested)
    ));
    assert!(differs(None, &a));
}

#[test]
fn suspension_keeps_what_was_known() {
    let a = after_test(None, &success(), &ctx(0));
    // Suspending is a change of the spec: a new generation.
    let later = |now| Context {
        generation: Some(4),
        ..ctx(now)
    };
    let s = suspended(Some(&a), &endpoint(), &later(5));
    assert_eq!(cond(&s, READY).status, "Unknown");
    assert_eq!(cond(&s, READY).reason, "Suspended");
    // Not down: not tested, for the spec's generation.
    for kind in [REACHABLE, AUTHENTICATED] {
        assert_eq!(cond(&s, kind).status, "Unknown", "{kind}");
        assert_eq!(cond(&s, kind).reason, "NotTested", "{kind}");
        assert_eq!(cond(&s, kind).observed_generation, Some(4), "{kind}");
    }
    assert_eq!(s.mailbox, a.mailbox);
    assert!(!differs(
        Some(&s),
        &suspended(Some(&s), &endpoint(), &later(10))
    ));
    // Created suspended: the PORT column still shows the spec's endpoint.
    let fresh = suspended(None, &endpoint(), &ctx(5));
    assert_eq!(cond(&fresh, REACHABLE).reason, "NotTested");
    assert_eq!(
        fresh.endpoint.map(|e| e.port),
        Some(i32::from(endpoint().port))
    );
}

#[test]
fn events_record_changes_and_first_failures_not_first_successes() {
    let ok = after_test(None, &success(), &ctx(0));
    let refused = after_test(
        None,
        &failure(
            Step::Connect,
            Reason::ConnectionRefused,
            Findings::default(),
        ),
        &ctx(0),
    );
    let checking = checking(None, &endpoint(), &ctx(0));
    assert!(!worth_an_event(None, &ok), "a first success is no change");
    assert!(!worth_an_event(Some(&checking), &ok), "nor after Checking");
    assert!(worth_an_event(None, &refused), "a first failure is");
    assert!(worth_an_event(Some(&checking), &refused));
    assert!(!worth_an_event(Some(&ok), &ok), "nothing changed");
    let broke = after_test(
        Some(&ok),
        &failure(
            Step::Connect,
            Reason::ConnectionRefused,
            Findings::default(),
        ),
        &ctx(10),
    );
    assert!(worth_an_event(Some(&ok), &broke), "Connected to refused");
    let fixed = after_test(Some(&broke), &success(), &ctx(20));
    assert!(worth_an_event(Some(&broke), &fixed), "refused to Connected");
}

#[test]
fn server_text_in_status_is_bounded() {
    // A server may send a 64 KiB greeting and 1,000 capabilities, and a certificate may
    // carry thousands of names; every status write and watch event would carry them.
    let mut f = findings();
    f.greeting = Some("g".repeat(70_000));
    f.capabilities = (0..1000).map(|i| format!("X-CAP-{i}")).collect();
    f.capabilities[0] = "é".repeat(300);
    f.tls = Some(crate::probe::TlsInfo {
        version: "TLSv1.3".into(),
        cipher_suite: "TLS13_AES_256_GCM_SHA384".into(),
        peer_certificate: Some(crate::probe::CertInfo {
            subject: "CN=".to_string() + &"s".repeat(5000),
            issuer: "CN=ca".into(),
            not_after: "2030-01-01T00:00:00Z".into(),
            dns_names: (0..500).map(|i| format!("h{i}.example")).collect(),
        }),
    });
    let mut outcome = success();
    outcome.report.as_mut().unwrap().findings = f;
    let s = after_test(None, &outcome, &ctx(0));

    let server = s.server.unwrap();
    let greeting = server.greeting.unwrap();
    assert_eq!(greeting.chars().count(), TEXT_MAX + 1);
    assert!(greeting.ends_with('…'));
    assert_eq!(server.capabilities.len(), LIST_MAX);
    assert_eq!(server.capabilities[0], "é".repeat(TEXT_MAX) + "…");
    assert_eq!(server.capabilities[1], "X-CAP-1");
    assert_eq!(server.capabilities[LIST_MAX - 1], "… 969 more");
    let cert = s.tls.unwrap().peer_certificate.unwrap();
    assert_eq!(cert.subject.chars().count(), TEXT_MAX + 1);
    assert_eq!(cert.issuer, "CN=ca");
    assert_eq!(cert.dns_names.len(), LIST_MAX);
    assert_eq!(cert.dns_names[LIST_MAX - 1], "… 469 more");
    // Short lists and text stay whole.
    let s = after_test(None, &success(), &ctx(0));
    assert_eq!(s.server.unwrap().capabilities, vec!["IMAP4rev1"]);
}

fn tls_findings() -> Findings {
    Findings {
        tls: Some(crate::probe::TlsInfo {
            version: "TLSv1.3".into(),
            cipher_suite: "TLS13_AES_256_GCM_SHA384".into(),
            peer_certificate: None,
        }),
        ..findings()
    }
}

#[test]
fn what_was_found_of_another_endpoint_goes_with_it() {
    let mut ok = success();
    ok.report.as_mut().unwrap().findings = tls_findings();
    let a = after_test(None, &ok, &ctx(0));
    assert!(a.server.is_some() && a.tls.is_some() && a.mailbox.is_some());
    // The same endpoint failing before the greeting: last known beats unknown.
    let refused = failure(
        Step::Connect,
        Reason::ConnectionRefused,
        Findings::default(),
    );
    let b = after_test(Some(&a), &refused, &ctx(10));
    assert_eq!(
        (&b.server, &b.tls, &b.mailbox),
        (&a.server, &a.tls, &a.mailbox)
    );
    // Another host (or port, protocol, TLS mode) failing: nothing of the old server is
    // shown as the new one's.
    let elsewhere = |mut outcome: Outcome, change: fn(&mut Endpoint)| {
        change(&mut outcome.endpoint);
        outcome
    };
    let changes: [fn(&mut Endpoint); 4] = [
        |e| e.host = "imap.example".into(),
        |e| e.port = 143,
        |e| e.protocol = Protocol::Pop3,
        |e| e.tls_mode = TlsMode::None,
    ];
    for change in changes {
        let c = after_test(Some(&a), &elsewhere(refused.clone(), change), &ctx(20));
        assert_eq!((&c.server, &c.tls, &c.mailbox), (&None, &None, &None));
    }
    // Plaintext reached: the TLS session of the old endpoint does not stay beside it.
    let mut plain = elsewhere(success(), |e| e.tls_mode = TlsMode::None);
    plain.report.as_mut().unwrap().findings.tls = None;
    let d = after_test(Some(&a), &plain, &ctx(30));
    assert!(d.tls.is_none() && d.server.is_some() && d.mailbox.is_some());
    // So for a suspended provider whose spec names another server.
    let mut moved = endpoint();
    moved.host = "imap.example".into();
    let s = suspended(Some(&a), &moved, &ctx(40));
    assert_eq!((&s.server, &s.tls, &s.mailbox), (&None, &None, &None));
    assert_eq!(s.endpoint.unwrap().host, "imap.example");
}

#[test]
fn a_test_without_login_keeps_no_mailbox_counts() {
    let a = after_test(None, &success(), &ctx(0));
    let mut anonymous = success();
    anonymous.anonymous = true;
    anonymous.report.as_mut().unwrap().findings.mailbox = None;
    let b = after_test(Some(&a), &anonymous, &ctx(10));
    assert_eq!(b.mailbox, None);
    assert!(b.server.is_some());
}

#[test]
fn a_new_spec_counts_its_failures_afresh() {
    let refused = || {
        failure(
            Step::Connect,
            Reason::ConnectionRefused,
            Findings::default(),
        )
    };
    let a = after_test(None, &refused(), &ctx(0));
    let b = after_test(Some(&a), &refused(), &ctx(10));
    assert_eq!(b.consecutive_failures, 2);
    let edited = Context {
        generation: Some(4),
        ..ctx(20)
    };
    let c = after_test(Some(&b), &refused(), &edited);
    assert_eq!(
        c.consecutive_failures, 1,
        "a new generation's first failure"
    );
    // Resumed after a suspension (itself a new generation): afresh too.
    let s = suspended(
        Some(&c),
        &endpoint(),
        &Context {
            generation: Some(5),
            ..ctx(30)
        },
    );
    let resumed = Context {
        generation: Some(6),
        ..ctx(40)
    };
    assert_eq!(
        after_test(Some(&s), &refused(), &resumed).consecutive_failures,
        1
    );
    // So does the test of a changed Secret or ConfigMap (a password fixed that meets a
    // server restarting), and the one after it goes on counting.
    let changed = Context {
        new_references: true,
        ..ctx(50)
    };
    let d = after_test(Some(&b), &refused(), &changed);
    assert_eq!(d.consecutive_failures, 1);
    assert_eq!(
        after_test(Some(&d), &refused(), &ctx(60)).consecutive_failures,
        2
    );
}

#[test]
fn a_recheck_that_never_ended_is_compared_with_the_verdict_it_hid() {
    let refused = failure(
        Step::Connect,
        Reason::ConnectionRefused,
        Findings::default(),
    );
    let broke = after_test(None, &refused, &ctx(0));
    // A Secret changed; the test showing Checking never ended (a rollout, a lost Lease).
    let checking = checking_again(Some(&broke), &endpoint(), &ctx(10));
    assert_eq!(cond(&checking, READY).reason, "Checking");
    assert!(
        cond(&checking, READY)
            .message
            .ends_with("(the last result was ConnectionRefused)"),
        "{}",
        cond(&checking, READY).message
    );
    // Another change while it still shows Checking: the verdict stays named.
    let again = checking_again(Some(&checking), &endpoint(), &ctx(15));
    assert_eq!(cond(&again, READY).message, cond(&checking, READY).message);
    for before in [&checking, &again] {
        let same = after_test(Some(before), &refused, &ctx(20));
        assert!(!worth_an_event(Some(before), &same), "announced already");
        let fixed = after_test(Some(before), &success(), &ctx(20));
        assert!(worth_an_event(Some(before), &fixed), "a fix is news");
        let other = after_test(
            Some(before),
            &failure(Step::Authenticate, Reason::AuthenticationFailed, findings()),
            &ctx(20),
        );
        assert!(worth_an_event(Some(before), &other), "another failure too");
    }
    // Hiding a success: the same success is no news, a failure is.
    let ok = after_test(None, &success(), &ctx(0));
    let checking = checking_again(Some(&ok), &endpoint(), &ctx(10));
    assert!(!worth_an_event(
        Some(&checking),
        &after_test(Some(&checking), &success(), &ctx(20))
    ));
    assert!(worth_an_event(
        Some(&checking),
        &after_test(Some(&checking), &refused, &ctx(20))
    ));
}

#[test]
fn a_verdict_without_a_test_is_written_once() {
    let invalid = || Outcome {
        endpoint: endpoint(),
        report: None,
        reason: Reason::InvalidSpec,
        message: "spec.check.interval: cannot be read".into(),
        anonymous: false,
    };
    let a = after_test(None, &invalid(), &ctx(0));
    assert!(untested_news(None, &a));
    // Each look counts one more failure: that alone is no news (each write would bring
    // the next look, for ever).
    let b = after_test(Some(&a), &invalid(), &ctx(1));
    assert_eq!(b.consecutive_failures, 2);
    assert!(differs(Some(&a), &b));
    assert!(!untested_news(Some(&a), &b));
    // A new spec or a new test request is answered.
    let edited = Context {
        generation: Some(4),
        ..ctx(2)
    };
    assert!(untested_news(
        Some(&a),
        &after_test(Some(&a), &invalid(), &edited)
    ));
    let requested = Context {
        check_request: Some("now"),
        ..ctx(2)
    };
    assert!(untested_news(
        Some(&a),
        &after_test(Some(&a), &invalid(), &requested)
    ));
}
