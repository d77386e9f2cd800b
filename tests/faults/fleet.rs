//! Many providers at once, through the kube API rather than one kubectl per object:
//! creating them, asking for tests, waiting until all of them say something, and the
//! controller's memory as the kernel counts it.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use mailroom::api::{CHECK_REQUESTED_AT, IncomingMailProvider};

use crate::support::{Env, answered, ready};

/// Held by the tests that load the machine on purpose (hundreds of providers, servers
/// streaming as fast as they can), so that they run one after the other: each times the
/// rest of the fleet under its own fault, not under the other's load on the same two
/// cores and API server.
pub static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The label that puts providers into groups a test lists by (listing hundreds of
/// objects a few times a second would load the API server more than the controller does).
pub const GROUP: &str = "faults.mailroom.dev/group";

/// A provider that tests connectivity and the greeting only (no credentials, no TLS):
/// what a hostile or silent server on `host:port` is tested with.
pub fn connectivity(
    name: &str,
    group: &str,
    host: &str,
    port: u16,
    protocol: &str,
    check: &str,
) -> IncomingMailProvider {
    let yaml = format!(
        "apiVersion: mailroom.dev/v1alpha1
kind: IncomingMailProvider
metadata: {{name: {name}, labels: {{{GROUP}: {group}}}}}
spec:
  server: {{host: '{host}', port: {port}, protocol: {protocol}}}
  tls: {{mode: None}}
  authentication: {{method: None}}
  check: {check}
"
    );
    serde_yaml::from_str(&yaml).unwrap()
}

/// Creates them all, a few requests at a time.
pub async fn create_all(env: &Env, providers: Vec<IncomingMailProvider>) {
    let api = env.providers();
    futures::stream::iter(providers)
        .map(|p| {
            let api = api.clone();
            async move { api.create(&PostParams::default(), &p).await.map(|_| ()) }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await
        .expect("creating providers");
}

/// Annotates each with `mailroom.dev/check-requested-at=<value>`: a test now.
pub async fn request_checks(env: &Env, names: &[String], value: &str) {
    let api = env.providers();
    let patch = Patch::Merge(serde_json::json!({
        "metadata": {"annotations": {CHECK_REQUESTED_AT: value}}
    }));
    futures::stream::iter(names)
        .map(|name| {
            let (api, patch) = (api.clone(), &patch);
            async move {
                api.patch(name, &PatchParams::default(), patch)
                    .await
                    .map(|_| ())
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await
        .expect("annotating providers");
}

/// Asks for a test of each of `names`, waits until all answered it (Ready reason
/// `reason`), and returns how long after the request the slowest was tested, by its own
/// status.lastCheckTime (taken when the test ended, before the status write: the time the
/// API server then takes to store and show the status is not counted). Whole seconds, as
/// the status has them: both ends are cut to the second.
pub async fn ask(
    env: &Env,
    group: &str,
    names: &[String],
    value: &str,
    reason_now: &str,
) -> Duration {
    let asked = k8s_openapi::jiff::Timestamp::now();
    request_checks(env, names, value).await;
    let answers = wait_all(
        env,
        group,
        names,
        &format!("{reason_now} answering {value}"),
        Duration::from_secs(90),
        |p| answered(p, value) && reason(p) == reason_now,
    )
    .await;
    answers
        .iter()
        .filter_map(|p| p.status.as_ref()?.last_check_time.as_ref())
        .map(|t| {
            let secs = t.0.as_second() - asked.as_second();
            Duration::from_secs(secs.max(0) as u64)
        })
        .max()
        .unwrap_or_default()
}

/// The Ready reason, or "" before there is one.
pub fn reason(p: &IncomingMailProvider) -> &str {
    ready(p).map(|c| c.reason.as_str()).unwrap_or_default()
}

/// The providers of a group.
pub async fn list(env: &Env, group: &str) -> Vec<IncomingMailProvider> {
    env.providers()
        .list(&ListParams::default().labels(&format!("{GROUP}={group}")))
        .await
        .unwrap()
        .items
}

/// Lists the group until `done` holds for every one of `names`; returns them, and panics
/// after `within` with how many were done and the status of one that was not.
pub async fn wait_all(
    env: &Env,
    group: &str,
    names: &[String],
    what: &str,
    within: Duration,
    done: impl Fn(&IncomingMailProvider) -> bool,
) -> Vec<IncomingMailProvider> {
    let wanted: HashSet<&str> = names.iter().map(String::as_str).collect();
    let deadline = Instant::now() + within;
    loop {
        let ours: Vec<IncomingMailProvider> = list(env, group)
            .await
            .into_iter()
            .filter(|p| wanted.contains(p.metadata.name.as_deref().unwrap_or_default()))
            .collect();
        let pending: Vec<&IncomingMailProvider> = ours.iter().filter(|p| !done(p)).collect();
        if pending.is_empty() && ours.len() == wanted.len() {
            return ours;
        }
        if Instant::now() > deadline {
            let example = pending
                .first()
                .map(|p| {
                    format!(
                        "{}:\n{}",
                        p.metadata.name.as_deref().unwrap_or_default(),
                        serde_yaml::to_string(&p.status).unwrap()
                    )
                })
                .unwrap_or_default();
            panic!(
                "{}: expected {what} of all {} within {within:?}; {} are not, such as {example}\ncontroller logs: {}",
                env.ns,
                wanted.len(),
                pending.len() + wanted.len() - ours.len(),
                env.dir.path().display()
            );
        }
        // Listing hundreds of objects is work for the API server (and a debug build's
        // JSON): poll large groups less often.
        let pause = if wanted.len() > 50 { 1000 } else { 250 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

/// A process's resident memory and its peak, in KiB (`VmRSS`, `VmHWM`).
pub fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Samples a process's VmRSS every 50 ms on a thread of its own, each sample tagged with
/// the phase the test says it is in; stops when dropped.
pub struct MemorySampler {
    phase: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    samples: std::sync::Arc<std::sync::Mutex<Vec<(usize, u64)>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl MemorySampler {
    pub fn start(pid: u32) -> MemorySampler {
        use std::sync::atomic::Ordering::Relaxed;
        let sampler = MemorySampler {
            phase: Default::default(),
            samples: Default::default(),
            stop: Default::default(),
        };
        let (phase, samples, stop) = (
            sampler.phase.clone(),
            sampler.samples.clone(),
            sampler.stop.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Relaxed) {
                let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
                    return;
                };
                if let Some(kib) = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|rest| rest.split_whitespace().next())
                    .and_then(|n| n.parse().ok())
                {
                    samples.lock().unwrap().push((phase.load(Relaxed), kib));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        sampler
    }

    pub fn set_phase(&self, phase: usize) {
        self.phase
            .store(phase, std::sync::atomic::Ordering::Relaxed);
    }

    /// The samples taken in phases `from..=to`, sorted.
    pub fn samples(&self, from: usize, to: usize) -> Vec<u64> {
        let mut kib: Vec<u64> = self
            .samples
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| (from..=to).contains(p))
            .map(|(_, k)| *k)
            .collect();
        kib.sort_unstable();
        kib
    }
}

impl Drop for MemorySampler {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
