//! `mailroom retest NAME... -n NS` (or `--all`): asks the controller to test providers now
//! and waits for its verdicts, as `flux reconcile` or `cmctl renew` do. Unlike `mailroom
//! check`, the test runs where the controller runs: from its network, with its access to
//! the Secrets, and its result is what the provider's status shows. The request is the
//! `mailroom.dev/check-requested-at` annotation; a verdict counts once the status echoes
//! its value. Exit status 0 if every provider is Ready, 1 if one is not (or is suspended),
//! 2 if a verdict did not come in time.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};

use crate::api::{CHECK_REQUESTED_AT, IncomingMailProvider};

#[derive(clap::Args, Debug)]
pub struct RetestArgs {
    /// The providers to test.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub names: Vec<String>,
    /// Every provider of the namespace.
    #[arg(long)]
    pub all: bool,
    /// Their namespace; the kubeconfig's namespace when absent.
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    /// Ask, and do not wait for the verdicts.
    #[arg(long)]
    pub no_wait: bool,
    /// How long to wait for the verdicts, in seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
}

pub async fn run(args: RetestArgs) -> anyhow::Result<i32> {
    let (client, ns) = super::connect(args.namespace.as_deref()).await?;
    let api: Api<IncomingMailProvider> = Api::namespaced(client, &ns);

    // Every name is read before any is annotated: a typo asks for nothing.
    let providers = if args.all {
        let list = api
            .list(&ListParams::default())
            .await
            .with_context(|| format!("listing the IncomingMailProviders of namespace {ns}"))?;
        if list.items.is_empty() {
            bail!("namespace {ns} has no IncomingMailProvider");
        }
        list.items
    } else {
        let mut found = Vec::new();
        for name in &args.names {
            let p = api
                .get_opt(name)
                .await
                .with_context(|| format!("reading IncomingMailProvider {ns}/{name}"))?;
            let Some(p) = p else {
                bail!("IncomingMailProvider {ns}/{name} not found");
            };
            found.push(p);
        }
        found
    };

    let mut code = 0;
    let mut pending = Vec::new();
    for p in providers {
        let name = p.name_any();
        if p.spec.suspend {
            // The controller does not test a suspended provider, so nothing would come.
            println!(
                "{name}: suspended (spec.suspend: true), not tested; it is tested as soon as it is resumed"
            );
            code = 1;
            continue;
        }
        let requested = request_check(&api, &name).await?;
        pending.push((name, requested));
    }
    if pending.is_empty() {
        return Ok(code);
    }
    if args.no_wait {
        eprintln!(
            "Asked the controller to test {} provider(s) in {ns}; `kubectl get imp -n {ns}` shows the results.",
            pending.len()
        );
        return Ok(code);
    }
    eprintln!(
        "Asked the controller to test {} provider(s) in {ns}; waiting for the results…",
        pending.len()
    );
    let waited = wait_for_tests(&api, &ns, pending, Duration::from_secs(args.timeout)).await?;
    Ok(code.max(waited))
}

/// Sets the check-requested-at annotation of `name`; returns its value.
pub(crate) async fn request_check(
    api: &Api<IncomingMailProvider>,
    name: &str,
) -> anyhow::Result<String> {
    // To the nanosecond: two requests in one second are two requests.
    let value = Timestamp::now().to_string();
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(
            serde_json::json!({"metadata": {"annotations": {CHECK_REQUESTED_AT: value}}}),
        ),
    )
    .await
    .with_context(|| format!("annotating {name} with {CHECK_REQUESTED_AT}"))?;
    Ok(value)
}

/// Waits until each provider's status echoes the request made of it, printing each
/// verdict as it comes. Returns 0 if all are Ready, 1 if one is not, 2 if one did not
/// come within `timeout`.
pub(crate) async fn wait_for_tests(
    api: &Api<IncomingMailProvider>,
    ns: &str,
    pending: Vec<(String, String)>,
    timeout: Duration,
) -> anyhow::Result<i32> {
    let mut pending: BTreeMap<String, String> = pending.into_iter().collect();
    let until = Instant::now() + timeout;
    let mut code = 0;
    loop {
        for p in current(api, &pending).await? {
            let name = p.name_any();
            let Some((ready, verdict)) = verdict(&p, &pending[&name]) else {
                continue;
            };
            println!("{name}: {verdict}");
            if !ready {
                code = 1;
            }
            pending.remove(&name);
        }
        if pending.is_empty() {
            return Ok(code);
        }
        if Instant::now() > until {
            for name in pending.keys() {
                println!(
                    "{name}: no result within {}s; is the controller running, and does it watch namespace {ns}? `kubectl get imp {name} -n {ns}` shows the result when it comes",
                    timeout.as_secs()
                );
            }
            return Ok(2);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The providers still awaited, as stored now: one GET each for a few, one LIST for many.
async fn current(
    api: &Api<IncomingMailProvider>,
    pending: &BTreeMap<String, String>,
) -> anyhow::Result<Vec<IncomingMailProvider>> {
    if pending.len() > 5 {
        let list = api.list(&ListParams::default()).await?;
        return Ok(list
            .items
            .into_iter()
            .filter(|p| pending.contains_key(&p.name_any()))
            .collect());
    }
    let mut found = Vec::new();
    for name in pending.keys() {
        // A provider deleted meanwhile is an error worth stopping for.
        let p = api
            .get(name)
            .await
            .with_context(|| format!("reading {name}"))?;
        found.push(p);
    }
    Ok(found)
}

/// Whether it is Ready, and "Ready=STATUS REASON: MESSAGE", once the status has handled
/// `requested`.
fn verdict(p: &IncomingMailProvider, requested: &str) -> Option<(bool, String)> {
    let status = p.status.as_ref()?;
    if status.last_handled_check_request.as_deref() != Some(requested) {
        return None;
    }
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready")?;
    let line = format!("Ready={} {}: {}", ready.status, ready.reason, ready.message);
    Some((ready.status == "True", line))
}
