//! Mail "servers" that misbehave on purpose, run in the test process (each on a tokio
//! runtime of its own) on loopback addresses of their own (the bed's Dovecot is 127.0.0.2; the controller's
//! per-host limit is keyed by host, so these never take Dovecot's slots): an endless line,
//! a literal that never ends, garbage, and a tarpit that accepts and stays silent.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use mailroom::api::IncomingMailProvider;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::fleet::{self, reason};
use crate::support::answered;
use crate::support::{ALICE_AUTH, Controller, Env, alice_env, provider, ready};

/// What a hostile server does with a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Behaviour {
    /// Starts a greeting ("* OK " or "+OK ") and never ends the line.
    EndlessLine,
    /// IMAP: greets, then answers the first command with a literal announced as 4 GiB,
    /// whose bytes never end.
    HugeLiteral,
    /// IMAP: greets, then answers the first command with a literal small enough to be
    /// believed (1,000,000 bytes), whose bytes (short lines) go on past its end forever.
    OverlongLiteral,
    /// IMAP: greets, then answers the first command with untagged responses forever,
    /// never the tagged one that would end the answer.
    EndlessResponses,
    /// POP3: greets, then answers the first command (CAPA) with a multi-line answer whose
    /// closing "." never comes: short lines, or lines of 32 KiB.
    EndlessList,
    EndlessListOfLongLines,
    /// Random bytes from the first byte on, forever.
    Garbage,
    /// Accepts, reads what the client sends, and never says a word: a tarpit.
    Silent,
}

/// A hostile server; stops (with its connections) when dropped.
struct Hostile {
    addr: SocketAddr,
    /// Connections accepted so far.
    connections: Arc<AtomicUsize>,
    /// Connections open now, and the most that were open at once.
    open: Arc<(AtomicUsize, AtomicUsize)>,
    /// Its own thread, so that the test's own work never slows it down (or its counts).
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Hostile {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Hostile {
    fn start(ip: &str, protocol: &str, behaviour: Behaviour) -> Hostile {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let std_listener = std::net::TcpListener::bind((ip, 0))
            .unwrap_or_else(|e| panic!("binding a hostile server on {ip}: {e}"));
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let open = Arc::new((AtomicUsize::new(0), AtomicUsize::new(0)));
        let (count, gauge) = (connections.clone(), open.clone());
        let imap = protocol == "IMAP";
        runtime.spawn(async move {
            let listener = TcpListener::from_std(std_listener).unwrap();
            let mut handlers = tokio::task::JoinSet::new();
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    continue;
                };
                count.fetch_add(1, Ordering::Relaxed);
                let gauge = gauge.clone();
                handlers.spawn(async move {
                    // Counted open a moment after the accept: the controller closes a
                    // connection before its slot goes to the next one, but this server
                    // may accept the next before it reads the close of the last.
                    let counted = async {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        let now = gauge.0.fetch_add(1, Ordering::Relaxed) + 1;
                        gauge.1.fetch_max(now, Ordering::Relaxed);
                    };
                    let _ = tokio::join!(misbehave(conn, imap, behaviour), counted);
                    gauge.0.fetch_sub(1, Ordering::Relaxed);
                });
                // Reap the finished ones so the set does not grow with every connection.
                while handlers.try_join_next().is_some() {}
            }
        });
        Hostile {
            addr,
            connections,
            open,
            runtime: Some(runtime),
        }
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    fn most_open_at_once(&self) -> usize {
        self.open.1.load(Ordering::Relaxed)
    }
}

async fn misbehave(mut conn: TcpStream, imap: bool, behaviour: Behaviour) -> std::io::Result<()> {
    let greeting: &[u8] = if imap {
        b"* OK hostile server ready\r\n"
    } else {
        b"+OK hostile server ready\r\n"
    };
    match behaviour {
        Behaviour::EndlessLine => {
            conn.write_all(if imap { b"* OK " } else { b"+OK " })
                .await?;
            forever(&mut conn, &[b'a'; 16 * 1024]).await
        }
        Behaviour::HugeLiteral => {
            conn.write_all(greeting).await?;
            read_command(&mut conn).await?;
            conn.write_all(b"* 1 FETCH (BODY[] {4294967295}\r\n")
                .await?;
            forever(&mut conn, &[b'x'; 16 * 1024]).await
        }
        Behaviour::OverlongLiteral => {
            conn.write_all(greeting).await?;
            read_command(&mut conn).await?;
            conn.write_all(b"* 1 FETCH (BODY[] {1000000}\r\n").await?;
            forever(&mut conn, &short_lines(b"y")).await
        }
        Behaviour::EndlessResponses => {
            conn.write_all(greeting).await?;
            read_command(&mut conn).await?;
            forever(&mut conn, &short_lines(b"* OK ")).await
        }
        Behaviour::EndlessList | Behaviour::EndlessListOfLongLines => {
            conn.write_all(greeting).await?;
            read_command(&mut conn).await?;
            conn.write_all(b"+OK capability list follows\r\n").await?;
            let lines = if behaviour == Behaviour::EndlessList {
                short_lines(b"X-")
            } else {
                let mut line = vec![b'X'; 32 * 1024 - 2];
                line.extend_from_slice(b"\r\n");
                line
            };
            forever(&mut conn, &lines).await
        }
        Behaviour::Garbage => {
            let mut chunk = vec![0u8; 64 * 1024];
            rand::fill(&mut chunk[..]);
            forever(&mut conn, &chunk).await
        }
        Behaviour::Silent => {
            let mut sink = [0u8; 1024];
            while conn.read(&mut sink).await? > 0 {}
            Ok(())
        }
    }
}

/// Reads the client's first command line (at most 4 KiB).
async fn read_command(conn: &mut TcpStream) -> std::io::Result<()> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 4096 {
        if conn.read(&mut byte).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
    }
    Ok(())
}

/// 16 KiB of 64-byte lines, each starting with `start`.
fn short_lines(start: &[u8]) -> Vec<u8> {
    let mut line = start.to_vec();
    line.resize(62, b'y');
    line.extend_from_slice(b"\r\n");
    line.repeat(256)
}

/// Writes `chunk` again and again until the client goes away.
async fn forever(conn: &mut TcpStream, chunk: &[u8]) -> std::io::Result<()> {
    loop {
        conn.write_all(chunk).await?;
    }
}

/// Parses a status duration such as "143ms" or "1.2s".
fn duration(text: &str) -> Duration {
    if let Some(ms) = text.strip_suffix("ms") {
        Duration::from_millis(ms.parse().unwrap())
    } else if let Some(s) = text.strip_suffix('s') {
        Duration::from_secs_f64(s.parse().unwrap())
    } else {
        panic!("not a duration: {text:?}")
    }
}

/// Providers of the bed's Dovecot with alice's password, in group `group`: the
/// well-behaved rest of the fleet. Half IMAPS, half POP3S.
async fn healthy(env: &Env, group: &str, count: usize, check: &str) -> Vec<String> {
    let d = env.bed.dovecot();
    let mut names = Vec::new();
    let mut manifests = Vec::new();
    for i in 0..count {
        let (protocol, port) = if i % 2 == 0 {
            ("IMAP", d.imaps_port())
        } else {
            ("POP3", d.pop3s_port())
        };
        let name = format!("{group}-{i:02}");
        let yaml = provider(&name, protocol, port, "Implicit", ALICE_AUTH, "")
            .replace("check: {interval: 5m, timeout: 10s}", check);
        let mut p: IncomingMailProvider = serde_yaml::from_str(&yaml).unwrap();
        p.metadata.labels = Some([(fleet::GROUP.to_string(), group.to_string())].into());
        manifests.push(p);
        names.push(name);
    }
    fleet::create_all(env, manifests).await;
    names
}

/// The Ready message.
fn message(p: &IncomingMailProvider) -> &str {
    ready(p).map(|c| c.message.as_str()).unwrap_or_default()
}

fn last_check(p: &IncomingMailProvider) -> Option<Timestamp> {
    p.status.as_ref()?.last_check_time.as_ref().map(|t| t.0)
}

/// `b - a`, or zero when b is earlier.
fn between(a: Timestamp, b: Timestamp) -> Duration {
    Duration::try_from(a.duration_until(b)).unwrap_or_default()
}

#[tokio::test]
async fn endless_lines_literals_and_garbage_are_protocol_errors_within_bounds_and_delay_no_one() {
    let _turn = fleet::HEAVY.lock().await;
    let env = alice_env("hostile").await;
    // (protocol, behaviour, what the message must say). All on 127.0.0.3: one host, so at
    // most 8 (--per-host-concurrency) of these tests run at once.
    let kinds = [
        (
            "IMAP",
            Behaviour::EndlessLine,
            "sent a line longer than 65536 bytes at the greeting step",
        ),
        (
            "IMAP",
            Behaviour::HugeLiteral,
            "sent an IMAP literal of 4294967295 bytes, more than the",
        ),
        (
            "IMAP",
            Behaviour::OverlongLiteral,
            "sent something that is not IMAP at the capabilities step",
        ),
        (
            "IMAP",
            Behaviour::EndlessResponses,
            "sent more than 1048576 bytes in one test at the capabilities step",
        ),
        ("IMAP", Behaviour::Garbage, "greeting"),
        (
            "POP3",
            Behaviour::EndlessLine,
            "sent a line longer than 65536 bytes at the greeting step",
        ),
        (
            "POP3",
            Behaviour::EndlessList,
            "sent more than 1000 lines at the capabilities step",
        ),
        (
            "POP3",
            Behaviour::EndlessListOfLongLines,
            "sent more than 1048576 bytes in one test at the capabilities step",
        ),
        ("POP3", Behaviour::Garbage, "greeting"),
    ];
    const PER_KIND: usize = 5;
    const TIMEOUT: &str = "30s";
    let mut servers = Vec::new();
    let mut hostile = Vec::new();
    let mut expected = BTreeMap::new();
    let mut manifests = Vec::new();
    for (protocol, behaviour, says) in kinds {
        let ip = "127.0.0.3";
        let server = Hostile::start(ip, protocol, behaviour);
        let kind = format!("{protocol}-{behaviour:?}").to_lowercase();
        for i in 0..PER_KIND {
            let name = format!("{kind}-{i}");
            manifests.push(fleet::connectivity(
                &name,
                "hostile",
                ip,
                server.port(),
                protocol,
                &format!("{{interval: 5m, timeout: {TIMEOUT}}}"),
            ));
            expected.insert(name.clone(), says);
            hostile.push(name);
        }
        servers.push(server);
    }
    // The good providers first, alone, for the controller's memory at rest.
    let good = healthy(&env, "good", 4, "check: {interval: 5m, timeout: 10s}").await;
    // glibc's thresholds pinned: by default, once a 1 MiB buffer is freed it raises its
    // mmap threshold and keeps later ones in its heaps, and VmRSS then moves by tens of
    // MiB with how a round's tests overlapped and what it trimmed (seen: a floor of 24
    // MiB in one round, 43 in the next). Pinned, VmRSS follows what the controller keeps.
    let controller = env.controller_with_env(
        &[],
        &[
            ("MALLOC_MMAP_THRESHOLD_", "131072"),
            ("MALLOC_TRIM_THRESHOLD_", "131072"),
        ],
    );
    let memory = fleet::MemorySampler::start(controller.child.id());
    fleet::wait_all(
        &env,
        "good",
        &good,
        "Ready reason Connected",
        Duration::from_secs(60),
        |p| reason(p) == "Connected",
    )
    .await;
    // A second of samples at rest (phase 0).
    tokio::time::sleep(Duration::from_secs(1)).await;

    memory.set_phase(1);
    fleet::create_all(&env, manifests).await;
    let failed = fleet::wait_all(
        &env,
        "hostile",
        &hostile,
        "Ready reason ProtocolError",
        Duration::from_secs(60),
        |p| reason(p) == "ProtocolError",
    )
    .await;
    // Each says which bound the server broke, and stopped long before check.timeout (30s):
    // a bound in bytes, not the clock, ended it.
    let mut slowest = Duration::ZERO;
    let mut per_kind = BTreeMap::new();
    for p in &failed {
        let name = p.metadata.name.as_deref().unwrap();
        assert!(
            message(p).contains(expected[name]),
            "{name}: expected a message saying {:?}, got {:?}",
            expected[name],
            message(p)
        );
        let took = duration(
            p.status
                .as_ref()
                .and_then(|s| s.last_check_duration.as_deref())
                .unwrap_or("0ms"),
        );
        slowest = slowest.max(took);
        let kind = name.rsplit_once('-').unwrap().0;
        let e = per_kind.entry(kind.to_string()).or_insert(Duration::ZERO);
        *e = (*e).max(took);
    }
    eprintln!(
        "hostile: all {} ProtocolError; the slowest test of each kind took {per_kind:?}",
        failed.len()
    );
    // Moving the bytes takes a moment on a busy machine (45 tests at once, a debug build),
    // but nowhere near the timeout.
    assert!(
        slowest < Duration::from_secs(15),
        "a hostile server's test took {slowest:?}: the byte bounds should end it well before check.timeout ({TIMEOUT})"
    );

    // More rounds, every hostile provider at once (phases 2, 3, ...). The good providers
    // are asked for a test at the same moment.
    const ROUNDS: usize = 9;
    let mut good_latency = Vec::new();
    for round in 2..=ROUNDS {
        memory.set_phase(round);
        let value = format!("round-{round}");
        fleet::request_checks(&env, &hostile, &value).await;
        good_latency.push(fleet::ask(&env, "good", &good, &value, "Connected").await);
        fleet::wait_all(
            &env,
            "hostile",
            &hostile,
            &format!("ProtocolError answering {value}"),
            Duration::from_secs(60),
            |p| answered(p, &value) && reason(p) == "ProtocolError",
        )
        .await;
    }
    for s in &servers {
        assert!(
            s.connections() >= PER_KIND * ROUNDS,
            "a hostile server saw only {} connections",
            s.connections()
        );
    }
    let median = |v: &[u64]| v.get(v.len() / 2).copied().unwrap_or_default();
    // The lowest VmRSS of some rounds: what the controller keeps between tests. A median
    // also counts what is in flight, which moves with how the round's tests overlapped.
    let floor = |v: &[u64]| v.first().copied().unwrap_or_default();
    let per_round: Vec<String> = (0..=ROUNDS)
        .map(|r| {
            let v = memory.samples(r, r);
            format!(
                "{r}: {}/{}/{}",
                floor(&v) / 1024,
                median(&v) / 1024,
                v.last().unwrap_or(&0) / 1024
            )
        })
        .collect();
    eprintln!("hostile: VmRSS min/median/max MiB per round (0 = at rest): {per_round:?}");
    let at_rest = median(&memory.samples(0, 0));
    let early = floor(&memory.samples(4, 5));
    let late = floor(&memory.samples(ROUNDS - 1, ROUNDS));
    let (_, peak) = fleet::memory_kib(controller.child.id());
    let tests = hostile.len() * ROUNDS;
    eprintln!(
        "hostile: controller VmRSS at rest {at_rest} KiB; lowest over rounds 4-5 {early} KiB, over rounds {}-{ROUNDS} {late} KiB; VmHWM {peak} KiB; {tests} hostile tests; the good providers were tested {good_latency:?} after a request",
        ROUNDS - 1
    );
    // No growth with the number of tests. The allocator's arenas fill up over the first
    // rounds; from rounds 4-5 to rounds 8-9 another 4 × 45 = 180 tests ran and read some
    // 60 MiB (three of the nine kinds read the whole 1 MiB budget, three 64 KiB): keeping
    // it, or any sizeable part of it (64 KiB a test is 11 MiB), would raise the floor,
    // which moved by at most about 1 MiB between those rounds in five runs.
    let growth = late.saturating_sub(early);
    assert!(
        growth < 4 * 1024,
        "the controller grew by {growth} KiB over the hostile rounds (lowest VmRSS {early} -> {late} KiB)"
    );
    // Bounded by what is in flight: at most 8 hostile tests at once, each reading at most
    // 1 MiB and holding it a few times over at worst (a buffer that doubles as it grows;
    // async-imap keeps every untagged response it parsed until the session ends).
    let above = peak.saturating_sub(at_rest);
    assert!(
        above < 64 * 1024,
        "the controller's peak VmHWM {peak} KiB is {above} KiB above its {at_rest} KiB at rest"
    );
    // If a hostile test held a slot a good one needed, the good one would wait for
    // check.timeout (30s); they wait for CPU only (the hostile streams keep both cores
    // busy), a few seconds at most.
    let slowest_good = good_latency.iter().max().copied().unwrap_or_default();
    assert!(
        slowest_good <= Duration::from_secs(5),
        "a good provider was tested {slowest_good:?} after a request while the hostile servers were tested: {good_latency:?}"
    );
    drop(controller);
}

#[tokio::test]
async fn a_tarpit_for_500_providers_times_them_all_out_and_the_rest_of_the_fleet_keeps_its_schedule()
 {
    let _turn = fleet::HEAVY.lock().await;
    let env = alice_env("tarpit").await;
    let tarpit = Hostile::start("127.0.0.5", "IMAP", Behaviour::Silent);
    // 500 providers on one silent host, check.timeout 3s. The controller runs 50 tests at
    // once against one host and 64 in all: the tarpit drains in 500 / 50 = 10 waves of
    // 3 s, 30 s for everyone's first test, and keeps 50 of the 64 slots busy from then on
    // (each failure is retried after 10 s, 20 s, 40 s: more than 50 tests per 3 s ask for
    // it), which leaves 14 for the rest of the fleet. With the defaults (8 per host, 32 in
    // all) the same drain would take 63 waves, over 3 minutes.
    const TARPITTED: usize = 500;
    const PER_HOST: usize = 50;
    let mut tarpitted = Vec::new();
    let mut manifests = Vec::new();
    for i in 0..TARPITTED {
        let name = format!("tarpit-{i:03}");
        let protocol = if i % 2 == 0 { "IMAP" } else { "POP3" };
        manifests.push(fleet::connectivity(
            &name,
            "tarpit",
            "127.0.0.5",
            tarpit.port(),
            protocol,
            "{interval: 5m, timeout: 3s}",
        ));
        tarpitted.push(name);
    }
    fleet::create_all(&env, manifests).await;
    // The rest of the fleet, on Dovecot: ten tested every 30 s on their own schedule, ten
    // asked for a test now and then, as a user would.
    let steady = healthy(&env, "steady", 10, "check: {interval: 30s, timeout: 10s}").await;
    let asked = healthy(&env, "asked", 10, "check: {interval: 5m, timeout: 10s}").await;

    let started = Instant::now();
    let start_time = Timestamp::now();
    let _controller = env.controller_with(&[
        "--concurrency",
        "64",
        "--per-host-concurrency",
        &PER_HOST.to_string(),
    ]);
    let first = fleet::wait_all(
        &env,
        "steady",
        &steady,
        "a first test, Connected",
        Duration::from_secs(30),
        |p| reason(p) == "Connected",
    )
    .await;
    let first_check: BTreeMap<String, Timestamp> = first
        .iter()
        .map(|p| {
            (
                p.metadata.name.clone().unwrap(),
                last_check(p).expect("a tested provider has a lastCheckTime"),
            )
        })
        .collect();
    fleet::wait_all(
        &env,
        "asked",
        &asked,
        "a first test, Connected",
        Duration::from_secs(30),
        |p| reason(p) == "Connected",
    )
    .await;
    // The tarpit's first statuses (Checking, 2 s into a test that waits) are a burst of
    // 500 writes and as many watch events, which a 2-core API server takes seconds to
    // absorb; the timing below is of the controller, measured once they are stored.
    fleet::wait_all(
        &env,
        "tarpit",
        &tarpitted,
        "a first status",
        Duration::from_secs(60),
        |p| ready(p).is_some(),
    )
    .await;
    // While the tarpit drains (and after: its retries keep it full), ask for tests of the
    // others every few seconds and see how soon they were tested.
    let mut latencies = Vec::new();
    let deadline = started + Duration::from_secs(120);
    for round in 1.. {
        let value = format!("ask-{round}");
        let at = started.elapsed();
        latencies.push((
            at,
            fleet::ask(&env, "asked", &asked, &value, "Connected").await,
        ));
        let timed_out = fleet::list(&env, "tarpit")
            .await
            .iter()
            .filter(|p| reason(p) == "Timeout")
            .count();
        let steady_again = fleet::list(&env, "steady")
            .await
            .iter()
            .filter(|p| {
                let t1 = first_check[p.metadata.name.as_deref().unwrap_or_default()];
                last_check(p).is_some_and(|t2| t2 > t1)
            })
            .count();
        if timed_out == TARPITTED && steady_again == steady.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after {:?}: {timed_out} of {TARPITTED} tarpitted providers Timeout, {steady_again} of {} steady ones tested a second time; controller logs in {}",
            started.elapsed(),
            steady.len(),
            env.dir.path().display()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    let all = fleet::list(&env, "tarpit").await;
    let expected = format!("no greeting from 127.0.0.5:{} within 3s", tarpit.port());
    let mut drained = Duration::ZERO;
    for p in &all {
        assert!(
            message(p).contains(&expected),
            "{}: expected {expected:?}, got {:?}",
            p.metadata.name.as_deref().unwrap_or_default(),
            message(p)
        );
        drained = drained.max(between(
            start_time,
            ready(p).unwrap().last_transition_time.0,
        ));
    }
    // The steady ones were tested again one interval (30 s, plus up to 10% jitter) after
    // their first test, with the tarpit full all along.
    let mut late = Duration::ZERO;
    for p in fleet::list(&env, "steady").await {
        let t1 = first_check[p.metadata.name.as_deref().unwrap()];
        late = late.max(between(t1, last_check(&p).unwrap()));
        assert_eq!(reason(&p), "Connected");
    }
    let slowest = latencies.iter().map(|(_, l)| *l).max().unwrap_or_default();
    eprintln!(
        "tarpit: all {TARPITTED} Timeout {drained:?} after the controller started; {} connections, at most {} open at once; requested tests ran within {slowest:?} of the request ((when, how soon): {latencies:?}); the steady providers' second test came at most {late:?} after the first",
        tarpit.connections(),
        tarpit.most_open_at_once(),
    );
    // The server counts a connection until it reads the client's close, a moment after
    // the controller let go of the slot: a few more than 50 may overlap.
    assert!(
        tarpit.most_open_at_once() <= PER_HOST + 10,
        "the tarpit held {} connections at once, over the per-host limit of {PER_HOST}",
        tarpit.most_open_at_once()
    );
    // Whole seconds on both ends: 2 s means within a second or two. (When a test took a
    // global slot before its host's, and reconciles were capped at 4 × --concurrency, the
    // tarpit's queue held both: requests waited 16 s and the steady providers' tests came
    // 42 s apart.)
    assert!(
        slowest <= Duration::from_secs(2),
        "a healthy provider was tested {slowest:?} after a request while the tarpit drained: {latencies:?}"
    );
    // 33 s at most by the schedule; lastCheckTime has whole seconds, and the write takes a
    // moment.
    assert!(
        late <= Duration::from_secs(36),
        "a steady provider's second test came {late:?} after its first (interval 30s)"
    );
}

/// Checking is shown while a slow test runs. An API server that refuses that write (an
/// admission policy here; throttling or an outage in life) costs neither the test's result
/// nor another connection to the mail server.
#[tokio::test]
async fn a_refused_checking_write_costs_neither_the_result_nor_another_connection() {
    let env = alice_env("checking-refused").await;
    let tarpit = Hostile::start("127.0.0.11", "IMAP", Behaviour::Silent);
    let policy = refuse_status_writes(
        &env,
        "refuse-checking",
        "!has(object.status) || !has(object.status.conditions) || !object.status.conditions.exists(c, c.type == 'Ready' && c.reason == 'Checking')",
    );
    let api = env.providers();
    api.create(
        &Default::default(),
        &fleet::connectivity(
            "slow",
            "slow",
            "127.0.0.11",
            tarpit.port(),
            "IMAP",
            "{interval: 5m, timeout: 5s}",
        ),
    )
    .await
    .unwrap();
    let checking = serde_json::json!({"status": {"conditions": [{
        "type": "Ready", "status": "Unknown", "reason": "Checking", "message": "policy probe",
        "lastTransitionTime": "2026-01-01T00:00:00Z"
    }]}});
    until_status_refused(&env, "slow", &checking).await;

    let _controller = env.controller();
    let p = env
        .wait_reason("slow", "Timeout", Duration::from_secs(30))
        .await;
    assert!(message(&p).contains("greeting"), "{}", message(&p));
    assert_eq!(
        tarpit.connections(),
        1,
        "the refused Checking write cost the result and a new connection"
    );
    remove_policy(&env, &policy);
}

/// A provider deleted and created again under its name is another object: it gets a
/// first test of its own at once (not the old one's schedule, an interval away), and a
/// test of the old one that was still running is never written onto it.
#[tokio::test]
async fn a_provider_created_again_under_its_name_gets_its_own_first_test() {
    let env = alice_env("recreated").await;
    let tarpit = Hostile::start("127.0.0.12", "IMAP", Behaviour::Silent);
    let api = env.providers();
    let delete = |name: &str| {
        let out = env.kubectl(&["delete", "imp", name, "--wait=true"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    env.apply_alice_imaps("p");
    let _controller = env.controller();
    env.wait_reason("p", "Connected", Duration::from_secs(30))
        .await;
    delete("p");
    env.apply_alice_imaps("p");
    env.wait_reason("p", "Connected", Duration::from_secs(20))
        .await;

    // q's first test waits on a silent server; q is deleted meanwhile and created again
    // for Dovecot. The old test ends in Timeout, which is not the new q's.
    api.create(
        &Default::default(),
        &fleet::connectivity(
            "q",
            "recreated",
            "127.0.0.12",
            tarpit.port(),
            "IMAP",
            "{interval: 5m, timeout: 8s}",
        ),
    )
    .await
    .unwrap();
    env.wait_reason("q", "Checking", Duration::from_secs(20))
        .await;
    delete("q");
    env.apply_alice_imaps("q");
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        let q = api.get("q").await.unwrap();
        if !matches!(reason(&q), "" | "Checking") {
            break q;
        }
        assert!(Instant::now() < deadline, "q got no result");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(reason(&first), "Connected", "{}", message(&first));
    assert_eq!(tarpit.connections(), 1);
}

/// Has the API server refuse the status writes of this test's namespace for which
/// `expression` (CEL, over `object`) is false; returns the policy's name.
fn refuse_status_writes(env: &Env, name: &str, expression: &str) -> String {
    refuse_updates(
        env,
        name,
        "{apiGroups: [mailroom.dev], apiVersions: ['*'], operations: [UPDATE], resources: [incomingmailproviders/status]}",
        expression,
        "status refused by the test",
    )
}

/// The same for a status written without a test (Suspended here; InvalidSpec and
/// AccessDenied go the same way): it was retried every 5 s for ever.
#[tokio::test]
async fn a_refused_status_of_a_suspended_provider_is_retried_with_a_growing_wait() {
    let env = alice_env("suspended-refused").await;
    let policy = refuse_status_writes(&env, "refuse-suspended", "false");
    env.apply_alice_imaps("p");
    let out = env.kubectl(&[
        "patch",
        "imp",
        "p",
        "--type=merge",
        "-p",
        r#"{"spec":{"suspend":true}}"#,
    ]);
    assert!(out.status.success(), "{out:?}");
    let (_controller, logs) = refused_for_40_seconds(&env, "p").await;
    assert!(
        !logs.contains("tested"),
        "a suspended provider was tested:\n{logs}"
    );
    remove_policy(&env, &policy);
    env.wait_reason("p", "Suspended", Duration::from_secs(330))
        .await;
}

/// A status the API server cannot take now, rather than refuses (an admission webhook it
/// cannot reach: 500 InternalError): the writes fail in a row and are tried again with a
/// growing wait too (it was every 5 s, for ever: with a fleet, thousands of writes a
/// minute), and the status is written once the webhook is gone.
#[tokio::test]
async fn a_status_write_answered_500_is_retried_with_a_growing_wait() {
    let env = alice_env("status-500").await;
    let webhook = format!("unreachable-{}", env.ns);
    env.apply(&format!(
        "apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingWebhookConfiguration
metadata: {{name: {webhook}}}
webhooks:
  - name: unreachable.mailroom.test
    clientConfig: {{url: 'https://127.0.0.1:1/validate'}}
    rules:
      - {{apiGroups: [mailroom.dev], apiVersions: ['*'], operations: [UPDATE], resources: [incomingmailproviders/status]}}
    failurePolicy: Fail
    sideEffects: None
    admissionReviewVersions: [v1]
    timeoutSeconds: 2
    namespaceSelector:
      matchLabels: {{kubernetes.io/metadata.name: {ns}}}
",
        ns = env.ns
    ));
    env.apply_alice_imaps("p");
    let (_controller, logs) = refused_for_40_seconds(&env, "p").await;
    assert!(logs.contains("failed calling webhook"), "{logs}");
    env.bed
        .kubectl()
        .args(["delete", "validatingwebhookconfiguration", &webhook])
        .output()
        .unwrap();
    env.wait_reason("p", "Connected", Duration::from_secs(90))
        .await;
}

/// Runs the controller for 40 s while every status write of `name` is refused (the policy
/// in place), and checks that it tried at 0 s, then 5, 15 and 35 s, not every 5 s (8
/// writes); returns it, still running, and its log.
async fn refused_for_40_seconds(env: &Env, name: &str) -> (Controller, String) {
    let status = serde_json::json!({"status": {"consecutiveFailures": 0}});
    until_status_refused(env, name, &status).await;
    let controller = env.controller();
    tokio::time::sleep(Duration::from_secs(40)).await;
    let logs = controller.logs();
    let refused = logs
        .lines()
        .filter(|l| l.contains("will retry") && l.contains("writing status"))
        .count();
    assert!(
        (2..=5).contains(&refused),
        "{refused} refused status writes in 40 s:\n{logs}"
    );
    (controller, logs)
}

/// A ValidatingAdmissionPolicy, bound to this test's namespace, that refuses the requests
/// `rule` matches (a resourceRules entry) for which `expression` is false, as a cluster's
/// policy engine would; returns its name.
pub fn refuse_updates(
    env: &Env,
    name: &str,
    rule: &str,
    expression: &str,
    message: &str,
) -> String {
    let policy = format!("{name}-{}", env.ns);
    env.apply(&format!(
        "apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata: {{name: {policy}}}
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules:
      - {rule}
  validations:
    - expression: \"{expression}\"
      message: {message}
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata: {{name: {policy}}}
spec:
  policyName: {policy}
  validationActions: [Deny]
  matchResources:
    namespaceSelector:
      matchLabels: {{kubernetes.io/metadata.name: {ns}}}
",
        ns = env.ns
    ));
    policy
}

/// Waits until the API server refuses `status` for provider `name` (a dry run): until the
/// policy takes effect, a test of it proves nothing.
async fn until_status_refused(env: &Env, name: &str, status: &serde_json::Value) {
    let dry_run = kube::api::PatchParams {
        dry_run: true,
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while env
        .providers()
        .patch_status(name, &dry_run, &kube::api::Patch::Merge(status))
        .await
        .is_ok()
    {
        assert!(
            Instant::now() < deadline,
            "the admission policy did not take effect"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub fn remove_policy(env: &Env, policy: &str) {
    env.bed
        .kubectl()
        .args([
            "delete",
            "validatingadmissionpolicybinding,validatingadmissionpolicy",
            policy,
        ])
        .output()
        .unwrap();
}

/// A status the API server keeps refusing (a policy, a schema) is tried again less and
/// less often (5 s doubling, up to 5 minutes), not every 5 s for ever; the result is kept,
/// and written once the server takes it.
#[tokio::test]
async fn a_status_the_api_server_keeps_refusing_is_retried_with_a_growing_wait() {
    let env = alice_env("status-refused").await;
    let policy = refuse_status_writes(&env, "refuse-status", "false");
    env.apply_alice_imaps("p");
    let (_controller, logs) = refused_for_40_seconds(&env, "p").await;
    assert_eq!(
        logs.lines().filter(|l| l.contains("tested")).count(),
        1,
        "the result was not kept:\n{logs}"
    );
    remove_policy(&env, &policy);
    env.wait_reason("p", "Connected", Duration::from_secs(90))
        .await;
}

/// A provider whose status never gets written (here the API server refuses it; in life,
/// caches that never synced do the same) is counted in `mailroom_providers_overdue` once
/// its schedule has passed, which the chart's `MailroomNotTesting` alert reads; a
/// provider tested on schedule beside it is not.
#[tokio::test]
async fn a_provider_whose_status_goes_stale_is_counted_overdue() {
    let env = alice_env("overdue").await;
    let policy = refuse_status_writes(&env, "refuse-overdue", "object.metadata.name != 'stale'");
    let port = env.bed.dovecot().imaps_port();
    let fast = |name: &str| {
        provider(name, "IMAP", port, "Implicit", ALICE_AUTH, "")
            .replace("interval: 5m, timeout: 10s", "interval: 30s, timeout: 5s")
    };
    env.apply(&fast("stale"));
    env.apply(&fast("fresh"));
    let created = Instant::now();
    let status = serde_json::json!({"status": {"consecutiveFailures": 0}});
    until_status_refused(&env, "stale", &status).await;
    let controller = env.controller();
    env.wait_reason("fresh", "Connected", Duration::from_secs(30))
        .await;
    // Due within 30 s + 3 s of jitter, its test bounded by 5 s, and a minute's grace:
    // overdue 98 s after its creation, counted within the next 30 s.
    let early = controller
        .metrics_with(&["mailroom_providers_overdue 0"], Duration::ZERO)
        .await;
    assert!(
        early.contains("mailroom_providers_overdue 0"),
        "overdue before its time ({:?} after its creation):\n{early}",
        created.elapsed()
    );
    let metrics = controller
        .metrics_with(&["mailroom_providers_overdue 1"], Duration::from_secs(150))
        .await;
    assert!(
        metrics.contains("mailroom_providers_overdue 1"),
        "not counted overdue {:?} after its creation:\n{metrics}",
        created.elapsed()
    );
    // Not before its time (the creationTimestamp, in whole seconds, may be up to a second
    // before `created`, and the count is taken every 30 s).
    assert!(created.elapsed() > Duration::from_secs(90));
    remove_policy(&env, &policy);
}

/// A test in line behind others that hang on their host leaves the line when its provider
/// is pointed at another host: the fix of a typo'd host is tested at once, not after every
/// test ahead of it has timed out (three of 10 s here, one slot for the host).
#[tokio::test]
async fn a_test_in_line_behind_a_hanging_host_leaves_it_when_its_provider_is_pointed_elsewhere() {
    let env = alice_env("repointed").await;
    // Another host than the bed's mail host (127.0.0.2), so the slots are another's.
    let host = "127.0.0.1";
    let tarpit = Hostile::start(host, "IMAP", Behaviour::Silent);
    let hang = |name: &str| {
        fleet::connectivity(
            name,
            "hang",
            host,
            tarpit.port(),
            "IMAP",
            "{interval: 5m, timeout: 10s}",
        )
    };
    fleet::create_all(&env, (0..3).map(|i| hang(&format!("hang-{i}"))).collect()).await;
    let _controller = env.controller_with(&["--per-host-concurrency", "1"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while tarpit.connections() < 1 {
        assert!(Instant::now() < deadline, "the hanging tests never started");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Last in line: behind the one hanging and the two waiting.
    fleet::create_all(&env, vec![hang("typo")]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(tarpit.connections(), 1, "one slot for the host, held");
    let fixed = Instant::now();
    env.apply_alice_imaps("typo");
    env.wait_reason("typo", "Connected", Duration::from_secs(60))
        .await;
    let took = fixed.elapsed();
    assert!(
        took < Duration::from_secs(8) && tarpit.connections() <= 2,
        "the fixed provider was tested {took:?} after its fix, after {} hanging tests",
        tarpit.connections()
    );
}

/// Namespaces share a host's slots fairly: a tenant whose providers hang on a host every
/// team uses (a server there that never answers, each test holding its slot for its whole
/// timeout) does not make another tenant's test of that host wait behind its own queue.
/// Two slots per host; six providers hanging 10 s each, two running and four in line when
/// the other tenant's provider comes: in first-come order it would wait for those four,
/// two rounds of 10 s after the current one (29 s measured); shared fairly, it takes
/// the next slot freed.
#[tokio::test]
async fn a_tenant_hanging_on_a_shared_host_does_not_starve_another_tenants_tests_of_it() {
    let greedy = Env::new("greedy").await;
    let modest = alice_env("modest").await;
    let host = mailroom_testbed::MAIL_HOST.to_string();
    let tarpit = Hostile::start(&host, "IMAP", Behaviour::Silent);
    let hanging: Vec<_> = (0..6)
        .map(|i| {
            fleet::connectivity(
                &format!("hang-{i}"),
                "hang",
                &host,
                tarpit.port(),
                "IMAP",
                "{interval: 5m, timeout: 10s}",
            )
        })
        .collect();
    fleet::create_all(&greedy, hanging).await;
    let _controller =
        greedy.controller_with(&["--namespace", &modest.ns, "--per-host-concurrency", "2"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while tarpit.connections() < 2 {
        assert!(Instant::now() < deadline, "the hanging tests never started");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The other four are in line behind them by now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(tarpit.connections(), 2, "two slots for the host, both held");
    let applied = Instant::now();
    modest.apply_alice_imaps("imaps");
    modest
        .wait_reason("imaps", "Connected", Duration::from_secs(60))
        .await;
    let took = applied.elapsed();
    // By order, not by time alone: of the two slots freed when the first hanging tests
    // time out, it takes one (in first-come order the four in line would come first).
    let hung = tarpit.connections();
    assert!(
        hung <= 4 && took < Duration::from_secs(25),
        "another namespace's test of the shared host waited {took:?}, behind {} of the hanging tests",
        hung - 2
    );
}
