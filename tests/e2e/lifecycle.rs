//! The controller's rhythm: suspend, test-on-request, no writes without news, heartbeats
//! at most once per interval, Events on transitions, a spec change re-tested at once,
//! and a clean exit on SIGTERM.

use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};

use crate::support::{ALICE_AUTH, Env, alice_env, condition, provider, ready, trust_bed_ca};

async fn ready_env(prefix: &str, name: &str, extra: &str) -> (Env, crate::support::Controller) {
    let env = alice_env(prefix).await;
    let port = env.bed.dovecot().imaps_port();
    env.apply(&provider(name, "IMAP", port, "Implicit", ALICE_AUTH, extra));
    let controller = env.controller();
    env.wait_reason(name, "Connected", Duration::from_secs(60))
        .await;
    (env, controller)
}

/// Counts the status writes to one provider seen by a watch during `window`.
async fn count_status_writes(env: &Env, name: &str, window: Duration) -> usize {
    let api = env.providers();
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut stream = watcher(api, config).applied_objects().boxed();
    let mut last_status = None;
    let mut writes = 0;
    let deadline = tokio::time::Instant::now() + window;
    loop {
        match tokio::time::timeout_at(deadline, stream.try_next()).await {
            Err(_) => break,
            Ok(Ok(Some(p))) => {
                let status = serde_json::to_string(&p.status).unwrap();
                if last_status.as_ref().is_some_and(|s| *s != status) {
                    writes += 1;
                }
                last_status = Some(status);
            }
            Ok(other) => panic!("watch ended: {other:?}"),
        }
    }
    writes
}

#[tokio::test]
async fn an_unchanged_provider_is_written_at_most_once_per_interval() {
    let (env, controller) = ready_env("quiet", "quiet", "").await;
    let api = env.providers();
    // Unrelated churn: a label on the provider, an unrelated Secret.
    api.patch(
        "quiet",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"metadata": {"labels": {"team": "ops"}}})),
    )
    .await
    .unwrap();
    env.secret("unrelated", &[("k", "v")]).await;
    let writes = count_status_writes(&env, "quiet", Duration::from_secs(15)).await;
    assert_eq!(
        writes,
        0,
        "no status write was expected between intervals; controller log: {}",
        controller.log.display()
    );
    let tests = controller.tests();
    assert_eq!(
        tests,
        1,
        "only the first test was expected:\n{}",
        controller.logs()
    );
}

#[tokio::test]
async fn heartbeats_come_once_per_interval() {
    let (env, _controller) = ready_env("heartbeat", "beat", "").await;
    let api = env.providers();
    api.patch(
        "beat",
        &PatchParams::default(),
        &Patch::Merge(
            serde_json::json!({"spec": {"check": {"interval": "30s", "timeout": "10s"}}}),
        ),
    )
    .await
    .unwrap();
    // The spec change is tested at once, with the new generation in every condition.
    let p = env
        .wait(
            "beat",
            "observedGeneration 2",
            Duration::from_secs(20),
            |p| {
                p.status
                    .as_ref()
                    .is_some_and(|s| s.observed_generation == Some(2))
                    && p.status
                        .as_ref()
                        .unwrap()
                        .conditions
                        .iter()
                        .all(|c| c.observed_generation == Some(2))
            },
        )
        .await;
    assert_eq!(ready(&p).unwrap().reason, "Connected");
    let window = Duration::from_secs(70);
    let writes = count_status_writes(&env, "beat", window).await;
    assert!(
        (1..=2).contains(&writes),
        "expected 1 or 2 heartbeat writes in {window:?} at a 30s interval, saw {writes}"
    );
}

#[tokio::test]
async fn suspend_stops_tests_and_the_annotation_asks_for_one() {
    let (env, controller) = ready_env("suspend", "sus", "").await;
    let out = env.kubectl(&[
        "annotate",
        "imp/sus",
        "mailroom.dev/check-requested-at=first",
        "--overwrite",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p = env
        .wait(
            "sus",
            "lastHandledCheckRequest=first",
            Duration::from_secs(20),
            |p| {
                p.status
                    .as_ref()
                    .and_then(|s| s.last_handled_check_request.as_deref())
                    == Some("first")
            },
        )
        .await;
    assert_eq!(ready(&p).unwrap().reason, "Connected");
    assert_eq!(
        controller.tests(),
        2,
        "one test on request:\n{}",
        controller.logs()
    );

    env.providers()
        .patch(
            "sus",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"suspend": true}})),
        )
        .await
        .unwrap();
    let p = env
        .wait_reason("sus", "Suspended", Duration::from_secs(20))
        .await;
    assert_eq!(ready(&p).unwrap().status, "Unknown");
    // Paused, not down: what the last test found is not carried into the new generation.
    let generation = p.metadata.generation;
    for kind in ["Reachable", "Authenticated"] {
        let c = condition(&p, kind).unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str(), c.observed_generation),
            ("Unknown", "NotTested", generation),
            "{kind}"
        );
    }
    let before = controller.tests();
    let out = env.kubectl(&[
        "annotate",
        "imp/sus",
        "mailroom.dev/check-requested-at=while-suspended",
        "--overwrite",
    ]);
    assert!(out.status.success());
    tokio::time::sleep(Duration::from_secs(3)).await; // a suspended provider must stay untested: nothing to poll for
    assert_eq!(
        controller.tests(),
        before,
        "a suspended provider was tested"
    );

    env.providers()
        .patch(
            "sus",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"suspend": false}})),
        )
        .await
        .unwrap();
    let p = env
        .wait_reason("sus", "Connected", Duration::from_secs(20))
        .await;
    assert_eq!(
        p.status.unwrap().last_handled_check_request.as_deref(),
        Some("while-suspended")
    );
    // Suspending and resuming change Ready: each is an Event, neither a warning.
    assert_eq!(
        events_of(&env, "sus", 2).await,
        vec![
            ("Normal".to_string(), "Connected".to_string()),
            ("Normal".to_string(), "Suspended".to_string())
        ]
    );
}

/// The Events of the test's namespace.
async fn events(env: &Env) -> Vec<Event> {
    let events: Api<Event> = Api::namespaced(env.client.clone(), &env.ns);
    events.list(&ListParams::default()).await.unwrap().items
}

/// The (type, reason) of the Events about provider `name`, sorted, once there are at
/// least `wanted` (or after 20 s).
async fn events_of(env: &Env, name: &str, wanted: usize) -> Vec<(String, String)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut seen: Vec<(String, String)> = events(env)
            .await
            .iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .map(|e| {
                (
                    e.type_.clone().unwrap_or_default(),
                    e.reason.clone().unwrap_or_default(),
                )
            })
            .collect();
        seen.sort();
        if seen.len() >= wanted || Instant::now() > deadline {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test]
async fn transitions_are_recorded_as_events_and_sigterm_exits_cleanly() {
    let env = Env::new("events").await;
    trust_bed_ca(&env).await;
    env.secret("alice", &[("username", "alice"), ("password", "wrong")])
        .await;
    let port = env.bed.dovecot().imaps_port();
    env.apply(&provider("ev", "IMAP", port, "Implicit", ALICE_AUTH, ""));
    let mut controller = env.controller();
    env.wait_reason("ev", "AuthenticationFailed", Duration::from_secs(60))
        .await;
    let (_, password) = env.bed.dovecot().account("alice");
    env.secret("alice", &[("username", "alice"), ("password", &password)])
        .await;
    env.wait_reason("ev", "Connected", Duration::from_secs(20))
        .await;

    let reasons = events_of(&env, "ev", 2).await;
    assert_eq!(
        reasons,
        vec![
            ("Normal".to_string(), "Connected".to_string()),
            ("Warning".to_string(), "AuthenticationFailed".to_string())
        ]
    );
    let out = env.kubectl(&["describe", "imp", "ev"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("AuthenticationFailed") && text.contains("Connected"),
        "kubectl describe:\n{text}"
    );

    let status = controller
        .terminate(Duration::from_secs(15))
        .expect("the controller should exit within 15s of SIGTERM");
    assert!(
        status.success(),
        "exit status after SIGTERM: {status:?}\n{}",
        controller.logs()
    );
}

/// A server on the bed's mail address that accepts connections and never speaks: its port,
/// and a message for each connection.
fn tarpit() -> (u16, std::sync::mpsc::Receiver<()>) {
    let tarpit = std::net::TcpListener::bind((mailroom_testbed::MAIL_HOST, 0)).unwrap();
    let port = tarpit.local_addr().unwrap().port();
    let (accepted, connected) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in tarpit.incoming().flatten() {
            held.push(conn);
            let _ = accepted.send(());
        }
    });
    (port, connected)
}

/// The first test after a suspension, while it runs (a slow server here), shows Checking
/// with what is happening, not the Suspended words ("no tests run") that say otherwise.
#[tokio::test]
async fn a_provider_resumed_says_it_is_testing_while_its_first_test_runs() {
    let env = Env::new("resume").await;
    trust_bed_ca(&env).await;
    let (port, connected) = tarpit();
    env.apply(
        &provider("slow", "IMAP", port, "None", "{method: None}", "")
            .replace("timeout: 10s", "timeout: 2m")
            .replace("  check:", "  suspend: true\n  check:"),
    );
    let controller = env.controller();
    env.wait_reason("slow", "Suspended", Duration::from_secs(30))
        .await;
    env.providers()
        .patch(
            "slow",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"suspend": false}})),
        )
        .await
        .unwrap();
    connected
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("not connected once resumed ({e}):\n{}", controller.logs()));
    let p = env
        .wait_reason("slow", "Checking", Duration::from_secs(15))
        .await;
    let ready = ready(&p).unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.message.as_str()),
        ("Unknown", "spec.suspend is false again: testing")
    );
    assert_eq!(ready.observed_generation, p.metadata.generation);
}

#[tokio::test]
async fn sigterm_cancels_a_test_that_outlasts_the_drain_and_exits_within_the_grace_period() {
    let env = Env::new("drain").await;
    trust_bed_ca(&env).await;
    // A server that accepts and never speaks, under a two-minute timeout: the test
    // would take all of it.
    let (port, connected) = tarpit();
    env.apply(
        &provider("slow", "IMAP", port, "None", "{method: None}", "")
            .replace("timeout: 10s", "timeout: 2m"),
    );
    // A pod whose terminationGracePeriodSeconds is 9: tests in flight get 3 s.
    let mut controller = env.controller_with(&["--termination-grace-period=9s"]);
    connected
        .recv_timeout(Duration::from_secs(60))
        .expect("the controller connects to the tarpit");

    let asked = Instant::now();
    let status = controller.terminate(Duration::from_secs(25));
    let took = asked.elapsed();
    assert!(
        status.is_some_and(|s| s.success()),
        "exit after SIGTERM with a test in flight: {status:?} after {took:?}\n{}",
        controller.logs()
    );
    // 3 s of drain, then the lease released: within the 9 s before the kubelet's SIGKILL.
    assert!(
        took < Duration::from_secs(9),
        "took {took:?}:\n{}",
        controller.logs()
    );
    assert!(
        controller.logs().contains("cancelled=1"),
        "the log says a test was cancelled:\n{}",
        controller.logs()
    );
    // The cancelled test wrote no verdict (a Checking status, written while it waited,
    // carries no lastCheckTime).
    let p = env.providers().get("slow").await.unwrap();
    let status = p.status.unwrap_or_default();
    assert!(
        status.last_check_time.is_none(),
        "a cancelled test writes no verdict: {status:?}"
    );
}

/// A Secret changed or deleted while no controller ran (a restart, a failover, a rollout)
/// is tested as soon as the next one starts, as a change its watch saw would be; a
/// provider whose objects did not change keeps its schedule (5 m here).
#[tokio::test]
async fn a_secret_changed_while_no_controller_ran_is_tested_when_one_starts() {
    let env = alice_env("changed-between").await;
    let (user, _) = env.bed.dovecot().account("alice");
    env.apply_alice_imaps_with("kept", "kept").await;
    env.apply_alice_imaps("changed");
    env.apply_alice_imaps_with("deleted", "gone").await;
    let mut first = env.controller();
    env.wait_reason("changed", "Connected", Duration::from_secs(60))
        .await;
    env.wait_reason("deleted", "Connected", Duration::from_secs(60))
        .await;
    let kept = env
        .wait_reason("kept", "Connected", Duration::from_secs(60))
        .await;
    let checked = kept.status.unwrap().last_check_time;
    first
        .terminate(Duration::from_secs(15))
        .expect("the controller should exit on SIGTERM");

    // In a later second than the last test (both times are whole seconds).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    env.secret(
        "alice",
        &[("username", &user), ("password", "changed-meanwhile")],
    )
    .await;
    // And one deleted: a deletion leaves no time to compare.
    let out = env.kubectl(&["delete", "secret", "gone"]);
    assert!(out.status.success(), "{out:?}");
    let _second = env.controller();
    env.wait_reason("changed", "AuthenticationFailed", Duration::from_secs(20))
        .await;
    env.wait_reason("deleted", "SecretNotFound", Duration::from_secs(20))
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let kept = env.providers().get("kept").await.unwrap();
    assert_eq!(
        kept.status.unwrap().last_check_time,
        checked,
        "a provider whose Secret did not change is not tested again after the restart"
    );
}

/// A Secret change the running controller tested, with the same verdict, still writes a
/// new lastCheckTime: the next controller (a restart) does not take the change for one
/// nobody tested, and does not test again.
#[tokio::test]
async fn a_secret_change_tested_with_the_same_verdict_is_not_tested_again_after_a_restart() {
    let env = alice_env("changed-same").await;
    let (user, password) = env.bed.dovecot().account("alice");
    env.apply_alice_imaps("imaps");
    let mut first = env.controller();
    let p = env
        .wait_reason("imaps", "Connected", Duration::from_secs(60))
        .await;
    let checked = p.status.unwrap().last_check_time.unwrap().0;
    // In a later second than the last test (both times are whole seconds).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    env.secret(
        "alice",
        &[
            ("username", &user),
            ("password", &password),
            ("note", "rotated"),
        ],
    )
    .await;
    let p = env
        .wait("imaps", "the change tested", Duration::from_secs(20), |p| {
            p.status
                .as_ref()
                .and_then(|s| s.last_check_time.as_ref())
                .is_some_and(|t| t.0 > checked)
        })
        .await;
    assert_eq!(ready(&p).unwrap().reason, "Connected");
    let tested = p.status.unwrap().last_check_time;
    first
        .terminate(Duration::from_secs(15))
        .expect("the controller should exit on SIGTERM");

    let second = env.controller();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !second.logs().contains("caches synced") {
        assert!(Instant::now() < deadline, "{}", second.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        second.tests(),
        0,
        "tested again after the restart:\n{}",
        second.logs()
    );
    let p = env.providers().get("imaps").await.unwrap();
    assert_eq!(p.status.unwrap().last_check_time, tested);
}

/// Secrets applied with the providers that use them, each Secret just before its
/// provider (as Helm, Argo CD and Flux order a batch): no provider is ever said to miss
/// its Secret, though the controller learns of Secrets and providers on separate watches
/// and tests a new provider at once. A blip of `SecretNotFound` would fail a Flux
/// Kustomization that waits for health.
#[tokio::test]
async fn secrets_applied_just_before_their_providers_are_never_said_missing() {
    let env = Env::new("batch").await;
    trust_bed_ca(&env).await;
    let _controller = env.controller();
    // Started and holding its Lease before the batch, so each provider is tested as it
    // arrives.
    env.apply_alice_imaps_with("first", "first").await;
    env.wait_reason("first", "Connected", Duration::from_secs(60))
        .await;
    let (user, password) = env.bed.dovecot().account("alice");
    let port = env.bed.dovecot().imaps_port();
    const N: usize = 60;
    let mut batch = String::new();
    for i in 0..N {
        batch.push_str(&format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: login-{i}}}\nstringData: {{username: {user}, password: {password}}}\n---\n"
        ));
        let auth = format!("{{method: Password, secretRef: {{name: login-{i}}}}}");
        batch.push_str(&provider(
            &format!("p-{i}"),
            "IMAP",
            port,
            "Implicit",
            &auth,
            "",
        ));
        batch.push_str("---\n");
    }
    env.apply(&batch);
    for i in 0..N {
        env.wait_reason(&format!("p-{i}"), "Connected", Duration::from_secs(60))
            .await;
    }
    let missing: Vec<String> = events(&env)
        .await
        .iter()
        .filter(|e| e.reason.as_deref() == Some("SecretNotFound"))
        .map(|e| {
            format!(
                "{:?}: {:?}",
                e.regarding.as_ref().and_then(|r| r.name.clone()),
                e.note
            )
        })
        .collect();
    assert!(missing.is_empty(), "said missing: {missing:#?}");
}

/// A Secret whose watch lags behind the providers' (a loaded API server: here its answers
/// come 8 s late, on purpose): a provider applied just after its Secret is not said to
/// miss it, for the controller reads a Secret its cache has not seen from the API server;
/// nor is it tested again when the Secret's event comes.
#[tokio::test]
async fn a_secret_the_cache_has_not_seen_yet_is_read_from_the_api_server() {
    let env = Env::new("lagging-secrets").await;
    trust_bed_ca(&env).await;
    let relay = crate::api_relay::DelayingRelay::start(&env, Duration::from_secs(8), |line| {
        line.contains("/secrets?") && line.contains("watch=true")
    })
    .await;
    let controller =
        env.controller_with_env(&[], &[("KUBECONFIG", relay.kubeconfig.to_str().unwrap())]);
    // Started, holding its Lease and with its caches listed.
    env.apply(&provider(
        "anon",
        "IMAP",
        env.bed.dovecot().imaps_port(),
        "Implicit",
        "{method: None}",
        "",
    ));
    env.wait_reason("anon", "Connected", Duration::from_secs(60))
        .await;
    env.apply_alice_imaps_with("p", "late").await;
    env.wait_reason("p", "Connected", Duration::from_secs(6))
        .await;
    // The Secret's event, 8 s late, finds it tested with that very Secret.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let tests = controller
        .logs()
        .lines()
        .filter(|l| l.contains(" tested") && l.contains("name=p}"))
        .count();
    assert_eq!(tests, 1, "{}", controller.logs());
    let seen = events_of(&env, "p", 0).await;
    assert!(
        !seen.iter().any(|(_, reason)| reason == "SecretNotFound"),
        "{seen:?}"
    );
}
