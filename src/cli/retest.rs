//! `mailroom retest NAME... -n NS` (or `--all`, `-l SELECTOR`, either with `-A`): asks the
//! controller to test providers now and waits for its verdicts, as `flux reconcile` or
//! `cmctl renew` do. Unlike `mailroom check`, the test runs where the controller runs:
//! from its network, with its access to the Secrets, and its result is what the
//! provider's status shows. The request is the `mailroom.dev/check-requested-at`
//! annotation; a verdict counts once the status echoes its value. Exit status 0 if every
//! provider is Ready, 1 if one is not (or is suspended), 2 if a verdict did not come in
//! time.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};

use crate::api::{CHECK_REQUESTED_AT, IncomingMailProvider};

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("many").args(["all", "selector"]).multiple(true)))]
pub struct RetestArgs {
    /// The providers to test.
    #[arg(
        required_unless_present_any = ["all", "selector", "all_namespaces"],
        conflicts_with_all = ["all", "selector", "all_namespaces"]
    )]
    pub names: Vec<String>,
    /// Every provider of the namespace (of every namespace with -A).
    #[arg(long)]
    pub all: bool,
    /// The providers whose labels match (kubectl's syntax: team=billing,tier!=dev).
    #[arg(long, short = 'l')]
    pub selector: Option<String>,
    /// Their namespace; the kubeconfig's namespace when absent.
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    #[command(flatten)]
    pub kube: super::KubeArgs,
    /// With --all or --selector: the providers of every namespace.
    #[arg(long, short = 'A', requires = "many", conflicts_with = "namespace")]
    pub all_namespaces: bool,
    /// Ask, and do not wait for the verdicts.
    #[arg(long)]
    pub no_wait: bool,
    /// How long to wait for the verdicts: seconds, or 90s, 2m, 1h.
    #[arg(long, default_value = "120", value_parser = super::wait_seconds)]
    pub timeout: u64,
}

/// A provider, by namespace and name.
pub(crate) type Named = (String, String);

/// Where the providers awaited live, which says how to read them back.
pub(crate) struct Scope {
    client: Client,
    /// None: every namespace.
    namespace: Option<String>,
    selector: Option<String>,
}

impl Scope {
    /// One namespace, every provider in it.
    pub(crate) fn namespace(client: Client, namespace: &str) -> Scope {
        Scope {
            client,
            namespace: Some(namespace.to_string()),
            selector: None,
        }
    }

    fn api(&self) -> Api<IncomingMailProvider> {
        match &self.namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        }
    }

    fn list_params(&self) -> ListParams {
        match &self.selector {
            Some(s) => ListParams::default().labels(s),
            None => ListParams::default(),
        }
    }

    /// How a provider is named in what is printed: with its namespace when several may be.
    fn show(&self, (ns, name): &Named) -> String {
        match self.namespace {
            Some(_) => name.clone(),
            None => format!("{ns}/{name}"),
        }
    }

    /// Where the providers were looked for, for messages; `every` names all namespaces
    /// ("any namespace" when none was found, "all namespaces" otherwise).
    fn describe(&self, every: &str) -> String {
        let place = match &self.namespace {
            Some(ns) => format!("namespace {ns}"),
            None => every.to_string(),
        };
        match &self.selector {
            Some(s) => format!("{place} with labels matching {s:?}"),
            None => place,
        }
    }
}

pub async fn run(args: RetestArgs) -> anyhow::Result<i32> {
    // --timeout bounds the whole command, an API server that does not answer included.
    let timeout = Duration::from_secs(args.timeout);
    let until = Instant::now() + timeout;
    let asked = tokio::time::timeout(timeout, ask(&args))
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "no answer from the API server within --timeout {}s",
                args.timeout
            )
        })??;
    let (scope, code, pending) = asked;
    if pending.is_empty() {
        return Ok(code);
    }
    let asked = format!(
        "Asked the controller to test {} provider(s) in {}",
        pending.len(),
        scope.describe("all namespaces")
    );
    if args.no_wait {
        eprintln!("{asked}; `kubectl get imp` shows the results.");
        return Ok(code);
    }
    eprintln!("{asked}; waiting for the results…");
    let waited = wait_for_tests(&scope, pending, until, timeout).await?;
    Ok(code.max(waited))
}

/// Reads the providers asked for, and annotates each one that can be tested: the scope,
/// the exit code so far (1 when one is suspended), and the requests made.
async fn ask(args: &RetestArgs) -> anyhow::Result<(Scope, i32, Vec<(Named, String)>)> {
    let (client, ns) = super::connect(&args.kube, args.namespace.as_deref()).await?;
    let scope = Scope {
        client: client.clone(),
        namespace: (!args.all_namespaces).then_some(ns),
        selector: args.selector.clone(),
    };

    // Every provider is read before any is annotated: a typo asks for nothing.
    let providers = if args.names.is_empty() {
        let listing = || {
            let place = scope.describe("all namespaces");
            format!("listing the IncomingMailProviders of {place}")
        };
        let list = match scope.api().list(&scope.list_params()).await {
            Ok(list) => list,
            Err(e) => {
                // The resource type itself may be what is missing (another cluster's
                // context): the API server answers 404 for the list.
                let unserved = match &e {
                    kube::Error::Api(status) if status.code == 404 => {
                        super::check::unserved(&client, &args.kube).await
                    }
                    _ => None,
                };
                match unserved {
                    Some(unserved) => bail!("{}: {unserved}", listing()),
                    None => return Err(anyhow::Error::new(e).context(listing())),
                }
            }
        };
        if list.items.is_empty() {
            bail!(
                "no IncomingMailProvider in {}",
                scope.describe("any namespace")
            );
        }
        list.items
    } else {
        let api = scope.api();
        let ns = scope.namespace.as_deref().unwrap_or_default();
        let mut found = Vec::new();
        for name in &args.names {
            found.push(super::check::read_provider(&api, &client, &args.kube, ns, name).await?);
        }
        found
    };

    let mut code = 0;
    let mut pending = Vec::new();
    for p in providers {
        let named = (p.namespace().unwrap_or_default(), p.name_any());
        if p.spec.suspend {
            // The controller does not test a suspended provider, so nothing would come.
            println!(
                "{}: suspended (spec.suspend: true), not tested; it is tested as soon as it is resumed",
                scope.show(&named)
            );
            code = 1;
            continue;
        }
        if p.being_deleted() {
            // Held by a finalizer: the controller tests it no more.
            println!(
                "{}: being deleted (held by finalizers {}), not tested",
                scope.show(&named),
                p.finalizers().join(", ")
            );
            code = 1;
            continue;
        }
        let api = Api::namespaced(client.clone(), &named.0);
        // One refused (RBAC in that namespace, deleted meanwhile) leaves the others asked
        // and waited for; it has no verdict, as one that did not come in time.
        match request_check(&api, &named.1).await {
            Ok(requested) => pending.push((named, requested)),
            Err(e) => {
                eprintln!(
                    "{}: {}: not asked: {}",
                    crate::command_name(),
                    scope.show(&named),
                    super::error_text(&e)
                );
                code = 2;
            }
        }
    }
    Ok((scope, code, pending))
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
/// come by `until` (the end of the command's `timeout`).
pub(crate) async fn wait_for_tests(
    scope: &Scope,
    pending: Vec<(Named, String)>,
    until: Instant,
    timeout: Duration,
) -> anyhow::Result<i32> {
    let mut pending: BTreeMap<Named, String> = pending.into_iter().collect();
    let mut code = 0;
    let mut said = false;
    // Requests replaced by another before the controller answered (two pipelines at once).
    let mut replaced: BTreeMap<Named, String> = BTreeMap::new();
    loop {
        // Each read bounded by what is left; one that fails for a moment (an API server
        // restarting, etcd electing a leader) is tried again, as `kubectl wait` does.
        let left = until.saturating_duration_since(Instant::now());
        let found = match tokio::time::timeout(left, current(scope, &pending)).await {
            Ok(Ok(found)) => found,
            Ok(Err(e)) if !passing(&e) => return Err(e),
            Ok(Err(e)) => {
                if !said {
                    eprintln!(
                        "reading the providers failed ({}); trying again until the timeout",
                        super::error_text(&e)
                    );
                    said = true;
                }
                Vec::new()
            }
            Err(_) => Vec::new(),
        };
        for p in found {
            let named = (p.namespace().unwrap_or_default(), p.name_any());
            let now_asked = p.annotations().get(CHECK_REQUESTED_AT);
            if now_asked.is_some_and(|v| v != &pending[&named]) {
                replaced.insert(named.clone(), now_asked.cloned().unwrap_or_default());
            }
            let Some((ready, verdict)) = verdict(&p, &pending[&named]) else {
                continue;
            };
            println!("{}: {verdict}", scope.show(&named));
            if !ready {
                code = 1;
            }
            pending.remove(&named);
        }
        if pending.is_empty() {
            return Ok(code);
        }
        if Instant::now() > until {
            for named @ (ns, name) in pending.keys() {
                if let Some(other) = replaced.get(named) {
                    println!(
                        "{}: no result within {}s for this request: another ({other:?}) replaced it before the controller answered; run retest again, or see `kubectl get imp {name} -n {ns}`",
                        scope.show(named),
                        timeout.as_secs()
                    );
                    continue;
                }
                println!(
                    "{}: no result within {}s; is the controller running, and does it watch namespace {ns}? `kubectl get imp {name} -n {ns}` shows the result when it comes",
                    scope.show(named),
                    timeout.as_secs()
                );
            }
            return Ok(2);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Whether a failed read may pass: not a provider gone, nor a refusal, which waiting
/// does not change.
fn passing(e: &anyhow::Error) -> bool {
    !e.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<kube::Error>(),
            Some(kube::Error::Api(status)) if matches!(status.code, 401 | 403 | 404)
        )
    })
}

/// The providers still awaited, as stored now: one GET each for a few in one namespace,
/// else one LIST of the scope.
async fn current(
    scope: &Scope,
    pending: &BTreeMap<Named, String>,
) -> anyhow::Result<Vec<IncomingMailProvider>> {
    let namespaces: BTreeSet<&str> = pending.keys().map(|(ns, _)| ns.as_str()).collect();
    if pending.len() > 5 || namespaces.len() > 1 {
        let list = scope.api().list(&scope.list_params()).await?;
        return Ok(list
            .items
            .into_iter()
            .filter(|p| pending.contains_key(&(p.namespace().unwrap_or_default(), p.name_any())))
            .collect());
    }
    let mut found = Vec::new();
    for (ns, name) in pending.keys() {
        // A provider deleted meanwhile is an error worth stopping for.
        let p = Api::<IncomingMailProvider>::namespaced(scope.client.clone(), ns)
            .get(name)
            .await
            .with_context(|| format!("reading {ns}/{name}"))?;
        found.push(p);
    }
    Ok(found)
}

/// Whether it is Ready, and "Ready=STATUS REASON: MESSAGE", once the status has handled
/// `requested`. Only that very request: a later one's value (another pipeline's) may come
/// from a clock ahead of this one, and its answer from before this request.
fn verdict(p: &IncomingMailProvider, requested: &str) -> Option<(bool, String)> {
    let status = p.status.as_ref()?;
    if status.last_handled_check_request.as_deref() != Some(requested) {
        return None;
    }
    let ready = crate::controller::status::ready(Some(status))?;
    let line = format!("Ready={} {}: {}", ready.status, ready.reason, ready.message);
    Some((ready.status == "True", line))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16, message: &str) -> anyhow::Error {
        let status = kube::core::Status::failure(message, "").with_code(code);
        anyhow::Error::from(kube::Error::Api(Box::new(status))).context("reading ops/inbox")
    }

    #[test]
    fn a_moment_of_failure_is_waited_out_but_a_refusal_or_a_deleted_provider_is_not() {
        assert!(passing(&api_error(500, "etcdserver: leader changed")));
        assert!(passing(&api_error(503, "the server is shutting down")));
        assert!(passing(&anyhow::anyhow!("connection refused")));
        assert!(!passing(&api_error(404, "not found")));
        assert!(!passing(&api_error(403, "forbidden")));
        assert!(!passing(&api_error(401, "Unauthorized")));
    }
}
