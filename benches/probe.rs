//! Probe benchmark: client CPU per test and throughput of mailroom's probe against the
//! test bed's Dovecot, beside Python's imaplib / poplib doing the same sequence (login,
//! STATUS or STAT, logout) in the same run. Prints a table; asserts nothing.
//!
//! Run: `cargo bench --bench probe` (MAILROOM_BENCH_TESTS=N to change the sample size;
//! MAILROOM_BENCH_PROFILE=1 runs only mailroom's sequential IMAPS loop, for a profiler).

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mailroom::api::{Protocol, TlsMode};
use mailroom::probe::{self, Login, Target, Trust};
use secrecy::SecretString;

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
        let target = implicit_tls(Protocol::Imap, dovecot.imaps_port(), &pem);
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
        "{:<7} {:>4}  {:>12} {:>12} {:>7}  {:>12} {:>12} {:>7}",
        "test", "conc", "mailroom/s", "python/s", "ratio", "mailroom ms", "python ms", "ratio"
    );
    let mut ceiling: f64 = 0.0;
    let mut rows = Vec::new();
    for (name, protocol, py, port) in [
        ("IMAPS", Protocol::Imap, "imap", dovecot.imaps_port()),
        ("POP3S", Protocol::Pop3, "pop3", dovecot.pop3s_port()),
    ] {
        let target = implicit_tls(protocol, port, &pem);
        // Warm up both sides (Dovecot's auth cache, login processes).
        rt.block_on(mailroom_run(target.clone(), login.clone(), 16, 4));
        for conc in [1, 8, 32] {
            let m = rt.block_on(mailroom_run(target.clone(), login.clone(), tests, conc));
            let p = python_run(py, port, &user, &password, &ca, tests, conc);
            ceiling = ceiling.max(m.rate()).max(p.rate());
            println!(
                "{:<7} {:>4}  {:>12.0} {:>12.0} {:>7.2}  {:>12.2} {:>12.2} {:>7.2}",
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
        }
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

/// The bed's server over implicit TLS, trusting the bed's CA.
fn implicit_tls(protocol: Protocol, port: u16, ca_pem: &[u8]) -> Arc<Target> {
    Arc::new(Target {
        host: mailroom_testbed::MAIL_HOST.to_string(),
        port,
        protocol,
        tls_mode: TlsMode::Implicit,
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
