//! Probe benchmark: client CPU per test and throughput of mailroom's probe against the
//! test bed's Dovecot, beside Python's imaplib / poplib doing the same sequence (login,
//! STATUS or STAT, logout) in the same run. Prints a table; asserts nothing.
//!
//! A third row set, IMAP STARTTLS, adds Prometheus blackbox_exporter running the
//! `imap_starttls` TCP probe of its example configuration (greeting, STARTTLS, TLS,
//! CAPABILITY: no login, no mailbox), so less work per test than mailroom and Python do.
//!
//! A last table puts mailroom's sequential test beside the same connection without login
//! and mailbox (TCP, TLS handshake, greeting, logout), the part no client can skip.
//!
//! Run: `scripts/bench probe` (builds blackbox_exporter first; `cargo bench --bench probe`
//! works once MAILROOM_BLACKBOX_EXPORTER names it). MAILROOM_BENCH_TESTS=N changes the
//! sample size; MAILROOM_BENCH_PROFILE=1 runs only mailroom's sequential IMAPS loop, for a
//! profiler.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mailroom::api::{Protocol, TlsMode};
use mailroom::probe::{self, Login, Target, Trust};
use secrecy::SecretString;

mod support;

fn cpu_seconds() -> f64 {
    let (user, sys) = user_sys();
    user + sys
}

fn user_sys() -> (f64, f64) {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct it is given.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (tv(ru.ru_utime), tv(ru.ru_stime))
}

struct Run {
    tests: usize,
    wall: f64,
    cpu: f64,
}

impl Run {
    fn rate(&self) -> f64 {
        self.tests as f64 / self.wall
    }
    fn cpu_ms(&self) -> f64 {
        self.cpu * 1000.0 / self.tests as f64
    }
}

async fn mailroom_run(
    target: Arc<Target>,
    login: Arc<Login>,
    tests: usize,
    concurrency: usize,
) -> Run {
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let per = tests / concurrency;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (target, login) = (target.clone(), login.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..per {
                let report = probe::run(&target, &login).await;
                assert!(
                    report.failure.is_none(),
                    "a benchmark test failed: {:?}",
                    report.failure
                );
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    Run {
        tests: per * concurrency,
        wall: t0.elapsed().as_secs_f64(),
        cpu: cpu_seconds() - cpu0,
    }
}

fn python_run(
    protocol: &str,
    port: u16,
    user: &str,
    password: &str,
    ca: &str,
    tests: usize,
    workers: usize,
) -> Run {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/python_baseline.py");
    let out = Command::new("python3")
        .args([
            script,
            "--protocol",
            protocol,
            "--host",
            &mailroom_testbed::MAIL_HOST.to_string(),
        ])
        .args([
            "--port",
            &port.to_string(),
            "--user",
            user,
            "--password",
            password,
            "--ca",
            ca,
        ])
        .args([
            "--tests",
            &tests.to_string(),
            "--workers",
            &workers.to_string(),
        ])
        .output()
        .expect("running python3");
    assert!(
        out.status.success(),
        "python baseline failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    Run {
        tests: v["tests"].as_u64().unwrap() as usize,
        wall: v["wall_s"].as_f64().unwrap(),
        cpu: v["cpu_s"].as_f64().unwrap(),
    }
}

fn main() {
    let tests: usize = std::env::var("MAILROOM_BENCH_TESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    let bed = mailroom_testbed::shared();
    let dovecot = bed.dovecot();
    let (user, password) = dovecot.account("alice");
    let ca_file = dovecot.ca_file();
    let ca = ca_file.to_str().unwrap().to_string();
    let pem = std::fs::read(&ca_file).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let login = Arc::new(Login::Password {
        username: user.clone(),
        password: SecretString::from(password.clone()),
        allow_unencrypted: false,
    });

    if std::env::var_os("MAILROOM_BENCH_PROFILE").is_some() {
        let target = tls_target(
            Protocol::Imap,
            dovecot.imaps_port(),
            TlsMode::Implicit,
            &pem,
        );
        let m = rt.block_on(mailroom_run(target.clone(), login.clone(), tests, 1));
        println!(
            "mailroom IMAPS sequential, multi-thread runtime: {:.2} ms client CPU per test",
            m.cpu_ms()
        );
        let (u0, s0) = user_sys();
        let ct = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let m = ct.block_on(mailroom_run(target, login, tests, 1));
        println!(
            "mailroom IMAPS sequential, current-thread runtime: {:.2} ms client CPU per test",
            m.cpu_ms()
        );
        let (u1, s1) = user_sys();
        println!(
            "  of which user {:.2} ms, system {:.2} ms",
            (u1 - u0) * 1e3 / tests as f64,
            (s1 - s0) * 1e3 / tests as f64
        );
        return;
    }
    println!(
        "mailroom probe benchmark: {tests} tests per row, Dovecot {} on {}",
        dovecot_version(),
        mailroom_testbed::MAIL_HOST
    );
    println!(
        "machine: {} cores; client CPU = user+system seconds of the client process(es)\n",
        num_cpus()
    );
    println!(
        "{:<8} {:>4}  {:>12} {:>12} {:>7}  {:>12} {:>12} {:>7}",
        "test", "conc", "mailroom/s", "python/s", "ratio", "mailroom ms", "python ms", "ratio"
    );
    let blackbox = Blackbox::start(&ca, bed.state_dir().join("blackbox"));
    let mut ceiling: f64 = 0.0;
    let mut rows = Vec::new();
    let mut blackbox_rows = Vec::new();
    let mut floors = Vec::new();
    for (name, protocol, py, port, mode) in [
        (
            "IMAPS",
            Protocol::Imap,
            "imap",
            dovecot.imaps_port(),
            TlsMode::Implicit,
        ),
        (
            "POP3S",
            Protocol::Pop3,
            "pop3",
            dovecot.pop3s_port(),
            TlsMode::Implicit,
        ),
        (
            "IMAP+TLS",
            Protocol::Imap,
            "imap-starttls",
            dovecot.imap_port(),
            TlsMode::StartTls,
        ),
    ] {
        let target = tls_target(protocol, port, mode, &pem);
        // Warm up both sides (Dovecot's auth cache, login processes).
        rt.block_on(mailroom_run(target.clone(), login.clone(), 16, 4));
        for conc in [1, 8, 32] {
            let m = rt.block_on(mailroom_run(target.clone(), login.clone(), tests, conc));
            let p = python_run(py, port, &user, &password, &ca, tests, conc);
            ceiling = ceiling.max(m.rate()).max(p.rate());
            println!(
                "{:<8} {:>4}  {:>12.0} {:>12.0} {:>7.2}  {:>12.2} {:>12.2} {:>7.2}",
                name,
                conc,
                m.rate(),
                p.rate(),
                m.rate() / p.rate(),
                m.cpu_ms(),
                p.cpu_ms(),
                m.cpu_ms() / p.cpu_ms()
            );
            rows.push((name, conc, m.rate()));
            if conc == 1 {
                // The same connection without login and mailbox: what TCP, the TLS handshake
                // and the greeting alone cost this client, against the row's Python figure.
                let none = Arc::new(Login::None);
                let f = rt.block_on(mailroom_run(target.clone(), none, tests, 1));
                floors.push((name, f.cpu_ms(), m.cpu_ms(), p.cpu_ms()));
            }
            if mode == TlsMode::StartTls {
                let b = rt.block_on(blackbox.run(port, tests, conc));
                blackbox_rows.push((conc, m, b));
            }
        }
    }
    println!(
        "\nIMAP STARTTLS beside blackbox_exporter {} (imap_starttls module: greeting, STARTTLS, \
         CAPABILITY; no login)",
        blackbox.version
    );
    println!(
        "{:<8} {:>4}  {:>12} {:>12} {:>7}  {:>12} {:>12} {:>7}",
        "test", "conc", "mailroom/s", "blackbox/s", "ratio", "mailroom ms", "blackbox ms", "ratio"
    );
    for (conc, m, b) in &blackbox_rows {
        println!(
            "{:<8} {:>4}  {:>12.0} {:>12.0} {:>7.2}  {:>12.2} {:>12.2} {:>7.2}",
            "IMAP+TLS",
            conc,
            m.rate(),
            b.rate(),
            m.rate() / b.rate(),
            m.cpu_ms(),
            b.cpu_ms(),
            m.cpu_ms() / b.cpu_ms()
        );
    }
    println!(
        "\nconcurrency 1, client CPU per test: mailroom without login (TCP, TLS handshake, \
         greeting, logout) beside its full test and a quarter of Python's"
    );
    println!(
        "{:<8}  {:>14} {:>14} {:>16}",
        "test", "no login ms", "full test ms", "python / 4 ms"
    );
    for (name, floor, full, python) in &floors {
        println!(
            "{:<8}  {:>14.2} {:>14.2} {:>16.2}",
            name,
            floor,
            full,
            python / 4.0
        );
    }
    println!(
        "\nserver ceiling (best rate any client reached at any concurrency): {ceiling:.0} tests/s"
    );
    for (name, conc, rate) in rows.iter().filter(|r| r.1 == 8) {
        println!(
            "{name} at concurrency {conc}: mailroom {rate:.0}/s = {:.0}% of the ceiling",
            100.0 * rate / ceiling
        );
    }
}

/// The bed's server over TLS, trusting the bed's CA.
fn tls_target(protocol: Protocol, port: u16, tls_mode: TlsMode, ca_pem: &[u8]) -> Arc<Target> {
    Arc::new(Target {
        host: mailroom_testbed::MAIL_HOST.to_string(),
        port,
        protocol,
        tls_mode,
        trust: Trust {
            extra_roots_pem: Some(ca_pem.to_vec()),
            server_name: None,
            insecure_skip_verify: false,
        },
        mailbox: "INBOX".into(),
        timeout: Duration::from_secs(30),
    })
}

fn dovecot_version() -> String {
    Command::new("dovecot")
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .next()
                .unwrap_or("?")
                .to_string()
        })
        .unwrap_or_else(|_| "?".into())
}

fn num_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Prometheus blackbox_exporter, run with the `imap_starttls` module of its example
/// configuration, probed over HTTP as Prometheus would.
struct Blackbox {
    child: std::process::Child,
    addr: String,
    version: String,
}

impl Blackbox {
    fn start(ca_file: &str, dir: std::path::PathBuf) -> Blackbox {
        let bin = std::env::var("MAILROOM_BLACKBOX_EXPORTER").unwrap_or_else(|_| {
            panic!(
                "MAILROOM_BLACKBOX_EXPORTER is not set: run the benchmark with scripts/bench, \
                 which builds blackbox_exporter from its Go module"
            )
        });
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("blackbox.yml");
        std::fs::write(
            &config,
            format!(
                "modules:\n  imap_starttls:\n    prober: tcp\n    timeout: 5s\n    tcp:\n      \
                 query_response:\n        - expect: \"OK.*STARTTLS\"\n        - send: \". STARTTLS\"\n        \
                 - expect: \"OK\"\n        - starttls: true\n        - send: \". capability\"\n        \
                 - expect: \"CAPABILITY IMAP4rev1\"\n      tls_config:\n        ca_file: {ca_file}\n"
            ),
        )
        .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        // Built without the release's version stamp; scripts/bench says which one it built.
        let version = std::env::var("MAILROOM_BLACKBOX_VERSION").unwrap_or_else(|_| "?".into());
        let child = Command::new(&bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("blackbox.log")).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {bin}: {e}"));
        let b = Blackbox {
            child,
            addr,
            version,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while http_get(&b.addr, "/-/healthy").is_none() {
            assert!(Instant::now() < deadline, "blackbox_exporter did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        b
    }

    /// `tests` probes of 127.0.0.2:`port`, `concurrency` at a time; the exporter's CPU.
    async fn run(&self, port: u16, tests: usize, concurrency: usize) -> Run {
        let path = format!(
            "/probe?module=imap_starttls&target={}:{port}",
            mailroom_testbed::MAIL_HOST
        );
        let cpu0 = support::process_cpu(self.child.id());
        let t0 = Instant::now();
        let per = tests / concurrency;
        let mut tasks = Vec::new();
        for _ in 0..concurrency {
            let (addr, path) = (self.addr.clone(), path.clone());
            tasks.push(tokio::task::spawn_blocking(move || {
                for _ in 0..per {
                    let body = http_get(&addr, &path).expect("blackbox_exporter answers");
                    assert!(
                        body.contains("probe_success 1"),
                        "a blackbox probe failed:\n{body}"
                    );
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        Run {
            tests: per * concurrency,
            wall: t0.elapsed().as_secs_f64(),
            cpu: support::process_cpu(self.child.id()) - cpu0,
        }
    }
}

impl Drop for Blackbox {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The body of a GET, or `None` if nothing answers.
fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    Some(text)
}
