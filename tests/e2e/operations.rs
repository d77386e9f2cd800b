//! Running it as in a cluster: health and metrics endpoints, and two replicas of which
//! exactly one tests, the other taking over when the leader dies.

use std::time::{Duration, Instant};

use crate::support::{ALICE_AUTH, Controller, Env, alice_env, answered, provider, ready};

async fn two_providers(prefix: &str) -> Env {
    let env = alice_env(prefix).await;
    let d = env.bed.dovecot();
    env.apply_alice_imaps("imaps");
    env.apply(&provider(
        "pop3s",
        "POP3",
        d.pop3s_port(),
        "Implicit",
        ALICE_AUTH,
        "",
    ));
    env
}

/// A Lease deleted under a running leader (`kubectl delete lease`) is created again, and
/// testing goes on: the lease manager creates it only when it starts.
#[tokio::test]
async fn a_deleted_lease_is_created_again_and_testing_goes_on() {
    let env = alice_env("lease-deleted").await;
    env.apply_alice_imaps("imaps");
    let controller = env.controller();
    env.wait_reason("imaps", "Connected", Duration::from_secs(60))
        .await;
    let out = env.kubectl(&["delete", "lease", "mailroom", "--wait=true"]);
    assert!(out.status.success(), "{out:?}");
    let deleted = Instant::now();
    // Past the 6 s Lease: the leader has paused, seeing no Lease renewed.
    tokio::time::sleep(Duration::from_secs(8)).await;
    // Asked for a test now: answered once a replica holds the Lease again.
    let out = env.kubectl(&[
        "annotate",
        "imp/imaps",
        "mailroom.dev/check-requested-at=after-the-lease-was-deleted",
    ]);
    assert!(out.status.success(), "{out:?}");
    env.wait(
        "imaps",
        "the request answered",
        Duration::from_secs(60),
        |p| {
            p.status
                .as_ref()
                .and_then(|s| s.last_handled_check_request.as_deref())
                == Some("after-the-lease-was-deleted")
        },
    )
    .await;
    eprintln!(
        "tested again {:?} after the Lease was deleted",
        deleted.elapsed()
    );
    assert!(
        controller
            .logs()
            .contains("the lease was deleted: created it again"),
        "{}",
        controller.logs()
    );
}

/// A leader that sees another replica holding its Lease (one that took it over a
/// partition, or a second release by mistake) stops testing at once, tests nothing while
/// the other renews it, and takes it again once the other's has expired.
#[tokio::test]
async fn a_leader_whose_lease_another_holds_stops_testing_until_it_expires() {
    let env = alice_env("lease-taken").await;
    env.apply_alice_imaps("imaps");
    let controller = env.controller();
    env.wait_reason("imaps", "Connected", Duration::from_secs(60))
        .await;
    // Another replica takes the Lease and renews it every 2 s for 12 s.
    let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(env.client.clone(), &env.ns);
    let contender = tokio::spawn(async move {
        for _ in 0..6 {
            // A MicroTime: six digits of fraction, as the API server parses it.
            let now = k8s_openapi::jiff::Timestamp::now()
                .strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
                .to_string();
            let patch = serde_json::json!({"spec": {
                "holderIdentity": "another-replica",
                "leaseDurationSeconds": 6,
                "acquireTime": now,
                "renewTime": now,
            }});
            leases
                .patch(
                    "mailroom",
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(&patch),
                )
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !controller
        .logs()
        .contains("lost the lease: testing stopped")
    {
        assert!(
            Instant::now() < deadline,
            "the leader did not see the Lease taken:\n{}",
            controller.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        controller
            .metrics_with(&["mailroom_leader 0"], Duration::from_secs(5))
            .await
            .contains("mailroom_leader 0")
    );
    // A test asked for now waits for the other replica to stop renewing.
    env.request_test("imaps", "while-another-holds-it");
    let answered = |p: &mailroom::api::IncomingMailProvider| answered(p, "while-another-holds-it");
    while !contender.is_finished() {
        let p = env.providers().get("imaps").await.unwrap();
        assert!(
            !answered(&p),
            "tested while another replica held the Lease:\n{}",
            controller.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    contender.await.unwrap();
    // Its Lease expires 6 s after its last renewal; then this one takes it and tests.
    let p = env
        .wait(
            "imaps",
            "the request answered once the Lease is back",
            Duration::from_secs(20),
            answered,
        )
        .await;
    assert_eq!(ready(&p).unwrap().reason, "Connected");
}

/// A connection to the API server that goes silent without closing (its node lost behind
/// a load balancer, a NAT entry dropped) would hold a request for as long as the kernel
/// keeps it, for ever when the far end keeps the socket open: each request is given up
/// after `--request-timeout` and made again on a new connection, so the Lease is renewed
/// and statuses are written; each watch is made again within about a minute, so a Secret
/// changed meanwhile is acted on without waiting for its provider's interval.
#[tokio::test]
async fn requests_on_connections_to_the_api_server_that_went_silent_are_made_again() {
    let env = alice_env("silent-api").await;
    let port = env.bed.dovecot().imaps_port();
    env.apply(
        &provider("imaps", "IMAP", port, "Implicit", ALICE_AUTH, "")
            .replace("interval: 5m", "interval: 30s"),
    );
    // Tested once, then not before five minutes: only a watch can bring its Secret's change.
    let (user, _) = env.bed.dovecot().account("alice");
    env.apply_alice_imaps_with("quiet", "quiet").await;
    let text = std::fs::read_to_string(env.bed.kubeconfig_path()).unwrap();
    let mut config: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let server = &mut config["clusters"][0]["cluster"]["server"];
    let upstream = server.as_str().unwrap().trim_start_matches("https://");
    let relay = FreezingRelay::start(upstream.trim_end_matches('/').to_string()).await;
    *server = format!("https://127.0.0.1:{}", relay.port).into();
    let kubeconfig = env.dir.path().join("relayed.kubeconfig");
    std::fs::write(&kubeconfig, serde_yaml::to_string(&config).unwrap()).unwrap();
    let controller = env.controller_with_env(
        &["--request-timeout", "3s"],
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    );
    let before = env
        .wait_reason("imaps", "Connected", Duration::from_secs(60))
        .await;
    let checked = before.status.unwrap().last_check_time.unwrap().0;
    env.wait_reason("quiet", "Connected", Duration::from_secs(60))
        .await;
    // Every connection open now (the Lease's, the watches', those kept for reuse) goes
    // silent; new ones go through.
    relay.freeze();
    env.secret(
        "quiet",
        &[("username", &user), ("password", "changed-while-silent")],
    )
    .await;
    // The next test is due within the interval and its jitter (33 s).
    env.wait(
        "imaps",
        "a test written after the API server's connections went silent",
        Duration::from_secs(60),
        |p| {
            p.status
                .as_ref()
                .and_then(|s| s.last_check_time.as_ref())
                .is_some_and(|t| t.0 > checked)
        },
    )
    .await;
    assert!(
        controller.logs().contains("request timed out"),
        "a request on a silent connection was given up:\n{}",
        controller.logs()
    );
    // The Secrets' watch went silent with the rest; it is made again within its 60 s
    // and 5 s of grace, and the change is tested at once.
    env.wait_reason("quiet", "AuthenticationFailed", Duration::from_secs(90))
        .await;
}

/// A relay to the API server whose connections can be frozen: each then carries no byte
/// either way and stays open; connections made after the freeze go through.
struct FreezingRelay {
    port: u16,
    freeze: tokio::sync::watch::Sender<u64>,
}

impl FreezingRelay {
    async fn start(upstream: String) -> FreezingRelay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (freeze, _) = tokio::sync::watch::channel(0u64);
        let frozen = freeze.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut frozen = frozen.subscribe();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        // Both ends stay open and silent until the test ends.
                        _ = frozen.changed() => std::future::pending::<()>().await,
                    }
                });
            }
        });
        FreezingRelay { port, freeze }
    }

    fn freeze(&self) {
        self.freeze.send_modify(|n| *n += 1);
    }
}

#[tokio::test]
async fn metrics_health_and_readiness_are_served() {
    let env = two_providers("metrics").await;
    // And one that fails: a POP3 server where IMAP is expected.
    env.apply(&provider(
        "wrong",
        "IMAP",
        env.bed.dovecot().pop3s_port(),
        "Implicit",
        ALICE_AUTH,
        "",
    ));
    let controller = env.controller();
    env.wait_reason("imaps", "Connected", Duration::from_secs(60))
        .await;
    env.wait_reason("pop3s", "Connected", Duration::from_secs(60))
        .await;
    env.wait_reason("wrong", "ProtocolError", Duration::from_secs(60))
        .await;
    assert_eq!(controller.get("/healthz").await.0, 200);
    let (code, body) = controller.get("/readyz").await;
    assert_eq!(code, 200, "{body}");
    // The Event of a first failure is published just after the status write the wait
    // above saw: poll /metrics until every series is there, or the deadline passes.
    let expected = [
        "mailroom_tests_total{protocol=\"IMAP\",reason=\"Connected\"} 1",
        "mailroom_tests_total{protocol=\"POP3\",reason=\"Connected\"} 1",
        "mailroom_test_duration_seconds_bucket{",
        "mailroom_providers{ready=\"True\"} 2",
        "mailroom_providers{ready=\"False\"} 1",
        "mailroom_api_writes_total{kind=\"status\"}",
        // The first failure's; a first success records no Event.
        "mailroom_api_writes_total{kind=\"event\"} 1",
        "mailroom_leader 1",
        "mailroom_token_refreshes_total{result=\"refreshed\"} 0",
        concat!(
            "mailroom_build_info{version=\"",
            env!("CARGO_PKG_VERSION"),
            "\"} 1"
        ),
    ];
    let metrics = controller
        .metrics_with(&expected, Duration::from_secs(10))
        .await;
    for series in expected {
        assert!(
            metrics.contains(series),
            "{series} missing from /metrics:\n{metrics}"
        );
    }
    assert!(
        !metrics.contains(&env.ns) && !metrics.contains("imaps"),
        "no provider names by default:\n{metrics}"
    );
    assert!(
        !metrics.contains(&mailroom_testbed::MAIL_HOST.to_string()),
        "no hosts as labels:\n{metrics}"
    );
}

#[tokio::test]
async fn a_controller_that_cannot_sync_is_alive_but_not_ready() {
    let env = Env::new("notready").await;
    // A kubeconfig whose server accepts connections and never answers: lists never finish.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let kubeconfig = env.dir.path().join("silent.kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: 'http://127.0.0.1:{port}'}}}}]\n\
             users: [{{name: u, user: {{}}}}]\ncontexts: [{{name: x, context: {{cluster: c, user: u}}}}]\ncurrent-context: x\n"
        ),
    )
    .unwrap();
    let log = env.dir.path().join("notready.log");
    let child = std::process::Command::new(crate::support::MAILROOM)
        .args([
            "controller",
            "--namespace",
            &env.ns,
            "--metrics-addr",
            "127.0.0.1:0",
            "--leader-election=false",
        ])
        .env("KUBECONFIG", &kubeconfig)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let controller = Controller { child, log };
    let (health, _) = controller.get("/healthz").await;
    let (ready, body) = controller.get("/readyz").await;
    drop(silent);
    assert_eq!(health, 200);
    assert_eq!(ready, 503, "not ready before the caches sync: {body}");
}

#[tokio::test]
async fn of_two_replicas_one_tests_and_the_other_takes_over_when_it_dies() {
    let env = two_providers("leader").await;
    let mut a = env.controller();
    let mut b = env.controller();
    env.wait_reason("imaps", "Connected", Duration::from_secs(60))
        .await;
    env.wait_reason("pop3s", "Connected", Duration::from_secs(60))
        .await;
    // Both providers tested once, by one replica only; the other stands by.
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.tests() + b.tests() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (leader, standby) = if a.tests() > 0 {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    assert_eq!(
        leader.tests(),
        2,
        "the leader tests each provider once:\n{}",
        leader.logs()
    );
    assert_eq!(
        standby.tests(),
        0,
        "the standby tests nothing:\n{}",
        standby.logs()
    );
    assert_eq!(
        standby.get("/readyz").await.0,
        200,
        "a standby is ready to take over"
    );
    assert!(
        standby
            .get("/metrics")
            .await
            .1
            .contains("mailroom_leader 0")
    );

    // SIGKILL: no chance to release the lease. The standby must take over within the
    // lease duration (6s here) and act on a request for a test.
    leader.child.kill().unwrap();
    leader.child.wait().unwrap();
    let killed = Instant::now();
    let out = env.kubectl(&[
        "annotate",
        "imp/imaps",
        "mailroom.dev/check-requested-at=after-failover",
        "--overwrite",
    ]);
    assert!(out.status.success());
    env.wait(
        "imaps",
        "the request handled by the new leader",
        Duration::from_secs(30),
        |p| {
            p.status
                .as_ref()
                .and_then(|s| s.last_handled_check_request.as_deref())
                == Some("after-failover")
        },
    )
    .await;
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(6 + 5), "take-over took {took:?}");
    // Only the requested one: the other resumes its schedule from its status (interval
    // 5 m), as every provider of a fleet does after a failover.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        standby.tests(),
        1,
        "the new leader tests the requested provider only:\n{}",
        standby.logs()
    );
    eprintln!("failover handled the request {took:?} after the leader was killed");
    // It counts both providers, the one it has not tested (nor written) too: the alerts
    // on these gauges must not go quiet for an interval after a failover.
    let both = "mailroom_providers{ready=\"True\"} 2";
    let metrics = standby.metrics_with(&[both], Duration::from_secs(10)).await;
    assert!(
        metrics.contains(both),
        "the new leader should count both Ready providers:\n{metrics}"
    );

    // A graceful stop releases the lease (logged), so a successor need not wait.
    let status = standby
        .terminate(Duration::from_secs(15))
        .expect("exits on SIGTERM");
    assert!(status.success());
    assert!(
        standby.logs().contains("released the lease"),
        "{}",
        standby.logs()
    );
}

#[tokio::test]
async fn three_shards_test_each_provider_exactly_once_and_resharding_loses_none() {
    use mailroom::controller::shard::shard_of;
    let env = alice_env("shards").await;
    let port = env.bed.dovecot().imaps_port();
    let names: Vec<String> = (0..12).map(|i| format!("box-{i:02}")).collect();
    for name in &names {
        env.apply(
            &provider(name, "IMAP", port, "Implicit", ALICE_AUTH, "")
                .replace("interval: 5m", "interval: 30s"),
        );
    }
    let started = Instant::now();
    let mut shards: Vec<_> = (0..3)
        .map(|i| env.controller_with(&["--shard-index", &i.to_string(), "--shard-count", "3"]))
        .collect();
    for name in &names {
        env.wait_reason(name, "Connected", Duration::from_secs(60))
            .await;
    }
    for (i, c) in shards.iter().enumerate() {
        let expected = names
            .iter()
            .filter(|n| shard_of(&env.ns, n, 3) == i as u32)
            .count();
        assert_eq!(
            c.tests(),
            expected,
            "shard {i} should test its {expected} providers once:\n{}",
            c.logs()
        );
    }
    // Over two intervals (30 s, plus up to 3 s of jitter), each provider is tested by its
    // own shard only, once per interval: twice or three times in all.
    tokio::time::sleep(
        (started + Duration::from_secs(65)).saturating_duration_since(Instant::now()),
    )
    .await;
    for (i, c) in shards.iter().enumerate() {
        let logs = c.logs();
        let mut counts = std::collections::BTreeMap::<&str, usize>::new();
        for tested in logs.lines().filter(|l| l.contains(" tested")) {
            let name = tested
                .split(" name=")
                .nth(1)
                .and_then(|n| n.split(['}', ' ']).next())
                .unwrap();
            *counts.entry(name).or_default() += 1;
        }
        for (name, n) in &counts {
            assert_eq!(
                shard_of(&env.ns, name, 3),
                i as u32,
                "shard {i} tested {name}:\n{logs}"
            );
            assert!(
                (2..=3).contains(n),
                "{name} tested {n} times in 65 s:\n{logs}"
            );
        }
        let expected = names
            .iter()
            .filter(|n| shard_of(&env.ns, n, 3) == i as u32)
            .count();
        assert_eq!(counts.len(), expected, "shard {i}:\n{logs}");
    }
    for c in &mut shards {
        assert!(
            c.terminate(Duration::from_secs(15))
                .is_some_and(|s| s.success())
        );
    }

    // Two replicas now: every provider still belongs to one of them.
    let _two: Vec<_> = (0..2)
        .map(|i| env.controller_with(&["--shard-index", &i.to_string(), "--shard-count", "2"]))
        .collect();
    for name in &names {
        let out = env.kubectl(&[
            "annotate",
            &format!("imp/{name}"),
            "mailroom.dev/check-requested-at=reshard",
            "--overwrite",
        ]);
        assert!(out.status.success());
    }
    for name in &names {
        env.wait(
            name,
            "the request handled after re-sharding",
            Duration::from_secs(30),
            |p| {
                p.status
                    .as_ref()
                    .and_then(|s| s.last_handled_check_request.as_deref())
                    == Some("reshard")
            },
        )
        .await;
    }
}

/// A relay in front of Dovecot that counts the connections it accepts and those open
/// through it at once, and holds each for `hold` before passing the greeting on, so that
/// tests overlap.
struct CountingRelay {
    addr: std::net::SocketAddr,
    most: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl CountingRelay {
    async fn start(host: &str, upstream: std::net::SocketAddr, hold: Duration) -> CountingRelay {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = tokio::net::TcpListener::bind((host, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicUsize::new(0));
        let relay = CountingRelay {
            addr,
            most: Arc::default(),
            accepted: Arc::default(),
        };
        let (most, accepted) = (relay.most.clone(), relay.accepted.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                let (open, most) = (open.clone(), most.clone());
                tokio::spawn(async move {
                    // Counted 50 ms after the accept: a test's connection closes before
                    // its slot goes to the next one, but this relay may see the next
                    // connection before it sees the close. Each one is held longer, so
                    // no real overlap is missed.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let now = open.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(hold.saturating_sub(Duration::from_millis(50))).await;
                    if let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        relay
    }

    /// One in front of the bed's IMAPS port, on `host`.
    async fn to_imaps(env: &Env, host: &str, hold: Duration) -> CountingRelay {
        let upstream = (mailroom_testbed::MAIL_HOST, env.bed.dovecot().imaps_port()).into();
        CountingRelay::start(host, upstream, hold).await
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until a first connection came through.
    async fn first_connection(&self) {
        self.connections(1, "the first test never connected").await;
    }

    /// Waits until `n` connections came through in all; `never` says what did not happen.
    async fn connections(&self, n: usize, never: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.accepted() < n {
            assert!(Instant::now() < deadline, "{never}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Provider `first` on `host` behind a relay that holds each test 4 s, tested by a
/// controller allowed one test at a time per host: once this returns, `host`'s one slot
/// is taken for about 4 s, and any other provider's test there waits for it.
async fn hold_the_host(env: &Env, host: &str) -> (CountingRelay, Controller) {
    let relay = CountingRelay::to_imaps(env, host, Duration::from_secs(4)).await;
    env.apply(&through_relay("first", host, &relay));
    let controller = env.controller_with(&["--per-host-concurrency", "1"]);
    relay.first_connection().await;
    (relay, controller)
}

/// Provider `deleted`, on `host` through `relay`, applied while `first` holds a slot its
/// test needs, and deleted while its test waits; returns once `first` is done and a
/// queued test would have connected (at once after it).
async fn deleted_while_queued(env: &Env, host: &str, relay: &CountingRelay) {
    env.apply(&through_relay("deleted", host, relay));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = env.kubectl(&["delete", "imp", "deleted", "--wait=true"]);
    assert!(out.status.success(), "{out:?}");
    env.wait_reason("first", "Connected", Duration::from_secs(30))
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
}

/// A provider of alice's mailbox reached through a relay on `host`.
fn through_relay(name: &str, host: &str, relay: &CountingRelay) -> String {
    provider(name, "IMAP", relay.addr.port(), "Implicit", ALICE_AUTH, "")
        .replace(
            &format!("host: {}", mailroom_testbed::MAIL_HOST),
            &format!("host: {host}"),
        )
        // The certificate names localhost, not the relay's address.
        .replace(
            "tls: {mode: Implicit,",
            "tls: {mode: Implicit, serverName: localhost,",
        )
}

/// The test of a changed Secret that takes a while shows Checking meanwhile, not the
/// verdict on the old value: a health check (Flux, Argo CD) or `kubectl wait` reading the
/// status then would take that for the new value's.
#[tokio::test]
async fn the_test_of_a_changed_secret_shows_checking_while_it_runs() {
    let env = alice_env("checking-again").await;
    let slow = CountingRelay::to_imaps(&env, "127.0.0.19", Duration::from_secs(5)).await;
    env.apply(&through_relay("slow", "127.0.0.19", &slow));
    let _controller = env.controller();
    env.wait_reason("slow", "Connected", Duration::from_secs(60))
        .await;
    let (user, _) = env.bed.dovecot().account("alice");
    env.secret("alice", &[("username", &user), ("password", "not-alices")])
        .await;
    env.wait(
        "slow",
        "Ready Unknown, Checking, while the changed Secret's test runs",
        Duration::from_secs(4),
        |p| {
            ready(p).is_some_and(|c| {
                c.status == "Unknown" && c.reason == "Checking" && c.message.contains("Secret")
            })
        },
    )
    .await;
    env.wait_reason("slow", "AuthenticationFailed", Duration::from_secs(30))
        .await;
}

#[tokio::test]
async fn a_mail_host_never_sees_more_simultaneous_tests_than_per_host_concurrency() {
    let env = alice_env("per-host").await;
    // Its own loopback address: the limit is per host, and no other test uses this one.
    let relay = CountingRelay::to_imaps(&env, "127.0.0.6", Duration::from_millis(300)).await;
    let names: Vec<String> = (0..12).map(|i| format!("mbox-{i:02}")).collect();
    for name in &names {
        env.apply(&through_relay(name, "127.0.0.6", &relay));
    }
    let _controller = env.controller_with(&["--per-host-concurrency", "3"]);
    for name in &names {
        env.wait_reason(name, "Connected", Duration::from_secs(60))
            .await;
    }
    // Twelve tests of 300 ms or more each, queued at once: the bound is reached, never passed.
    assert_eq!(
        relay.most.load(std::sync::atomic::Ordering::SeqCst),
        3,
        "most connections open at once through the relay"
    );
}

#[tokio::test]
async fn a_provider_deleted_while_its_test_waits_for_the_host_is_not_tested() {
    let env = alice_env("deleted-queued").await;
    // Its own loopback address (the limit is per host).
    let (relay, _controller) = hold_the_host(&env, "127.0.0.7").await;
    // The host's one slot is taken for 4 s: this one's test waits for it.
    deleted_while_queued(&env, "127.0.0.7", &relay).await;
    assert_eq!(
        relay.accepted(),
        1,
        "connections to the host: the deleted provider's queued test must not run"
    );
}

/// The same for a test waiting for a slot among all tests (`--concurrency`), which with
/// many hosts busy is the longer wait: its provider is looked at again before it logs in.
#[tokio::test]
async fn a_provider_deleted_while_its_test_waits_for_a_slot_among_all_is_not_tested() {
    let env = alice_env("deleted-queued-all").await;
    // Two hosts of their own: `first` holds the one slot of all for 4 s on one.
    let busy = CountingRelay::to_imaps(&env, "127.0.0.13", Duration::from_secs(4)).await;
    let other = CountingRelay::to_imaps(&env, "127.0.0.14", Duration::ZERO).await;
    env.apply(&through_relay("first", "127.0.0.13", &busy));
    let _controller = env.controller_with(&["--concurrency", "1"]);
    busy.first_connection().await;
    // This one's host is free, but no slot among all is: its test waits.
    deleted_while_queued(&env, "127.0.0.14", &other).await;
    assert_eq!(
        other.accepted(),
        0,
        "connections to the other host: the deleted provider's queued test must not run"
    );
}

#[tokio::test]
async fn a_secret_changed_while_its_test_waits_for_the_host_is_tested_once_with_its_new_value() {
    let env = alice_env("rotated-queued").await;
    let (_, password) = env.bed.dovecot().account("alice");
    env.secret(
        "rotated",
        &[("username", "alice"), ("password", "not-alices-password")],
    )
    .await;
    let (relay, _controller) = hold_the_host(&env, "127.0.0.8").await;
    // The host's one slot is taken for 4 s: this one's test waits for it...
    env.apply(
        &through_relay("rotated", "127.0.0.8", &relay)
            .replace(ALICE_AUTH, "{method: Password, secretRef: {name: rotated}}"),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    // ...and its Secret is fixed meanwhile.
    env.secret("rotated", &[("username", "alice"), ("password", &password)])
        .await;
    env.wait_reason("rotated", "Connected", Duration::from_secs(30))
        .await;
    // The queued test read the new password. Had the schedule kept the old Secret's
    // version, the change would have set off a second test at once after it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        relay.accepted(),
        2,
        "connections to the host: one test per provider"
    );
}

/// Deletes provider `doomed` once its test reached `relay` (which holds it 3 s), and
/// waits until the controller says the result has nowhere to go.
async fn delete_during_its_test(env: &Env, relay: &CountingRelay, controller: &Controller) {
    relay.first_connection().await;
    let out = env.kubectl(&["delete", "imp", "doomed", "--wait=true"]);
    assert!(out.status.success(), "{out:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !controller.logs().contains("deleted during its test") {
        assert!(
            Instant::now() < deadline,
            "the controller never learnt the provider was gone:\n{}",
            controller.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_provider_deleted_during_its_test_is_dropped_without_a_retry() {
    let env = alice_env("deleted-running").await;
    let relay = CountingRelay::to_imaps(&env, "127.0.0.9", Duration::from_secs(3)).await;
    env.apply(&through_relay("doomed", "127.0.0.9", &relay));
    let controller = env.controller();
    // The test ends about 3 s after it connected, and its status has nowhere to go.
    delete_during_its_test(&env, &relay, &controller).await;
    // A retry would be logged with the failed write itself; a second test at once.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let logs = controller.logs();
    assert!(
        !logs.contains("will retry"),
        "a deleted provider is nothing to retry:\n{logs}"
    );
    assert_eq!(relay.accepted(), 1, "and it is not tested again");
}

/// A provider deleted during its test while the controller's watch of providers lags
/// (its answers come 8 s late, on purpose): the API server answers the status write with
/// 404, and the provider, still in the cache, is not tested again on the cache's word (it
/// was, at once and again, one login each time, until the deletion reached the cache).
#[tokio::test]
async fn a_provider_the_api_server_says_is_gone_is_not_tested_again_before_its_watch_says_so() {
    let env = alice_env("gone-lagging").await;
    let relay = CountingRelay::to_imaps(&env, "127.0.0.15", Duration::from_secs(3)).await;
    env.apply(&through_relay("doomed", "127.0.0.15", &relay));
    let api = crate::api_relay::DelayingRelay::start(&env, Duration::from_secs(8), |line| {
        line.contains("/incomingmailproviders?") && line.contains("watch=true")
    })
    .await;
    let controller =
        env.controller_with_env(&[], &[("KUBECONFIG", api.kubeconfig.to_str().unwrap())]);
    delete_during_its_test(&env, &relay, &controller).await;
    // Until the deletion reaches the cache (8 s after it happened) and a while after.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        relay.accepted(),
        1,
        "tested again after the API server said it was gone:\n{}",
        controller.logs()
    );
}

/// A test requested while another runs, with the controller's watch of providers 2 s
/// late: the test that follows starts once the cache shows the status the controller just
/// wrote, and counts on from it. It started from the status before, counted one failure
/// too few (2 for 3), and would have announced again a change already announced.
#[tokio::test]
async fn a_test_right_after_another_builds_on_the_status_just_written_though_the_watch_lags() {
    let env = alice_env("own-write-lag").await;
    env.secret(
        "wrong",
        &[("username", "alice"), ("password", "not-alices-password")],
    )
    .await;
    let relay = CountingRelay::to_imaps(&env, "127.0.0.16", Duration::from_secs(3)).await;
    env.apply(
        &through_relay("lagging", "127.0.0.16", &relay)
            .replace(ALICE_AUTH, "{method: Password, secretRef: {name: wrong}}"),
    );
    let api = crate::api_relay::DelayingRelay::start(&env, Duration::from_secs(2), |line| {
        line.contains("/incomingmailproviders?") && line.contains("watch=true")
    })
    .await;
    let controller =
        env.controller_with_env(&[], &[("KUBECONFIG", api.kubeconfig.to_str().unwrap())]);
    let failures =
        |p: &mailroom::api::IncomingMailProvider| p.status.as_ref().map(|s| s.consecutive_failures);
    env.wait("lagging", "a first failure", Duration::from_secs(60), |p| {
        failures(p) == Some(1)
    })
    .await;
    env.request_test("lagging", "one");
    relay
        .connections(2, "the requested test never connected")
        .await;
    // Asked while that test runs (it is held 3 s): tested once it is done.
    tokio::time::sleep(Duration::from_millis(300)).await;
    env.request_test("lagging", "two");
    let p = env
        .wait(
            "lagging",
            "the second request answered",
            Duration::from_secs(60),
            |p| answered(p, "two"),
        )
        .await;
    assert_eq!(
        failures(&p),
        Some(3),
        "three failed tests:\n{}",
        controller.logs()
    );
    assert_eq!(relay.accepted(), 3);
}

/// A watch gap ended by "410 Gone" (a long disconnection, an API server that lost its
/// watch cache): the providers are listed again, in pages of 500 (the second held back
/// 3 s), and what changed in the gap is acted on once the list is in the cache: a
/// provider created in the gap is tested, and a test requested in the gap is answered.
/// Each provider was reconciled as its page came, from the cache of before the gap: the
/// new one was not there and the request not seen, and neither was acted on until a next
/// test (minutes).
#[tokio::test]
async fn what_changed_in_a_watch_gap_is_acted_on_once_the_list_that_ends_it_is_in() {
    use futures::StreamExt;
    let env = alice_env("relisted").await;
    // More than a page, listed after the two that matter (a list is sorted by name).
    let port = env.bed.dovecot().imaps_port();
    let parked: Vec<mailroom::api::IncomingMailProvider> = (0..510)
        .map(|i| {
            let yaml = provider(
                &format!("z-{i:03}"),
                "IMAP",
                port,
                "Implicit",
                ALICE_AUTH,
                "",
            )
            .replace("  check:", "  suspend: true\n  check:");
            serde_yaml::from_str(&yaml).unwrap()
        })
        .collect();
    let api = env.providers();
    futures::stream::iter(parked)
        .map(|p| {
            let api = api.clone();
            async move { api.create(&Default::default(), &p).await.unwrap() }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    env.apply_alice_imaps("a-old");
    let relay = crate::api_relay::DelayingRelay::with_gap(
        &env,
        Duration::from_secs(3),
        |line| line.contains("/incomingmailproviders?") && line.contains("continue="),
        |line| line.contains("/incomingmailproviders?") && line.contains("watch=true"),
    )
    .await;
    let controller =
        env.controller_with_env(&[], &[("KUBECONFIG", relay.kubeconfig.to_str().unwrap())]);
    env.wait_reason("a-old", "Connected", Duration::from_secs(60))
        .await;
    env.wait_reason("z-509", "Suspended", Duration::from_secs(60))
        .await;

    relay.gap.open();
    env.request_test("a-old", "in-the-gap");
    env.apply_alice_imaps("a-new");
    tokio::time::sleep(Duration::from_secs(1)).await;
    relay.gap.close();
    env.wait_reason("a-new", "Connected", Duration::from_secs(30))
        .await;
    env.wait(
        "a-old",
        "the test requested in the gap answered",
        Duration::from_secs(30),
        |p| answered(p, "in-the-gap"),
    )
    .await;
    assert!(
        controller.logs().contains("410") || controller.logs().contains("too old"),
        "the watch did not end with 410 Gone:\n{}",
        controller.logs()
    );
}

/// A Secret and a CA bundle's ConfigMap changed while their watches were away (a gap the
/// API server ends with "410 Gone") are acted on once the lists that end it are in the
/// cache: their providers are tested again then, not an interval (5 m) later. A relist
/// triggers no reconcile per listed object (their versions would be read from before the
/// list); its end reconciles every provider that references that kind.
#[tokio::test]
async fn a_secret_or_ca_bundle_changed_in_a_watch_gap_is_acted_on_once_relisted() {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::Api;
    let env = alice_env("relisted-refs").await;
    let (user, password) = env.bed.dovecot().account("alice");
    env.secret("alice-2", &[("username", &user), ("password", &password)])
        .await;
    let ca = |file: &std::path::Path| -> ConfigMap {
        let pem = std::fs::read_to_string(file).unwrap();
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "other-ca"}, "data": {"ca.crt": pem}
        }))
        .unwrap()
    };
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.ns);
    cms.create(&Default::default(), &ca(&env.bed.dovecot().ca_file()))
        .await
        .unwrap();
    env.apply_alice_imaps("by-secret");
    env.apply(
        &provider(
            "by-ca",
            "IMAP",
            env.bed.dovecot().imaps_port(),
            "Implicit",
            "{method: Password, secretRef: {name: alice-2}}",
            "",
        )
        .replace("name: test-ca", "name: other-ca"),
    );
    let relay = crate::api_relay::DelayingRelay::with_gap(
        &env,
        Duration::ZERO,
        |_| false,
        |line| {
            (line.contains("/secrets?") || line.contains("/configmaps?"))
                && line.contains("watch=true")
        },
    )
    .await;
    let controller =
        env.controller_with_env(&[], &[("KUBECONFIG", relay.kubeconfig.to_str().unwrap())]);
    for name in ["by-secret", "by-ca"] {
        env.wait_reason(name, "Connected", Duration::from_secs(60))
            .await;
    }

    relay.gap.open();
    env.secret("alice", &[("username", &user), ("password", "not-alices")])
        .await;
    let other = ca(&env.bed.self_signed_dovecot().ca_file());
    cms.patch(
        "other-ca",
        &Default::default(),
        &kube::api::Patch::Merge(serde_json::json!({ "data": other.data })),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    relay.gap.close();
    env.wait_reason("by-secret", "AuthenticationFailed", Duration::from_secs(30))
        .await;
    env.wait_reason("by-ca", "CertificateInvalid", Duration::from_secs(30))
        .await;
    let logs = controller.logs();
    for watch in ["Secrets", "ConfigMaps"] {
        assert!(
            logs.lines()
                .any(|line| line.contains(watch)
                    && (line.contains("410") || line.contains("too old"))),
            "the {watch} watch did not end with 410 Gone:\n{logs}"
        );
    }
}

/// An OAuth2 provider moved to another shard while its test runs (its spec now names a
/// token Secret of the other shard's, and a quicker server): the other shard tests the
/// new spec, and the old shard's result, which comes later, is not written over it. It
/// was, with the old generation, and stood until the next test, an interval later.
#[tokio::test]
async fn a_result_of_the_shard_a_provider_moved_from_is_not_written_over_the_new_ones() {
    use mailroom::controller::shard::shard_of;
    let env = alice_env("moved-shard").await;
    // Two token Secrets in two different shards of two, each with a valid token.
    let names: Vec<String> = (0..).map(|i| format!("tokens-{i}")).take(20).collect();
    let first = names[0].clone();
    let second = names
        .iter()
        .find(|n| shard_of(&env.ns, n, 2) != shard_of(&env.ns, &first, 2))
        .unwrap()
        .clone();
    let access = env
        .bed
        .oauth()
        .access_token("alice", Duration::from_secs(3600));
    let expires = (k8s_openapi::jiff::Timestamp::now()
        + k8s_openapi::jiff::SignedDuration::from_secs(3600))
    .to_string();
    for name in [&first, &second] {
        env.token_secret(name, &[("access_token", &access), ("expires_at", &expires)])
            .await;
    }
    let slow = CountingRelay::to_imaps(&env, "127.0.0.17", Duration::from_secs(6)).await;
    let quick = CountingRelay::to_imaps(&env, "127.0.0.18", Duration::ZERO).await;
    let spec = |host: &str, relay: &CountingRelay, tokens: &str| {
        through_relay("moving", host, relay).replace(
            ALICE_AUTH,
            &format!(
                "{{method: OAuth2, username: alice, oauth2: {{provider: Generic, clientId: c, \
                 tokenURL: 'https://127.0.0.1:1/token', tokenSecretRef: {{name: {tokens}}}}}}}"
            ),
        )
    };
    env.apply(&spec("127.0.0.17", &slow, &first));
    let shards: Vec<_> = (0..2)
        .map(|i| env.controller_with(&["--shard-index", &i.to_string(), "--shard-count", "2"]))
        .collect();
    env.wait_reason("moving", "Connected", Duration::from_secs(60))
        .await;
    // A second test by the first shard, held 6 s by the slow server...
    env.request_test("moving", "held");
    slow.connections(2, "the requested test never connected")
        .await;
    // ...while the provider moves to the other shard and the quick server.
    env.apply(&spec("127.0.0.18", &quick, &second));
    let moved = env
        .providers()
        .get("moving")
        .await
        .unwrap()
        .metadata
        .generation;
    env.wait(
        "moving",
        "the new spec tested",
        Duration::from_secs(30),
        |p| p.status.as_ref().and_then(|s| s.observed_generation) == moved,
    )
    .await;
    // The held test ends meanwhile; its result must not come after.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let p = env.providers().get("moving").await.unwrap();
    let status = p.status.as_ref().unwrap();
    let logs: Vec<String> = shards.iter().map(|c| c.logs()).collect();
    assert_eq!(
        status.observed_generation, moved,
        "the old shard's result was written over the new one's: {status:?}\n{logs:#?}"
    );
    let old = shard_of(&env.ns, &first, 2) as usize;
    assert!(
        logs[old].contains("moved to another shard during its test"),
        "{}",
        logs[old]
    );
}

/// An API server slow to answer (every answer on a connection that read the Lease comes
/// 1 s late; the tests' Lease lasts 6 s and is renewed 3 s before it expires): the leader
/// still sees its Lease renewed, and tests. It gave each read of the Lease 0.75 s, never
/// saw it, and tested nothing while the Lease was renewed all along.
#[tokio::test]
async fn a_leader_tests_while_the_api_server_answers_its_lease_reads_slowly() {
    let env = alice_env("slow-lease").await;
    env.apply_alice_imaps("imaps");
    let api = crate::api_relay::DelayingRelay::start(&env, Duration::from_secs(1), |line| {
        line.starts_with("GET ") && line.contains("/leases/")
    })
    .await;
    let controller =
        env.controller_with_env(&[], &[("KUBECONFIG", api.kubeconfig.to_str().unwrap())]);
    env.wait_reason("imaps", "Connected", Duration::from_secs(40))
        .await;
    // And it goes on testing, renewal after renewal.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let p = env.retest("imaps", "later").await;
    assert_eq!(
        ready(&p).map(|c| c.reason.as_str()),
        Some("Connected"),
        "{}",
        controller.logs()
    );
}

/// A provider deleted but held by someone else's finalizer (a backup tool, a policy
/// engine) is what its owner deleted: no more logins, a test asked for is not answered,
/// and its metrics series goes, so no alert keeps firing on it. The other provider,
/// asked at the same moment, is answered: the controller was listening.
#[tokio::test]
async fn a_provider_being_deleted_is_tested_no_more() {
    let env = alice_env("being-deleted").await;
    env.apply_alice_imaps("kept");
    env.apply(&format!(
        "{}metadata:\n  name: held\n  finalizers: [example.com/hold]\n",
        provider(
            "held",
            "IMAP",
            env.bed.dovecot().imaps_port(),
            "Implicit",
            ALICE_AUTH,
            ""
        )
        .replace("metadata:\n  name: held\n", "")
    ));
    let controller = env.controller_with(&["--per-provider-metrics"]);
    for name in ["kept", "held"] {
        env.wait_reason(name, "Connected", Duration::from_secs(60))
            .await;
    }
    let series = "name=\"held\"";
    let metrics = controller
        .metrics_with(&[series], Duration::from_secs(10))
        .await;
    assert!(metrics.contains(series), "{metrics}");
    let tested = |logs: &str| {
        logs.lines()
            .filter(|l| l.contains(" tested") && l.contains("held"))
            .count()
    };
    let before = tested(&controller.logs());

    let out = env.kubectl(&["delete", "imp", "held", "--wait=false"]);
    assert!(out.status.success(), "{out:?}");
    let p = env.providers().get("held").await.unwrap();
    assert!(p.metadata.deletion_timestamp.is_some(), "{p:?}");
    env.request_test("held", "after-delete");
    env.retest("kept", "after-delete").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let p = env.providers().get("held").await.unwrap();
    assert!(
        !answered(&p, "after-delete"),
        "a provider being deleted was tested: {:?}",
        p.status
    );
    assert_eq!(tested(&controller.logs()), before, "{}", controller.logs());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, metrics) = controller.get("/metrics").await;
        if !metrics.contains(series) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the series of a provider being deleted stays:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // `mailroom retest` says so instead of waiting for an answer that cannot come.
    let (code, out, err) = env.mailroom(&["retest", "held", "-n", &env.ns, "--timeout", "20"]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        out.contains("being deleted") && out.contains("example.com/hold"),
        "{out}{err}"
    );

    // Its finalizer removed, it goes.
    let out = env.kubectl(&[
        "patch",
        "imp",
        "held",
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":null}}"#,
    ]);
    assert!(out.status.success(), "{out:?}");
}

/// JSON logs, as collectors read them: one object per line, and each line about a
/// provider names it, `namespace` and `name` beside the message as Flux's logs put them.
#[tokio::test]
async fn json_logs_name_the_provider_on_each_of_its_lines() {
    let env = alice_env("json-logs").await;
    env.apply_alice_imaps("imaps");
    let controller = env.controller_with(&["--log-format", "json"]);
    env.wait_reason("imaps", "Connected", Duration::from_secs(60))
        .await;
    let logs = controller.logs();
    let mut about = Vec::new();
    for line in logs.lines() {
        let entry: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        for key in ["timestamp", "level", "target"] {
            assert!(entry[key].is_string(), "no {key}: {line}");
        }
        if entry["spans"]
            .as_str()
            .is_some_and(|s| s.split(':').any(|s| s == "provider"))
        {
            assert_eq!(entry["namespace"], env.ns.as_str(), "{line}");
            assert_eq!(entry["name"], "imaps", "{line}");
            about.push(entry);
        }
    }
    assert!(
        about
            .iter()
            .any(|e| e["message"] == "tested" && e["reason"] == "Connected"),
        "no line about the provider's test:\n{logs}"
    );
}
