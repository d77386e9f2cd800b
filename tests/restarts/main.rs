//! Control-plane restarts: kube-apiserver restarted, and separately etcd restarted, under
//! a running controller. It must keep running, pick its watches up again, and leave no
//! status lost or stale; told to stop while etcd is down, it must still exit cleanly and
//! in time. And a CRD upgrade whose new rule a stored provider breaks. Stopping the API
//! server or changing the CRD disturbs every test of a bed, so these run in their own test
//! binary with their own bed, one at a time.

// Shared with the e2e binary; not every helper is used here.
#[allow(dead_code)]
#[path = "../e2e/support.rs"]
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use mailroom::api::IncomingMailProvider;
use support::{ALICE_AUTH, Controller, Env, alice_env, condition, provider, ready, with_input};

/// How long the part stays down once stopped: longer than the controller's 6 s lease
/// (see `Env::controller`), so the leader must pause its tests before the Lease it cannot
/// renew expires (a standby that could reach the API server would take it), and go on
/// once it is renewed; and long enough for a failing provider's 10 s retry to fall inside.
const OUTAGE: Duration = Duration::from_secs(12);

/// How soon after the part is back a change must be acted on. A watch, and the renewal of
/// the Lease (tests resume once a renewal is seen), retry at least every 5 s; the
/// providers' interval is 5 minutes, so only a controller that is running and testing
/// again meets this.
const RECOVERY: Duration = Duration::from_secs(20);

/// The two tests stop parts every test of this binary uses.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    ApiServer,
    Etcd,
}

impl Part {
    fn name(self) -> &'static str {
        match self {
            Part::ApiServer => "apiserver",
            Part::Etcd => "etcd",
        }
    }

    fn stop(self, env: &Env) {
        match self {
            Part::ApiServer => env.bed.stop_apiserver(),
            Part::Etcd => env.bed.stop_etcd(),
        }
        .unwrap_or_else(|e| panic!("stopping {self:?}: {e:#}"));
    }

    fn start(self, env: &Env) {
        match self {
            Part::ApiServer => env.bed.start_apiserver(),
            Part::Etcd => env.bed.start_etcd(),
        }
        .unwrap_or_else(|e| panic!("starting {self:?} again: {e:#}"));
    }
}

/// A CRD upgrade adds a rule that a stored provider breaks (a POP3 provider with another
/// mailbox than INBOX, taken before the rule): its status must still be written. The API
/// server checks the rules again at each status write and spares (ratchets) only a rule
/// whose object is unchanged, which holds for a rule on the spec, not for one on the
/// whole object.
/// The CRD as `mailroom crd` prints it (crds/).
fn crd_yaml() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/crds/incomingmailprovider.yaml"
    ))
    .unwrap()
}

/// Applies a version of the CRD to the bed (server-side, taking its fields over).
fn apply_crd(env: &Env, crd: &str) {
    let mut cmd = env.bed.kubectl();
    cmd.args(["apply", "--server-side", "--force-conflicts", "-f", "-"]);
    let out = with_input(cmd, crd);
    assert!(out.status.success(), "applying the CRD: {out:?}");
}

/// A status write answered 404 for a provider that exists (here the CRD without its
/// status subresource for a while, as during a botched upgrade) is a failed write: the
/// result is kept and written once the API server takes it, with no new login meanwhile;
/// the provider is not taken for deleted (it would never be tested again), nor tested
/// again at once in a loop.
#[tokio::test]
async fn a_404_to_the_status_write_of_a_provider_that_exists_is_retried_not_taken_for_deletion() {
    let _one = ONE_AT_A_TIME.lock().await;
    let env = alice_env("status-404").await;
    let current = crd_yaml();
    let apply = |crd: &str| apply_crd(&env, crd);
    let mut without: serde_yaml::Value = serde_yaml::from_str(&current).unwrap();
    without["spec"]["versions"][0]["subresources"]
        .as_mapping_mut()
        .unwrap()
        .remove("status")
        .expect("the CRD has a status subresource");
    apply(&serde_yaml::to_string(&without).unwrap());
    env.apply(&provider(
        "p",
        "IMAP",
        env.bed.dovecot().imaps_port(),
        "Implicit",
        ALICE_AUTH,
        "",
    ));
    let controller = env.controller();
    let _logs = LogsOnFailure(controller.log.clone());
    // Said once, then the kept result's write is retried (5, 10, 20 s apart), with no test.
    let said = "answered 404 to a status write of this provider, which exists";
    let deadline = Instant::now() + Duration::from_secs(60);
    while !controller.logs().contains(said) || controller.logs().matches("will retry").count() < 3 {
        assert!(
            Instant::now() < deadline,
            "no retried write answered 404:\n{}",
            controller.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        controller.tests(),
        1,
        "tested again while its status could not be written:\n{}",
        controller.logs()
    );
    apply(&current);
    env.wait_reason("p", "Connected", Duration::from_secs(60))
        .await;
    assert_eq!(controller.tests(), 1, "{}", controller.logs());
}

#[tokio::test]
async fn a_provider_stored_before_a_crd_rule_it_breaks_keeps_getting_its_status() {
    let _one = ONE_AT_A_TIME.lock().await;
    let env = alice_env("crd-upgrade").await;
    let current = crd_yaml();
    let apply = |crd: &str| apply_crd(&env, crd);
    // The CRD as it was before the rule.
    let mut before: serde_yaml::Value = serde_yaml::from_str(&current).unwrap();
    let spec =
        &mut before["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let rules = spec["x-kubernetes-validations"].as_sequence_mut().unwrap();
    let count = rules.len();
    rules.retain(|r| !r["rule"].as_str().unwrap().contains("'POP3'"));
    assert_eq!(
        rules.len(),
        count - 1,
        "the POP3 mailbox rule is on the spec"
    );
    apply(&serde_yaml::to_string(&before).unwrap());
    let archive = |name: &str| {
        provider(
            name,
            "POP3",
            env.bed.dovecot().pop3s_port(),
            "Implicit",
            ALICE_AUTH,
            "",
        )
        .replace("timeout: 10s}", "timeout: 10s, mailbox: Archive}")
    };
    let until = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    until("the CRD without the rule took no effect", &|| {
        env.try_apply(&archive("archive")).status.success()
    });
    // The upgrade: the rule refuses a new one, and the stored one is tested and written.
    apply(&current);
    until("the CRD with the rule took no effect", &|| {
        let out = env.try_apply(&archive("another"));
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("IMAP only")
    });
    let controller = env.controller();
    let _logs = LogsOnFailure(controller.log.clone());
    env.wait_reason("archive", "Connected", Duration::from_secs(60))
        .await;
}

#[tokio::test]
async fn a_restarted_apiserver_loses_no_status_and_the_watches_resume_within_seconds() {
    let _one = ONE_AT_A_TIME.lock().await;
    outage_and_recovery(Part::ApiServer).await;
}

#[tokio::test]
async fn a_restarted_etcd_under_a_running_apiserver_loses_no_status() {
    let _one = ONE_AT_A_TIME.lock().await;
    outage_and_recovery(Part::Etcd).await;
}

/// How long a controller told to stop may take when the control plane cannot answer: the
/// chart's terminationGracePeriodSeconds is 30, and a kill is not a clean stop.
const STOP_WITHOUT_CONTROL_PLANE: Duration = Duration::from_secs(20);

#[tokio::test]
async fn a_controller_told_to_stop_while_etcd_is_down_exits_cleanly_in_time() {
    let _one = ONE_AT_A_TIME.lock().await;
    let env = alice_env("stop-during-outage").await;
    env.apply_alice_imaps("imaps");
    let mut controller = env.controller();
    let _logs = LogsOnFailure(controller.log.clone());
    env.wait_reason("imaps", "Connected", Duration::from_secs(60))
        .await;
    // The API server answers, but every write (the lease's release among them) waits for
    // an etcd that is gone: the case a network partition looks like.
    Part::Etcd.stop(&env);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let asked = Instant::now();
    let exited = controller.terminate(STOP_WITHOUT_CONTROL_PLANE);
    let took = asked.elapsed();
    Part::Etcd.start(&env);
    let status = exited.unwrap_or_else(|| {
        panic!("the controller did not exit within {STOP_WITHOUT_CONTROL_PLANE:?} of SIGTERM")
    });
    assert!(status.success(), "exit status {status} after {took:.1?}");
    assert!(
        controller.logs().contains("could not release the lease"),
        "the log should say the lease was not released (a standby waits for it to expire)"
    );
}

/// What the controller's endpoints said while the part was down.
#[derive(Debug, Default)]
struct Meanwhile {
    exited: Option<String>,
    healthz: BTreeMap<u16, usize>,
    readyz: BTreeMap<u16, usize>,
}

/// Five providers against the bed's Dovecot, the controller running, then `part` down for
/// [`OUTAGE`] and up again:
/// - `imaps`, `pop3s`: Connected before; must stay so, untouched (no flap, no new
///   transition time); `imaps` is asked for a test after the restart, which must be
///   echoed.
/// - `rotated`: its Secret turns wrong just as the part stops; must end
///   AuthenticationFailed whether the controller saw the change before or after.
/// - `changed`: its Secret turns wrong after the restart; must fail within seconds.
/// - `recovering`: fails before (no such account), the account appears while the part is
///   down; the status afterwards must say it works.
/// - `created-after`: created after the restart; must be tested.
async fn outage_and_recovery(part: Part) {
    let env = alice_env(&format!("{}-restart", part.name())).await;
    let d = env.bed.dovecot();
    let (user, password) = d.account("alice");
    for secret in ["rotated", "changed"] {
        env.secret(secret, &[("username", &user), ("password", &password)])
            .await;
    }
    let (late_user, late_password) = (format!("late-{}", part.name()), "late-secret-3");
    env.secret(
        "late",
        &[("username", &late_user), ("password", late_password)],
    )
    .await;
    let auth = |secret: &str| format!("{{method: Password, secretRef: {{name: {secret}}}}}");
    let providers = [
        ("imaps", "IMAP", d.imaps_port(), "alice"),
        ("pop3s", "POP3", d.pop3s_port(), "alice"),
        ("rotated", "IMAP", d.imaps_port(), "rotated"),
        ("changed", "POP3", d.pop3s_port(), "changed"),
        ("recovering", "IMAP", d.imaps_port(), "late"),
    ];
    for (name, protocol, port, secret) in providers {
        env.apply(&provider(
            name,
            protocol,
            port,
            "Implicit",
            &auth(secret),
            "",
        ));
    }
    let mut controller = env.controller();
    let _logs = LogsOnFailure(controller.log.clone());
    let mut before = BTreeMap::new();
    for (name, ..) in &providers[..4] {
        let p = env
            .wait_reason(name, "Connected", Duration::from_secs(60))
            .await;
        before.insert(*name, p);
    }
    env.wait_reason(
        "recovering",
        "AuthenticationFailed",
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(controller.get("/healthz").await.0, 200);
    wait_http(&controller, "/readyz", 200, Duration::from_secs(10)).await;
    let addr = controller.http_addr().await;

    // Just before the outage a Secret changes: the controller may see it before the part
    // stops or only when its watch resumes; either way the status must end up saying so.
    env.secret(
        "rotated",
        &[("username", &user), ("password", "wrong-before")],
    )
    .await;
    let log_before = controller.logs().len();
    let down_at = Timestamp::now();
    part.stop(&env);
    // The mail side changes while the cluster cannot be written: only a test run now,
    // and a status kept until the API server takes it, shows this.
    env.bed.set_password(&late_user, late_password);
    if part == Part::Etcd {
        // The distinct case: the API server still answers, but stores nothing.
        let out = env.kubectl(&["get", "--raw", "/livez/ping", "--request-timeout=5s"]);
        assert!(
            out.status.success(),
            "kube-apiserver should keep running while etcd is down: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = env.kubectl(&["annotate", "imp/imaps", "x=y", "--request-timeout=3s"]);
        assert!(
            !out.status.success(),
            "a write should fail while etcd is down"
        );
    }

    let stopped = Instant::now();
    let mut meanwhile = Meanwhile::default();
    while stopped.elapsed() < OUTAGE {
        if let Some(status) = controller.child.try_wait().unwrap() {
            meanwhile.exited = Some(status.to_string());
            break;
        }
        let (code, _) = support::http_get(&addr, "/healthz");
        *meanwhile.healthz.entry(code).or_default() += 1;
        let (code, _) = support::http_get(&addr, "/readyz");
        *meanwhile.readyz.entry(code).or_default() += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let during = controller.logs()[log_before..].to_string();
    part.start(&env);
    let back = Instant::now();
    let back_at = Timestamp::now();
    let down_for = Duration::try_from(down_at.duration_until(back_at)).unwrap();
    eprintln!("{part:?} down for {down_for:.1?}; meanwhile {meanwhile:?}");

    // Alive, and saying so: neither endpoint fails for an outage of the control plane. A
    // liveness failure would have the kubelet restart a process that recovers by itself
    // (and every controller of the cluster at once); readiness gates nothing a controller
    // serves, and a not-ready pod would drop out of its metrics' scrape just when they
    // matter. It also shows the controllers were not restarted meanwhile (that passes
    // through "caches are syncing", 503): a leader that cannot see its Lease renewed
    // pauses its tests, and keeps its caches and its results not yet written.
    assert!(
        meanwhile.exited.is_none(),
        "the controller exited while {part:?} was down ({:?})",
        meanwhile.exited
    );
    assert_eq!(
        meanwhile.healthz.keys().collect::<Vec<_>>(),
        [&200],
        "/healthz while {part:?} was down: {meanwhile:?}"
    );
    assert_eq!(
        meanwhile.readyz.keys().collect::<Vec<_>>(),
        [&200],
        "/readyz while {part:?} was down: {meanwhile:?}"
    );

    // Watches running again: changes made now are acted on within RECOVERY.
    let request = format!("after-{}", part.name());
    env.request_test("imaps", &request);
    env.secret(
        "changed",
        &[("username", &user), ("password", "wrong-after")],
    )
    .await;
    env.apply(&provider(
        "created-after",
        "IMAP",
        d.imaps_port(),
        "Implicit",
        &auth("alice"),
        "",
    ));
    let imaps = env
        .wait(
            "imaps",
            &format!("lastHandledCheckRequest {request}"),
            RECOVERY,
            |p| {
                p.status
                    .as_ref()
                    .and_then(|s| s.last_handled_check_request.as_deref())
                    == Some(request.as_str())
            },
        )
        .await;
    let echoed = back.elapsed();
    let changed = env
        .wait_reason("changed", "AuthenticationFailed", RECOVERY)
        .await;
    let created = env
        .wait_reason("created-after", "Connected", RECOVERY)
        .await;
    let rotated = env
        .wait_reason("rotated", "AuthenticationFailed", RECOVERY)
        .await;
    let recovering = env.wait_reason("recovering", "Connected", RECOVERY).await;
    eprintln!(
        "after {part:?} came back: request echoed in {echoed:.1?}, every change in {:.1?}",
        back.elapsed()
    );

    // Nothing lost or stale: what was true before is still there, unchanged, and each
    // status reflects the last thing that happened.
    let unchanged = |name: &str, after: &IncomingMailProvider| {
        let old = ready(&before[name]).unwrap();
        let new = ready(after).unwrap();
        assert_eq!(
            (&new.status, &new.reason, &new.last_transition_time),
            (&old.status, &old.reason, &old.last_transition_time),
            "{name}: Ready should not have moved over the {part:?} outage; status now:\n{}",
            yaml(after)
        );
        assert_eq!(after.status.as_ref().unwrap().consecutive_failures, 0);
    };
    unchanged("imaps", &imaps);
    let pop3s = env.providers().get("pop3s").await.unwrap();
    unchanged("pop3s", &pop3s);
    assert_eq!(
        pop3s.status.as_ref().unwrap().last_check_time,
        before["pop3s"].status.as_ref().unwrap().last_check_time,
        "pop3s was not due and nothing about it changed: no test, no write"
    );
    for (name, p) in [("changed", &changed), ("rotated", &rotated)] {
        assert_eq!(ready(p).unwrap().status, "False", "{name}:\n{}", yaml(p));
        assert_eq!(
            condition(p, "Authenticated").unwrap().status,
            "False",
            "{name}:\n{}",
            yaml(p)
        );
    }
    assert_eq!(ready(&created).unwrap().status, "True");
    // The account appeared while the part was down: a test from after that is what the
    // status shows.
    let tested = recovering
        .status
        .as_ref()
        .and_then(|s| s.last_success_time.as_ref())
        .map(|t| t.0)
        .expect("recovering: lastSuccessTime");
    let second = SignedDuration::from_secs(1);
    assert!(
        tested >= down_at - second,
        "recovering: expected a test from after {down_at} in the status, which says \
         lastSuccessTime {tested}:\n{}",
        yaml(&recovering)
    );

    // The leader paused its tests when it could not see its Lease renewed, before the
    // Lease could expire (6 s), and finished no test after that while the part was down.
    let paused = during
        .find("the lease was not seen renewed")
        .unwrap_or_else(|| panic!("the leader did not pause over a {down_for:.0?} outage"));
    assert!(
        !during[paused..].contains(" tested"),
        "tested after it paused:\n{during}"
    );

    // Still running, ready, leading, and it neither spun nor tested more for the outage.
    assert!(controller.child.try_wait().unwrap().is_none());
    assert_eq!(controller.get("/healthz").await.0, 200);
    wait_http(&controller, "/readyz", 200, RECOVERY).await;
    let metrics = controller.get("/metrics").await.1;
    assert!(
        metrics.contains("mailroom_leader 1"),
        "the controller should still lead:\n{metrics}"
    );
    let mut tested_during = BTreeMap::<&str, usize>::new();
    for line in during.lines().filter(|l| l.contains(" tested")) {
        if let Some(name) = line
            .split(" name=")
            .nth(1)
            .and_then(|r| r.split(['}', ' ']).next())
        {
            *tested_during.entry(name).or_default() += 1;
        }
    }
    assert!(
        tested_during.values().all(|&n| n <= 2),
        "over a {down_for:.0?} outage a provider is tested once for a change and at most \
         once more on its schedule (10 s after a failure), not again for each failed \
         status write: {tested_during:?}"
    );
    // Each watch retries with a backoff from 0.5 s to 5 s (at least half of that, with
    // jitter): a bounded number of attempts, each logged once.
    let retries = during.matches("watch failed; retrying").count();
    let most = 3 * (5 + down_for.as_secs() as usize * 2 / 5);
    assert!(
        retries <= most,
        "{retries} watch retries in {down_for:.0?}: more than {most}, the backoff is not working"
    );
    if part == Part::ApiServer {
        for watch in ["IncomingMailProviders", "Secrets", "ConfigMaps"] {
            assert!(
                during.contains(&format!("watch=\"{watch}\"")),
                "the {watch} watch should have failed and said it retries"
            );
        }
    }
    let lines = during.lines().count();
    assert!(
        lines < 600,
        "{lines} log lines in a {down_for:.0?} outage: the controller spins"
    );
}

/// Prints the controller's log, without the probe's step lines, if the test fails: the
/// test's folder (where `Env::wait` says the logs are) is gone by the time anyone looks.
struct LogsOnFailure(std::path::PathBuf);

impl Drop for LogsOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let text = std::fs::read_to_string(&self.0).unwrap_or_default();
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| !l.contains("mailroom::probe"))
                .collect();
            eprintln!(
                "--- controller log ({} lines, the probe's steps left out) ---\n{}",
                text.lines().count(),
                lines.join("\n")
            );
        }
    }
}

/// Polls `path` until it answers `code`.
async fn wait_http(controller: &Controller, path: &str, code: u16, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let (got, body) = controller.get(path).await;
        if got == code {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{path}: expected {code} within {within:?}, last {got} {body:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn yaml(p: &IncomingMailProvider) -> String {
    serde_yaml::to_string(&p.status).unwrap()
}
