//! Fleet benchmark: N providers (default 1,000) applied at once to the test bed's API
//! server with the controller running; prints the seconds until all are Ready, the
//! controller's peak RSS and CPU seconds, and the API requests it cost, by verb.
//!
//! Run: `cargo bench --bench fleet` (MAILROOM_BENCH_PROVIDERS=N to change N).

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{Api, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use mailroom::api::IncomingMailProvider;

fn proc_status(pid: u32, key: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the whole line; 12 and 13 after the ')'.
    (ticks(11) + ticks(12)) / 100.0
}

/// apiserver_request_total summed by verb, for resources mailroom touches.
fn requests_by_verb(bed: &mailroom_testbed::Bed) -> BTreeMap<String, f64> {
    let out = bed
        .kubectl()
        .args(["get", "--raw", "/metrics"])
        .output()
        .unwrap();
    let mut by_verb = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if !line.starts_with("apiserver_request_total{") {
            continue;
        }
        let touched = ["incomingmailproviders", "secrets", "configmaps", "events"]
            .iter()
            .any(|r| line.contains(&format!("resource=\"{r}\"")));
        if !touched {
            continue;
        }
        let verb = line
            .split("verb=\"")
            .nth(1)
            .and_then(|v| v.split('"').next())
            .unwrap_or("?");
        let sub = if line.contains("subresource=\"status\"") {
            "/status"
        } else {
            ""
        };
        let value: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        *by_verb.entry(format!("{verb}{sub}")).or_insert(0.0) += value;
    }
    by_verb
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("MAILROOM_BENCH_PROVIDERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let bed = mailroom_testbed::shared();
    let crd = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/crds/incomingmailprovider.yaml"
    );
    assert!(
        bed.kubectl()
            .args(["apply", "--server-side", "-f", crd])
            .status()
            .unwrap()
            .success()
    );
    assert!(
        bed.kubectl()
            .args([
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                "crd/incomingmailproviders.mailroom.dev"
            ])
            .status()
            .unwrap()
            .success()
    );
    let ns = bed.namespace("fleet");
    let kc = Kubeconfig::read_from(bed.kubeconfig_path()).unwrap();
    let client = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .unwrap(),
    )
    .unwrap();
    let dovecot = bed.dovecot();
    let (user, password) = dovecot.account("alice");
    let ca = std::fs::read_to_string(dovecot.ca_file()).unwrap();
    let pp = PostParams::default();
    Api::namespaced(client.clone(), &ns)
        .create(
            &pp,
            &serde_json::from_value::<k8s_openapi::api::core::v1::ConfigMap>(serde_json::json!({
            "metadata": {"name": "test-ca"}, "data": {"ca.crt": ca}}))
            .unwrap(),
        )
        .await
        .unwrap();
    Api::namespaced(client.clone(), &ns)
        .create(
            &pp,
            &serde_json::from_value::<k8s_openapi::api::core::v1::Secret>(serde_json::json!({
            "metadata": {"name": "alice"}, "stringData": {"username": user, "password": password}}))
            .unwrap(),
        )
        .await
        .unwrap();

    let log = bed.state_dir().join("fleet-controller.log");
    let mut controller = Command::new(env!("CARGO_BIN_EXE_mailroom"))
        .args(["controller", "--namespace", &ns])
        .env("KUBECONFIG", bed.kubeconfig_path())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let pid = controller.id();
    tokio::time::sleep(Duration::from_secs(2)).await; // let it list and watch an empty namespace
    let before = requests_by_verb(bed);
    let rss_idle = proc_status(pid, "VmRSS:");

    let api: Api<IncomingMailProvider> = Api::namespaced(client.clone(), &ns);
    let started = Instant::now();
    let protocols = [
        ("IMAP", dovecot.imaps_port()),
        ("POP3", dovecot.pop3s_port()),
    ];
    futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            let (protocol, port) = protocols[i % 2];
            async move {
                let p: IncomingMailProvider = serde_json::from_value(serde_json::json!({
                    "apiVersion": "mailroom.dev/v1alpha1", "kind": "IncomingMailProvider",
                    "metadata": {"name": format!("p{i:05}")},
                    "spec": {
                        "server": {"host": mailroom_testbed::MAIL_HOST.to_string(), "port": port, "protocol": protocol},
                        "tls": {"caBundleRef": {"kind": "ConfigMap", "name": "test-ca"}},
                        "authentication": {"method": "Password", "secretRef": {"name": "alice"}},
                    }
                }))
                .unwrap();
                api.create(&PostParams::default(), &p).await.unwrap();
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    let applied = started.elapsed();

    let mut peak_rss = 0;
    let all_ready = loop {
        peak_rss = peak_rss.max(proc_status(pid, "VmHWM:"));
        let list = api.list(&ListParams::default()).await.unwrap();
        let ready = list
            .items
            .iter()
            .filter(|p| {
                p.status.as_ref().is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                })
            })
            .count();
        if ready == n {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "only {ready} of {n} Ready after 10 minutes; log {}",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let cpu = cpu_seconds(pid);
    peak_rss = peak_rss.max(proc_status(pid, "VmHWM:"));
    let after = requests_by_verb(bed);
    let _ = controller.kill();
    let _ = controller.wait();

    println!(
        "mailroom fleet benchmark: {n} providers (half IMAPS, half POP3S) on one Dovecot, one controller"
    );
    println!(
        "  created (32 in flight)        {:>8.1} s",
        applied.as_secs_f64()
    );
    println!(
        "  all Ready after               {:>8.1} s (from the first create)",
        all_ready.as_secs_f64()
    );
    println!(
        "  controller RSS idle / peak    {:>8.1} / {:.1} MiB",
        rss_idle as f64 / 1024.0,
        peak_rss as f64 / 1024.0
    );
    println!("  controller CPU                {:>8.1} s", cpu);
    println!("  API requests during the ramp, by verb (providers, secrets, configmaps, events):");
    for (verb, count) in &after {
        let delta = count - before.get(verb).copied().unwrap_or(0.0);
        if delta > 0.0 {
            println!("    {verb:<14} {delta:>8.0}");
        }
    }
}
