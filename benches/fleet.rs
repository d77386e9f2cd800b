//! Fleet benchmark: N providers (default 1,000) applied at once to the test bed's API
//! server, spread over namespaces and over six Dovecot endpoints (two instances), then one
//! controller started as in production. Prints, in one table:
//! - the ceiling: what the Dovecots allow at the controller's per-host concurrency,
//!   measured first with mailroom's probe alone, and the time N tests take at that rate;
//! - the ramp: seconds from the controller's start until all are Ready, its peak RSS and CPU seconds, API
//!   requests by verb, the most simultaneous connections Dovecot saw;
//! - the steady state: status writes and tests per provider per interval, API requests
//!   and controller CPU per minute;
//! - the time from a Secret change to the provider's new status, under that load.
//!
//! Run: `scripts/bench fleet` or `cargo bench --bench fleet`. Environment:
//! MAILROOM_BENCH_PROVIDERS (N, default 1000), MAILROOM_BENCH_INTERVAL (check.interval,
//! default 5m), MAILROOM_BENCH_STEADY (seconds of steady state observed, default one
//! interval plus its jitter), MAILROOM_BENCH_PER_HOST (the controller's
//! --per-host-concurrency, default 8), MAILROOM_BENCH_CORES=split (Dovecot alone on the
//! first core, everything else on the others, for the ceiling and the ramp alike: as in
//! a cluster, where the mail server does not share its CPUs with the API server).

use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use mailroom::api::{IncomingMailProvider, Protocol, TlsMode, parse_duration};
use mailroom::probe::{self, Login, Target, Trust};
use mailroom_testbed::{Bed, MAIL_HOST};

mod support;
use secrecy::SecretString;
use serde_json::json;

/// One place providers point at: a Dovecot port, its TLS mode, and what to trust.
struct Endpoint {
    label: &'static str,
    protocol: Protocol,
    port: u16,
    tls: TlsMode,
    /// ConfigMap (in every namespace) holding the certificate to trust.
    ca: &'static str,
    ca_pem: String,
    /// Secret (in every namespace) with that instance's alice.
    secret: &'static str,
    user: String,
    password: String,
}

fn endpoints(bed: &Bed) -> Vec<Endpoint> {
    let main = bed.dovecot();
    let pinned = bed.self_signed_dovecot();
    let main_ca = std::fs::read_to_string(main.ca_file()).unwrap();
    let (mu, mp) = main.account("alice");
    let (su, sp) = pinned.account("alice");
    let on_main = |label, protocol, port, tls| Endpoint {
        label,
        protocol,
        port,
        tls,
        ca: "main-ca",
        ca_pem: main_ca.clone(),
        secret: "alice-main",
        user: mu.clone(),
        password: mp.clone(),
    };
    let on_pinned = |label, protocol, port| Endpoint {
        label,
        protocol,
        port,
        tls: TlsMode::Implicit,
        ca: "pinned-cert",
        ca_pem: pinned.cert_pem(),
        secret: "alice-pinned",
        user: su.clone(),
        password: sp.clone(),
    };
    vec![
        on_main(
            "main IMAPS",
            Protocol::Imap,
            main.imaps_port(),
            TlsMode::Implicit,
        ),
        on_main(
            "main POP3S",
            Protocol::Pop3,
            main.pop3s_port(),
            TlsMode::Implicit,
        ),
        on_main(
            "main IMAP STARTTLS",
            Protocol::Imap,
            main.imap_port(),
            TlsMode::StartTls,
        ),
        on_main(
            "main POP3 STLS",
            Protocol::Pop3,
            main.pop3_port(),
            TlsMode::StartTls,
        ),
        on_pinned("self-signed IMAPS", Protocol::Imap, pinned.imaps_port()),
        on_pinned("self-signed POP3S", Protocol::Pop3, pinned.pop3s_port()),
    ]
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() {
    let n: usize = env_or("MAILROOM_BENCH_PROVIDERS", 1000);
    let interval_text: String = env_or("MAILROOM_BENCH_INTERVAL", "5m".to_string());
    let interval = parse_duration(&interval_text).expect("MAILROOM_BENCH_INTERVAL");
    let jitter = (interval / 10).min(Duration::from_secs(30));
    let steady = Duration::from_secs(env_or(
        "MAILROOM_BENCH_STEADY",
        (interval + jitter).as_secs(),
    ));
    let per_host: usize = env_or("MAILROOM_BENCH_PER_HOST", 8);
    let namespaces = n.div_ceil(1000).max(2);

    let bed = mailroom_testbed::shared();
    install_crd(bed);
    let client = client(bed).await;
    let ends = Arc::new(endpoints(bed));
    // After `endpoints`, which starts the second Dovecot.
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let split = std::env::var("MAILROOM_BENCH_CORES").is_ok_and(|v| v == "split");
    if split {
        split_cores(&bed.state_dir());
    }

    // 1. The ceiling: mailroom's probe alone, over the same mix of endpoints, at the
    //    concurrency the controller will be allowed against this one mail host.
    let ceiling_tests = n.clamp(400, 2000);
    // The most simultaneous connections Dovecot holds, sampled from the kernel; first
    // with the probe alone at exactly `per_host` at once, to calibrate the sampling.
    let ports: HashSet<u16> = ends.iter().map(|e| e.port).collect();
    // Warmed up first (the second Dovecot has just started: its login processes and auth
    // cache), and the best of two rounds: a single cold round measured anything from 122
    // to 174 tests/s on this machine, and the ceiling is what the server allows at best.
    probe_rate(&ends, ceiling_tests / 5, per_host).await;
    let sampler = ConnectionSampler::start(ports);
    let first = probe_rate(&ends, ceiling_tests, per_host).await;
    let ceiling_connections = sampler.take_max();
    let second = probe_rate(&ends, ceiling_tests, per_host).await;
    let ceiling = first.max(second);
    let ceiling_32 = probe_rate(&ends, ceiling_tests, 32).await;

    // 2. Namespaces, each with the trust anchors and the two Secrets.
    let names: Vec<String> = (0..namespaces)
        .map(|i| bed.namespace(&format!("fleet{i}")))
        .collect();
    for ns in &names {
        seed_namespace(&client, ns, &ends).await;
    }

    // 3. Every provider applied at once, before the controller starts: the ramp then
    //    measures the controller alone, not the API server's rate of creates on 2 cores
    //    (which it shares with Dovecot).
    let created_from = Instant::now();
    let providers: Vec<(String, String)> = (0..n)
        .map(|i| (names[i % namespaces].clone(), format!("p{i:05}")))
        .collect();
    futures::stream::iter(providers.iter().enumerate())
        .map(|(i, (ns, name))| {
            let api: Api<IncomingMailProvider> = Api::namespaced(client.clone(), ns);
            let spec = provider_spec(&ends[i % ends.len()], &interval_text);
            async move {
                let p: IncomingMailProvider = serde_json::from_value(json!({
                    "apiVersion": "mailroom.dev/v1alpha1", "kind": "IncomingMailProvider",
                    "metadata": {"name": name}, "spec": spec,
                }))
                .unwrap();
                api.create(&PostParams::default(), &p).await.unwrap();
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    let created = created_from.elapsed();

    // 4. The controller, watching every namespace.
    let metrics_addr = free_addr();
    // Kept outside the bed's folder, which goes with the bed.
    let log = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("fleet-controller.log");
    eprintln!("[bench] controller log: {}", log.display());
    let api0 = requests_by_verb(bed);
    sampler.take_max();
    // Where the machine's CPU goes during the ramp: the API server and etcd of this bed,
    // the controller, and the rest (Dovecot, the kernel).
    let apiserver = pid_of("kube-apiserver", &bed.state_dir());
    let etcd = pid_of("etcd", &bed.state_dir());
    let (api_cpu0, etcd_cpu0) = (support::process_cpu(apiserver), support::process_cpu(etcd));
    let machine0 = machine_cpu();
    let started = Instant::now();
    let controller = Command::new(env!("CARGO_BIN_EXE_mailroom"))
        .args(["controller", "--lease-namespace", &names[0]])
        .args(["--metrics-addr", &metrics_addr])
        .args(["--per-host-concurrency", &per_host.to_string()])
        .env("KUBECONFIG", bed.kubeconfig_path())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let controller = Stopped(controller);
    let pid = controller.0.id();
    wait_for_metrics(&metrics_addr);
    let rss_idle = proc_status_kib(pid, "VmRSS:");
    // Progress from the controller's own gauge (cheap), then one list to confirm.
    loop {
        let ready = metric(
            &scrape(&metrics_addr),
            "mailroom_providers",
            "ready=\"True\"",
        );
        if ready as usize >= n {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1800),
            "only {ready} of {n} Ready after 30 minutes; log {}",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let all_ready = started.elapsed();
    let ramp_cpu = support::process_cpu(pid);
    let ramp_api_cpu = support::process_cpu(apiserver) - api_cpu0;
    let ramp_etcd_cpu = support::process_cpu(etcd) - etcd_cpu0;
    let machine = machine_cpu();
    let ramp_busy = (machine.0 - machine0.0) / (machine.1 - machine0.1);
    let ramp_api = delta(&requests_by_verb(bed), &api0);
    let ramp_connections = sampler.take_max();
    let not_ready = count_not_ready(&client).await;
    assert_eq!(not_ready, 0, "the gauge said all Ready, the API does not");

    // 5. The steady state: every provider Ready, tests at the interval.
    let text = scrape(&metrics_addr);
    let writes0 = metric(&text, "mailroom_api_writes_total", "kind=\"status\"");
    let tests0 = metric(&text, "mailroom_tests_total", "");
    let api1 = requests_by_verb(bed);
    let cpu1 = support::process_cpu(pid);
    let steady_from = Instant::now();
    // Meanwhile, a Secret change: a canary provider whose password is fixed and broken
    // again, each time timed from the Secret's update to the status that follows.
    let latencies = secret_change_latencies(&client, &names[0], &ends[0], &interval_text).await;
    let rest = steady.saturating_sub(steady_from.elapsed());
    tokio::time::sleep(rest).await;
    let window = steady_from.elapsed();
    let text = scrape(&metrics_addr);
    let steady_writes = metric(&text, "mailroom_api_writes_total", "kind=\"status\"") - writes0;
    let steady_tests = metric(&text, "mailroom_tests_total", "") - tests0;
    let steady_api = delta(&requests_by_verb(bed), &api1);
    let steady_cpu = support::process_cpu(pid) - cpu1;
    let steady_connections = sampler.take_max();
    let peak_rss = proc_status_kib(pid, "VmHWM:");
    sampler.stop();
    drop(controller);

    // The report.
    let minutes = window.as_secs_f64() / 60.0;
    let intervals = window.as_secs_f64() / interval.as_secs_f64();
    let ceiling_secs = n as f64 / ceiling;
    println!(
        "mailroom fleet benchmark: {n} providers over {namespaces} namespaces and {} endpoints \
         of 2 Dovecots on {MAIL_HOST}; one controller (--per-host-concurrency {per_host}); \
         check.interval {interval_text}; {} cores{}",
        ends.len(),
        cores,
        if split {
            " (split: Dovecot alone on core 0; the API server, etcd, the probe and the controller on the rest)"
        } else {
            ", shared by all"
        }
    );
    let labels: Vec<&str> = ends.iter().map(|e| e.label).collect();
    println!("endpoints: {}", labels.join(", "));
    println!(
        "\nceiling (mailroom's probe alone, same endpoints, best of 2 rounds of {ceiling_tests} tests after a warm-up)"
    );
    row(
        &format!("tests/s at concurrency {per_host}"),
        format!("{ceiling:.0}  (rounds: {first:.0}, {second:.0})"),
    );
    row("tests/s at concurrency 32", format!("{ceiling_32:.0}"));
    row(
        &format!("most simultaneous connections at {per_host}"),
        format!(
            "{ceiling_connections}  (open in two dumps in a row - in one; the probe holds exactly {per_host})"
        ),
    );
    row(
        &format!("{n} tests at that rate (s)"),
        format!("{ceiling_secs:.1}"),
    );
    println!("\nramp");
    row(
        "created, 32 in flight (s)",
        format!("{:.1}", created.as_secs_f64()),
    );
    row(
        "all Ready after the controller's start (s)",
        format!(
            "{:.1}  = {:.2} x the ceiling (target <= 1.20)",
            all_ready.as_secs_f64(),
            all_ready.as_secs_f64() / ceiling_secs
        ),
    );
    row(
        "controller RSS at start / peak (MiB)",
        format!(
            "{:.1} / {:.1}  (target < 200)",
            rss_idle as f64 / 1024.0,
            peak_rss as f64 / 1024.0
        ),
    );
    row("controller CPU (s)", format!("{ramp_cpu:.1}"));
    row(
        "API server / etcd CPU (s)",
        format!("{ramp_api_cpu:.1} / {ramp_etcd_cpu:.1}"),
    );
    row(
        "machine CPU busy (all cores)",
        format!("{:.0}%", ramp_busy * 100.0),
    );
    row(
        "most simultaneous connections at Dovecot",
        format!("{ramp_connections}  (two dumps - one; limit {per_host})"),
    );
    println!("  API requests of the ramp, by verb");
    for (verb, count) in &ramp_api {
        println!("    {verb:<34} {count:>10.0}");
    }
    println!(
        "\nsteady state ({:.0} s = {intervals:.2} intervals)",
        window.as_secs_f64()
    );
    row(
        "tests per provider per interval",
        format!("{:.2}", steady_tests / n as f64 / intervals),
    );
    row(
        "status writes per provider per interval",
        format!(
            "{:.2}  (target <= 1; writes {steady_writes:.0}, tests {steady_tests:.0})",
            steady_writes / n as f64 / intervals
        ),
    );
    row(
        "controller CPU (s per minute)",
        format!("{:.2}", steady_cpu / minutes),
    );
    row(
        "most simultaneous connections at Dovecot",
        format!("{steady_connections}  (two dumps - one; limit {per_host})"),
    );
    println!("  API requests per minute, by verb (incl. the canary's Secret updates)");
    for (verb, count) in &steady_api {
        println!("    {verb:<34} {:>10.1}", count / minutes);
    }
    let mut sorted = latencies.clone();
    sorted.sort_by(f64::total_cmp);
    println!("\nSecret change to new status, {} changes", sorted.len());
    row(
        "median / max (s)",
        format!(
            "{:.2} / {:.2}  (target < 5)",
            sorted[sorted.len() / 2],
            sorted[sorted.len() - 1]
        ),
    );
}

/// The controller under test, killed when the benchmark ends, even by a failed assertion.
struct Stopped(std::process::Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn row(what: &str, value: String) {
    println!("  {what:<44} {value}");
}

fn provider_spec(e: &Endpoint, interval: &str) -> serde_json::Value {
    json!({
        "server": {"host": MAIL_HOST.to_string(), "port": e.port,
                   "protocol": match e.protocol { Protocol::Imap => "IMAP", Protocol::Pop3 => "POP3" }},
        "tls": {"mode": match e.tls { TlsMode::StartTls => "StartTLS", _ => "Implicit" },
                "caBundleRef": {"kind": "ConfigMap", "name": e.ca}},
        "authentication": {"method": "Password", "secretRef": {"name": e.secret}},
        "check": {"interval": interval},
    })
}

/// Tests per second of mailroom's probe alone over `ends`, `concurrency` at a time.
async fn probe_rate(ends: &Arc<Vec<Endpoint>>, tests: usize, concurrency: usize) -> f64 {
    let targets: Vec<(Arc<Target>, Arc<Login>)> = ends
        .iter()
        .map(|e| {
            let target = Target {
                host: MAIL_HOST.to_string(),
                port: e.port,
                protocol: e.protocol,
                tls_mode: e.tls,
                trust: Trust {
                    extra_roots_pem: Some(e.ca_pem.clone().into_bytes()),
                    server_name: None,
                    insecure_skip_verify: false,
                },
                mailbox: "INBOX".into(),
                timeout: Duration::from_secs(30),
            };
            let login = Login::Password {
                username: e.user.clone(),
                password: SecretString::from(e.password.clone()),
                allow_unencrypted: false,
            };
            (Arc::new(target), Arc::new(login))
        })
        .collect();
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (targets, next) = (targets.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= tests {
                        break;
                    }
                    let (target, login) = &targets[i % targets.len()];
                    let report = probe::run(target, login).await;
                    assert!(report.failure.is_none(), "{:?}", report.failure);
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    tests as f64 / started.elapsed().as_secs_f64()
}

async fn seed_namespace(client: &kube::Client, ns: &str, ends: &[Endpoint]) {
    let pp = PostParams::default();
    let mut seen = HashSet::new();
    for e in ends {
        if seen.insert(e.ca) {
            let cm: ConfigMap = serde_json::from_value(
                json!({"metadata": {"name": e.ca}, "data": {"ca.crt": e.ca_pem}}),
            )
            .unwrap();
            Api::namespaced(client.clone(), ns)
                .create(&pp, &cm)
                .await
                .unwrap();
        }
        if seen.insert(e.secret) {
            let s: Secret = serde_json::from_value(json!({"metadata": {"name": e.secret},
                "stringData": {"username": e.user, "password": e.password}}))
            .unwrap();
            Api::namespaced(client.clone(), ns)
                .create(&pp, &s)
                .await
                .unwrap();
        }
    }
}

/// Ten timed Secret changes of one provider: right password (until Ready), wrong one
/// (until AuthenticationFailed), five times.
async fn secret_change_latencies(
    client: &kube::Client,
    ns: &str,
    e: &Endpoint,
    interval: &str,
) -> Vec<f64> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let providers: Api<IncomingMailProvider> = Api::namespaced(client.clone(), ns);
    let set = |password: String| {
        let secrets = secrets.clone();
        let user = e.user.clone();
        async move {
            let s = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "canary"},
                "stringData": {"username": user, "password": password}});
            secrets
                .patch(
                    "canary",
                    &PatchParams::apply("mailroom-bench").force(),
                    &Patch::Apply(s),
                )
                .await
                .unwrap();
        }
    };
    set("wrong".into()).await;
    let mut spec = provider_spec(e, interval);
    spec["authentication"]["secretRef"]["name"] = json!("canary");
    let p: IncomingMailProvider = serde_json::from_value(json!({
        "apiVersion": "mailroom.dev/v1alpha1", "kind": "IncomingMailProvider",
        "metadata": {"name": "canary"}, "spec": spec,
    }))
    .unwrap();
    providers.create(&PostParams::default(), &p).await.unwrap();
    wait_reason(&providers, "AuthenticationFailed", Duration::from_secs(120)).await;
    let mut latencies = Vec::new();
    for _ in 0..5 {
        for (password, reason) in [
            (e.password.clone(), "Connected"),
            ("wrong".to_string(), "AuthenticationFailed"),
        ] {
            let t = Instant::now();
            set(password).await;
            wait_reason(&providers, reason, Duration::from_secs(120)).await;
            latencies.push(t.elapsed().as_secs_f64());
        }
    }
    latencies
}

async fn wait_reason(api: &Api<IncomingMailProvider>, reason: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let p = api.get("canary").await.unwrap();
        let now = p.status.as_ref().and_then(|s| {
            s.conditions
                .iter()
                .find(|c| c.type_ == "Ready")
                .map(|c| c.reason.clone())
        });
        if now.as_deref() == Some(reason) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "canary still {now:?}, not {reason}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn count_not_ready(client: &kube::Client) -> usize {
    let api: Api<IncomingMailProvider> = Api::all(client.clone());
    let list = api.list(&ListParams::default()).await.unwrap();
    list.items
        .iter()
        .filter(|p| {
            !p.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            })
        })
        .count()
}

/// Samples ESTABLISHED server-side connections of the given ports every 20 ms. No dump
/// is a snapshot: the kernel walks its table bucket by bucket while connections close and
/// open, so one dump may count a closing connection and its successor together (9 seen
/// with the probe holding exactly 8). So two figures bracket the truth: the most in one
/// dump (may overstate), and the most present in two dumps in a row (each was open
/// throughout the moment between them, so never more than Dovecot held then; it misses
/// connections shorter than the gap). The exact per-host bound is asserted by an
/// end-to-end test with a counting relay.
struct ConnectionSampler {
    max: Arc<Mutex<Bracket>>,
    stop: Arc<AtomicBool>,
}

/// The most simultaneous connections sampled: at least `low`, at most `high`.
#[derive(Clone, Copy, Default)]
struct Bracket {
    low: usize,
    high: usize,
}

impl std::fmt::Display for Bracket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.low == self.high {
            write!(f, "{}", self.low)
        } else {
            write!(f, "{}-{}", self.low, self.high)
        }
    }
}

impl ConnectionSampler {
    fn start(ports: HashSet<u16>) -> ConnectionSampler {
        let max = Arc::new(Mutex::new(Bracket::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (m, s) = (max.clone(), stop.clone());
        let host = MAIL_HOST.octets();
        std::thread::spawn(move || {
            let diag = SockDiag::open().expect("a NETLINK_SOCK_DIAG socket");
            let mut before = HashSet::new();
            while !s.load(Ordering::Relaxed) {
                let now = diag.established(|local, port| local == host && ports.contains(&port));
                {
                    let mut m = m.lock().unwrap();
                    m.high = m.high.max(now.len());
                    m.low = m.low.max(now.intersection(&before).count());
                }
                before = now;
                // A dump walks the kernel's whole table of connections: every 5 ms it
                // took a fifth of a core from the system under test.
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        ConnectionSampler { max, stop }
    }

    fn take_max(&self) -> Bracket {
        std::mem::take(&mut *self.max.lock().unwrap())
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Asks the kernel for its ESTABLISHED IPv4 TCP sockets (sock_diag, as `ss` does). Why
/// not /proc/net/tcp: after thousands of tests it lists thousands of TIME_WAIT sockets,
/// and reading it took a third of a core and hundreds of reads, long enough for
/// connections that closed and others that opened meanwhile to be counted together
/// (13 seen at a bound of 8). The kernel filters by state here, in one quick dump.
struct SockDiag(std::os::fd::OwnedFd);

impl SockDiag {
    fn open() -> std::io::Result<SockDiag> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain socket(2); the descriptor is owned from here on.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        Ok(SockDiag(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }))
    }

    /// The ESTABLISHED sockets whose local address and port `wanted` accepts, by their
    /// kernel cookie (unique per socket).
    fn established(&self, wanted: impl Fn([u8; 4], u16) -> bool) -> HashSet<u64> {
        use std::os::fd::AsRawFd;
        const SOCK_DIAG_BY_FAMILY: u16 = 20;
        const TCP_ESTABLISHED: u32 = 1;
        // struct nlmsghdr (16 bytes) + struct inet_diag_req_v2 (56 bytes).
        let mut req = [0u8; 72];
        req[0..4].copy_from_slice(&72u32.to_ne_bytes());
        req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
        req[6..8].copy_from_slice(&flags.to_ne_bytes());
        req[16] = libc::AF_INET as u8;
        req[17] = libc::IPPROTO_TCP as u8;
        req[20..24].copy_from_slice(&(1u32 << TCP_ESTABLISHED).to_ne_bytes());
        let fd = self.0.as_raw_fd();
        // SAFETY: sending a buffer we own to the kernel (pid 0) over our socket.
        let sent = unsafe {
            let mut to: libc::sockaddr_nl = std::mem::zeroed();
            to.nl_family = libc::AF_NETLINK as u16;
            libc::sendto(
                fd,
                req.as_ptr().cast(),
                req.len(),
                0,
                (&raw const to).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if sent < 0 {
            return HashSet::new();
        }
        let mut found = HashSet::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: receiving into a buffer we own, at most its length.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n <= 0 {
                return found;
            }
            let mut at = 0;
            let end = n as usize;
            while at + 16 <= end {
                let len = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
                let kind = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().unwrap());
                if kind == libc::NLMSG_DONE as u16 || kind == libc::NLMSG_ERROR as u16 {
                    return found;
                }
                // struct inet_diag_msg: family, state, timer, retrans, then the socket
                // id: source port (big-endian), destination port, source address (16
                // bytes), destination address (16), interface (4), cookie (8).
                let msg = &buf[at + 16..at + len.max(16)];
                if msg.len() >= 52 {
                    let port = u16::from_be_bytes([msg[4], msg[5]]);
                    let local = [msg[8], msg[9], msg[10], msg[11]];
                    if wanted(local, port) {
                        found.insert(u64::from_ne_bytes(msg[44..52].try_into().unwrap()));
                    }
                }
                at += len.max(16).next_multiple_of(4);
            }
        }
    }
}

/// Puts the bed's Dovecots (masters and every process they have started; the ones they
/// start later inherit it) on core 0, and this process (so the probe and the controller
/// it starts), the API server and etcd on the other cores.
fn split_cores(dir: &std::path::Path) {
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    assert!(
        cores >= 2,
        "MAILROOM_BENCH_CORES=split needs 2 cores or more"
    );
    let rest = format!("1-{}", cores - 1);
    let taskset = |cpus: &str, pid: u32| {
        let ok = Command::new("taskset")
            .args(["-a", "-p", "-c", cpus, &pid.to_string()])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "taskset -a -p -c {cpus} {pid} failed");
    };
    let parents: Vec<(u32, u32)> = pids()
        .filter_map(|pid| Some((pid, support::stat_fields(pid).get(1)?.parse().ok()?)))
        .collect();
    let mut dovecot = pids_of("dovecot", dir);
    assert!(
        !dovecot.is_empty(),
        "no Dovecot of the bed in {}",
        dir.display()
    );
    let mut i = 0;
    while i < dovecot.len() {
        let parent = dovecot[i];
        dovecot.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    for pid in dovecot {
        taskset("0", pid);
    }
    for pid in [
        std::process::id(),
        pid_of("kube-apiserver", dir),
        pid_of("etcd", dir),
    ] {
        taskset(&rest, pid);
    }
}

/// The processes named `name` whose command line mentions `dir` (this bed's).
fn pids_of(name: &str, dir: &std::path::Path) -> Vec<u32> {
    let dir = dir.to_string_lossy();
    pids()
        .filter(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            comm.trim() == name && String::from_utf8_lossy(&cmd).contains(dir.as_ref())
        })
        .collect()
}

/// Every running process's pid.
fn pids() -> impl Iterator<Item = u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
}

/// The process named `name` whose command line mentions `dir` (this bed's).
fn pid_of(name: &str, dir: &std::path::Path) -> u32 {
    *pids_of(name, dir)
        .first()
        .unwrap_or_else(|| panic!("no {name} of the bed in {}", dir.display()))
}

/// (busy, total) clock ticks of all cores since boot, from /proc/stat.
fn machine_cpu() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: f64 = ticks.iter().take(8).sum();
    // user nice system idle iowait irq softirq steal: idle and iowait are not busy.
    (total - ticks[3] - ticks[4], total)
}

fn install_crd(bed: &Bed) {
    let crd = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/crds/incomingmailprovider.yaml"
    );
    for args in [
        vec!["apply", "--server-side", "-f", crd],
        vec![
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/incomingmailproviders.mailroom.dev",
        ],
    ] {
        assert!(bed.kubectl().args(&args).status().unwrap().success());
    }
}

async fn client(bed: &Bed) -> kube::Client {
    let kc = Kubeconfig::read_from(bed.kubeconfig_path()).unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    config.read_timeout = Some(Duration::from_secs(120));
    kube::Client::try_from(config).unwrap()
}

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

fn scrape(addr: &str) -> String {
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    );
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text
}

fn wait_for_metrics(addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !scrape(addr).contains("mailroom_") {
        assert!(Instant::now() < deadline, "no /metrics on {addr}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The sum of a metric's samples whose labels contain `labels`.
fn metric(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']) && l.contains(labels)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn proc_status_kib(pid: u32, key: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// apiserver_request_total summed by verb and resource, for what mailroom touches.
fn requests_by_verb(bed: &Bed) -> BTreeMap<String, f64> {
    let out = bed
        .kubectl()
        .args(["get", "--raw", "/metrics"])
        .output()
        .unwrap();
    let mut by_verb = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(labels) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let label = |key: &str| {
            labels
                .split(&format!("{key}=\""))
                .nth(1)
                .and_then(|v| v.split('"').next())
                .unwrap_or("")
                .to_string()
        };
        let resource = label("resource");
        let touched = [
            "incomingmailproviders",
            "secrets",
            "configmaps",
            "events",
            "leases",
        ];
        if !touched.contains(&resource.as_str()) {
            continue;
        }
        let sub = label("subresource");
        let key = format!(
            "{} {resource}{}",
            label("verb"),
            if sub.is_empty() {
                String::new()
            } else {
                format!("/{sub}")
            }
        );
        let value: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        *by_verb.entry(key).or_insert(0.0) += value;
    }
    by_verb
}

fn delta(after: &BTreeMap<String, f64>, before: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v > 0.0)
        .collect()
}
