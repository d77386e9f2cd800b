//! The controller: watches providers and the objects they reference, tests each one on
//! its schedule, and writes what it found into `.status` (and Events on transitions).
//! The decisions live in pure modules (`schedule`, `status`); this module reads, calls
//! them, and writes.

mod access;
mod fair_slots;
mod http;
mod inflight;
mod limits;
pub mod metrics;
mod objects;
mod reconcile;
pub mod referrers;
pub mod schedule;
pub mod shard;
mod staleness;
pub mod status;
mod sweep;
mod tenure;
mod watches;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use kube_lease_manager::LeaseManagerBuilder;

use crate::api::IncomingMailProvider;
use crate::credentials::ObjectKind;
use crate::credentials::tokens::{self, TokenManager};

use access::Access;
pub use http::ListenAddr;
pub use limits::HostLimits;
pub use objects::Objects;

/// The field manager of every status write.
pub const FIELD_MANAGER: &str = "mailroom";

/// How the controller runs.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Namespaces to watch; empty means all.
    pub namespaces: Vec<String>,
    /// Tests running at once, in total.
    pub concurrency: usize,
    /// Tests running at once against one mail host.
    pub per_host: usize,
    /// Where `/metrics`, `/healthz` and `/readyz` are served; None serves nothing.
    pub metrics_addr: Option<ListenAddr>,
    /// Per-provider series (namespace and name as labels) besides the aggregates.
    pub per_provider_metrics: bool,
    /// Whether OAuth2 token requests may go to this pod's own loopback.
    pub oauth2_loopback: bool,
    /// Run only while holding this Lease; None runs at once (a single replica).
    pub lease: Option<LeaseSettings>,
    /// Which providers this replica tests.
    pub shard: shard::Shard,
    /// How long it may take to stop (the pod's termination grace period).
    pub stopping: Stopping,
}

/// The Lease that elects the one replica that tests.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub name: String,
    pub namespace: String,
    pub identity: String,
    /// How long a lease holds without renewal; a standby takes over within this.
    pub duration: Duration,
}

/// Most status writes and Events sent to the API server at once, and of them heartbeats
/// and Checking (see `limits::WriteSlots`).
const API_WRITES: usize = 16;
const BACKGROUND_WRITES: usize = 4;

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub objects: Objects,
    pub limits: HostLimits,
    /// Tests running at once (--concurrency), each until its status is written, shared
    /// fairly between namespaces.
    pub tests: Arc<fair_slots::FairSlots>,
    pub writes: limits::WriteSlots,
    /// The tests started by reconciles, which run beside them (see `inflight`).
    pub inflight: inflight::InFlight,
    /// Resolves when the controller is told to stop.
    pub stopping: Stop,
    /// False while this replica may not test, its Lease not seen renewed (see `tenure`):
    /// tests under way stop before they log in, and no status is written, until it is.
    testing: tokio::sync::watch::Receiver<bool>,
    pub memory: Mutex<HashMap<ObjectRef<IncomingMailProvider>, schedule::Memory>>,
    /// Results whose status write failed, written on the next reconcile instead of a test.
    pub unwritten: Mutex<HashMap<ObjectRef<IncomingMailProvider>, reconcile::Unwritten>>,
    /// Status writes that failed in a row, per provider, whatever wrote them (a result,
    /// Suspended, AccessDenied): the wait before the next grows with them.
    pub failed_writes: Mutex<HashMap<ObjectRef<IncomingMailProvider>, u32>>,
    /// The uids of providers the API server said no longer exist (404 to a status write)
    /// while the cache still holds them, with their namespaces: not tested again on the
    /// cache's word.
    pub gone: Mutex<HashMap<String, String>>,
    pub jitter: Box<dyn schedule::Jitter>,
    /// OAuth2: keeps access tokens fresh and writes rotated refresh tokens back.
    pub tokens: Arc<TokenManager>,
    pub metrics: Arc<metrics::Metrics>,
    pub shard: shard::Shard,
    /// The providers as the watches see them now, one cache per watched scope.
    pub providers: Vec<(Option<String>, Store<IncomingMailProvider>)>,
    /// Whether each scope's providers' watch is let through, in the order of `providers`.
    providers_access: Vec<Arc<Access>>,
}

impl Context {
    /// Waits while tests are paused.
    pub async fn unpaused(&self) {
        let _ = self.testing.clone().wait_for(|go| *go).await;
    }

    /// Resolves when tests pause (never, once nothing can pause them).
    pub async fn paused(&self) {
        if self.testing.clone().wait_for(|go| !go).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Forgets what it remembers of a provider's schedule and a result not yet written.
    pub fn forget(&self, key: &ObjectRef<IncomingMailProvider>) {
        self.memory.lock().unwrap().remove(key);
        self.unwritten.lock().unwrap().remove(key);
    }

    /// How many watched scopes' providers' caches cannot be trusted now: not listed (yet,
    /// or ever), or listed before the API server began refusing their watch (the cache
    /// keeps what it held then, and nothing is written on them).
    pub fn unlisted_providers(&self) -> usize {
        let not_listed = unlisted(&self.providers).len();
        let refused = self
            .providers
            .iter()
            .zip(&self.providers_access)
            .filter(|((_, store), access)| {
                matches!(store.wait_until_ready().now_or_never(), Some(Ok(())))
                    && access.denied(Duration::ZERO).is_some()
            })
            .count();
        not_listed + refused
    }

    /// A provider as its scope's cache holds it now; `None` once it is deleted.
    pub fn provider(
        &self,
        key: &ObjectRef<IncomingMailProvider>,
    ) -> Option<Arc<IncomingMailProvider>> {
        self.providers
            .iter()
            .find(|(scope, _)| in_scope(scope, key.namespace.as_deref()))
            .and_then(|(_, store)| store.get(key))
    }
}

/// Whether objects of `namespace` are watched by the controller of `scope` (`None`: all
/// namespaces).
pub fn in_scope(scope: &Option<String>, namespace: Option<&str>) -> bool {
    scope.is_none() || scope.as_deref() == namespace
}

/// The scopes whose providers' cache has not listed (yet, or ever: its watch refused).
pub fn unlisted(stores: &[(Option<String>, Store<IncomingMailProvider>)]) -> Vec<Option<String>> {
    stores
        .iter()
        .filter(|(_, store)| !matches!(store.wait_until_ready().now_or_never(), Some(Ok(()))))
        .map(|(scope, _)| scope.clone())
        .collect()
}

/// A scope as messages name it.
pub fn scope_name(scope: &Option<String>) -> String {
    scope.clone().unwrap_or_else(|| "all namespaces".into())
}

/// Runs until SIGTERM or SIGINT, then finishes the tests in flight, releases the lease
/// and returns. With a lease, tests run only while this replica holds it, and stop at
/// once when it is lost.
pub async fn run(client: Client, settings: Settings) -> anyhow::Result<()> {
    let metrics = Arc::new(metrics::Metrics::new(settings.per_provider_metrics));
    let readiness = Arc::new(http::Readiness::default());
    let _server = match settings.metrics_addr {
        Some(addr) => {
            let (bound, task) = http::serve(addr, metrics.clone(), readiness.clone())
                .await
                .map_err(|e| anyhow::anyhow!("listening on --metrics-addr {addr}: {e}"))?;
            tracing::info!(address = %bound, "serving /metrics, /healthz and /readyz");
            Some(AbortOnDrop(task))
        }
        None => None,
    };
    let shutdown: Stop = wait_for_signal().boxed().shared();
    // One token manager for the process, not per lease term: the tokens it keeps since a
    // refused write-back outlive a lost lease, and are stored before the process ends.
    let tokens = TokenManager::new(client.clone())?;
    let tokens = Arc::new(match settings.oauth2_loopback {
        true => tokens.allowing_loopback(),
        false => tokens,
    });
    let Some(lease) = &settings.lease else {
        metrics.set_leader(true);
        let (_always, testing) = tokio::sync::watch::channel(true);
        let result = run_controllers(
            client,
            &settings,
            metrics,
            readiness,
            tokens.clone(),
            shutdown.clone(),
            testing,
        )
        .await;
        let stopping = &settings.stopping;
        tokens
            .store_kept(stopping.for_tokens(asked(&shutdown)))
            .await;
        return result;
    };

    let duration = lease.duration.as_secs().max(2);
    // Renewed at half its duration: a renewal slowed by a loaded API server, or retried
    // once, still lands well before the holder must pause (see `tenure`).
    let grace = (duration / 2).max(1);
    let manager = LeaseManagerBuilder::new(client.clone(), &lease.name)
        .with_namespace(&lease.namespace)
        .with_identity(&lease.identity)
        .with_duration(duration)
        .with_grace(grace)
        .build()
        .await?;
    let tenure = tenure::Tenure::new(
        Api::namespaced(client.clone(), &lease.namespace),
        &lease.name,
        &lease.identity,
        Duration::from_secs(duration),
        Duration::from_secs(grace),
    );
    let (mut leading, task) = watch_lease(manager, tenure.clone());
    tracing::info!(lease = %lease.name, namespace = %lease.namespace, identity = %lease.identity, "waiting for the lease");
    loop {
        readiness.standby();
        while !*leading.borrow_and_update() {
            tokio::select! {
                changed = leading.changed() => changed.map_err(|_| anyhow::anyhow!("the lease manager stopped"))?,
                _ = shutdown.clone() => {
                    release(leading, task, settings.stopping.for_lease(asked(&shutdown))).await;
                    return Ok(());
                }
            }
        }
        // The lease manager says this replica holds the Lease; it tests once it has seen
        // the Lease renewed, and only while it goes on seeing that (see `tenure`).
        let renewed = tokio::select! {
            renewed = tenure.confirmed() => renewed,
            changed = leading.changed() => {
                changed.map_err(|_| anyhow::anyhow!("the lease manager stopped"))?;
                continue;
            }
            _ = shutdown.clone() => {
                release(leading, task, settings.stopping.for_lease(asked(&shutdown))).await;
                return Ok(());
            }
        };
        tracing::info!(lease = %lease.name, "holding the lease: testing");
        metrics.set_leader(true);
        let lost = async {
            while leading.changed().await.is_ok() {
                if !*leading.borrow() {
                    break;
                }
            }
        };
        // Tests pause while the Lease is not seen renewed, and go on once it is; the
        // controllers, their caches and what they keep (results not yet written among
        // it) stay.
        let (pause, testing) = tokio::sync::watch::channel(true);
        let watch_tenure = async {
            let mut renewed = renewed;
            loop {
                tenure.lapsed(renewed).await;
                tracing::warn!(
                    lease = %lease.name,
                    "the lease was not seen renewed (is the API server reachable?): tests paused before it can expire and a standby take it, until a renewal is seen"
                );
                let _ = pause.send(false);
                renewed = tenure.confirmed().await;
                tracing::info!(lease = %lease.name, "the lease was renewed: testing again");
                let _ = pause.send(true);
            }
        };
        let stopped = tokio::select! {
            result = run_controllers(client.clone(), &settings, metrics.clone(), readiness.clone(), tokens.clone(), shutdown.clone(), testing) => Some(result),
            _ = lost => {
                // Dropping the controllers cancels the tests in flight: another replica leads now.
                tracing::warn!(lease = %lease.name, "lost the lease: testing stopped");
                None
            }
            () = watch_tenure => None,
        };
        metrics.set_leader(false);
        // A lost lease (no stop asked) gives the tokens their share of the grace period.
        let asked = asked(&shutdown);
        tokens.store_kept(settings.stopping.for_tokens(asked)).await;
        if let Some(result) = stopped {
            release(leading, task, settings.stopping.for_lease(asked)).await;
            return result;
        }
    }
}

/// How a stopping controller spends the pod's termination grace period (the kubelet kills
/// it after that), counted from the moment the stop was asked: tests in flight (and
/// reconciles under way) get a third to finish, then are cancelled (their providers keep
/// their last status); OAuth2 tokens it could not store before get a sixth; giving the
/// lease up gets a third (without a control plane it cannot: it says so and exits rather
/// than hang until it is killed). A sixth is left over for the process to exit. A step
/// never takes more than its share, and less when the ones before it overran.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stopping {
    pub drain: Duration,
    pub store_tokens: Duration,
    pub release: Duration,
}

impl Stopping {
    pub fn within(grace: Duration) -> Stopping {
        Stopping {
            drain: grace / 3,
            store_tokens: grace / 6,
            release: grace / 3,
        }
    }

    /// What is left for the tests in flight.
    pub fn for_tests(&self, asked: Option<Instant>) -> Duration {
        left(asked, self.drain, self.drain)
    }

    /// What is left for storing kept tokens; their own share when no stop was asked (a
    /// lost lease).
    pub fn for_tokens(&self, asked: Option<Instant>) -> Duration {
        left(asked, self.store_tokens, self.drain + self.store_tokens)
    }

    /// What is left for releasing the lease.
    pub fn for_lease(&self, asked: Option<Instant>) -> Duration {
        left(
            asked,
            self.release,
            self.drain + self.store_tokens + self.release,
        )
    }
}

/// `share`, cut to the time until `ends` after `asked` when a stop was asked.
fn left(asked: Option<Instant>, share: Duration, ends: Duration) -> Duration {
    asked.map_or(share, |asked| {
        share.min(ends.saturating_sub(asked.elapsed()))
    })
}

/// Drives the lease manager: whether this replica holds the Lease, as it changes. Instead
/// of the manager's own `watch`, whose retries of a failed renewal wait up to 30 s (tests
/// stay paused that long after an API server comes back): these wait as the watches do,
/// 0.5 s doubling to 5 s. A Lease found deleted is created again.
fn watch_lease(
    manager: kube_lease_manager::LeaseManager,
    tenure: tenure::Tenure,
) -> (tokio::sync::watch::Receiver<bool>, LeaseTask) {
    let manager = Arc::new(manager);
    let (tx, rx) = tokio::sync::watch::channel(false);
    let driver = tokio::spawn({
        let manager = manager.clone();
        async move {
            let mut failures = 0;
            loop {
                tokio::select! {
                    () = tx.closed() => return,
                    changed = manager.changed() => match changed {
                        Ok(holding) => {
                            failures = 0;
                            if tx.send(holding).is_err() {
                                return;
                            }
                        }
                        Err(error) => {
                            failures += 1;
                            tracing::warn!(%error, "the lease could not be read or renewed; retrying");
                            if lease_gone(&error) {
                                tenure.recreate().await;
                            }
                            let wait = schedule::watch_retry(failures, &schedule::RandomJitter);
                            tokio::time::sleep(wait).await;
                        }
                    },
                }
            }
        }
    });
    (rx, LeaseTask { manager, driver })
}

/// Whether the lease manager failed because the Lease does not exist: read (its own
/// error) or renewed (the API server's 404).
fn lease_gone(error: &kube_lease_manager::LeaseManagerError) -> bool {
    use kube_lease_manager::LeaseManagerError as E;
    match error {
        E::NonexistentLease(_) => true,
        E::KubeError(kube::Error::Api(status)) => status.code == 404,
        _ => false,
    }
}

/// The lease manager and the task that drives it.
struct LeaseTask {
    manager: Arc<kube_lease_manager::LeaseManager>,
    driver: tokio::task::JoinHandle<()>,
}

/// Gives the lease up so a standby takes over at once instead of after its duration.
async fn release(leading: tokio::sync::watch::Receiver<bool>, task: LeaseTask, within: Duration) {
    drop(leading);
    // Stopped first, so that no renewal under way takes the Lease back.
    task.driver.abort();
    let _ = task.driver.await;
    match tokio::time::timeout(within, task.manager.release()).await {
        Ok(Ok(())) => tracing::info!("released the lease"),
        Ok(Err(error)) => tracing::warn!(
            %error,
            "could not release the lease: a standby takes over when it expires"
        ),
        Err(_) => tracing::warn!(
            "could not release the lease within {:?}: a standby takes over when it expires",
            within
        ),
    }
}

/// Stops the metrics server with the controller.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The controllers (one per watched scope) until `shutdown`.
#[allow(clippy::too_many_arguments)]
async fn run_controllers(
    client: Client,
    settings: &Settings,
    metrics: Arc<metrics::Metrics>,
    readiness: Arc<http::Readiness>,
    tokens: Arc<TokenManager>,
    shutdown: Stop,
    testing: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    readiness.syncing();
    let scopes: Vec<Option<String>> = if settings.namespaces.is_empty() {
        vec![None]
    } else {
        settings.namespaces.iter().cloned().map(Some).collect()
    };
    type Apis = (
        Api<IncomingMailProvider>,
        Api<PartialObjectMeta<Secret>>,
        Api<PartialObjectMeta<ConfigMap>>,
    );
    let api_for = |ns: &Option<String>| -> Apis {
        match ns {
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
            None => (
                Api::all(client.clone()),
                Api::all(client.clone()),
                Api::all(client.clone()),
            ),
        }
    };

    // Metadata-only reflectors of Secrets and ConfigMaps: versions for change detection
    // and triggers for the providers that reference them.
    let mut secret_stores = Vec::new();
    let mut cm_stores = Vec::new();
    let mut accesses = Vec::new();
    let mut secret_streams = Vec::new();
    let mut cm_streams = Vec::new();
    for scope in &scopes {
        let (_, secrets, cms) = api_for(scope);
        let (store, writer) = reflector::store::<PartialObjectMeta<Secret>>();
        secret_streams.push(reflector::reflector(
            writer,
            watcher(secrets, watches::config()).modify(slim_metadata),
        ));
        secret_stores.push(store);
        let (store, writer) = reflector::store::<PartialObjectMeta<ConfigMap>>();
        cm_streams.push(reflector::reflector(
            writer,
            watcher(cms, watches::config()).modify(slim_metadata),
        ));
        cm_stores.push(store);
        accesses.push([Arc::new(Access::default()), Arc::new(Access::default())]);
    }

    let reporter = Reporter {
        controller: "mailroom".into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    // The providers' caches come first: a queued test looks its provider up before it
    // runs (see `reconcile::still_current`).
    let (provider_stores, provider_writers): (Vec<_>, Vec<_>) =
        scopes.iter().map(|_| reflector::store()).unzip();
    let providers_access: Vec<_> = scopes.iter().map(|_| Arc::new(Access::default())).collect();
    let (inflight, retests) = inflight::InFlight::new(&scopes, shutdown.clone());
    let ctx = Arc::new(Context {
        inflight,
        testing,
        client: client.clone(),
        recorder: Recorder::new(client.clone(), reporter),
        objects: Objects::new(
            client.clone(),
            scopes.clone(),
            secret_stores.clone(),
            cm_stores.clone(),
            accesses.clone(),
            tokens.own_writes(),
        ),
        limits: HostLimits::new(settings.per_host),
        tests: Arc::new(fair_slots::FairSlots::new(settings.concurrency)),
        writes: limits::WriteSlots::new(API_WRITES, BACKGROUND_WRITES),
        stopping: shutdown.clone(),
        memory: Mutex::new(HashMap::new()),
        unwritten: Mutex::new(HashMap::new()),
        failed_writes: Mutex::new(HashMap::new()),
        gone: Mutex::new(Default::default()),
        jitter: Box::new(schedule::RandomJitter),
        tokens,
        metrics,
        shard: settings.shard,
        providers: scopes
            .iter()
            .cloned()
            .zip(provider_stores.clone())
            .collect(),
        providers_access: providers_access.clone(),
    });
    // Losing the lease drops this future: the tests it started stop with it.
    let _cancel_tests = ctx.inflight.cancel_on_drop();
    let mut controllers = Vec::new();
    for ((((((scope, secret_stream), cm_stream), retest), (store, writer)), access), seen) in scopes
        .iter()
        .zip(secret_streams)
        .zip(cm_streams)
        .zip(retests)
        .zip(provider_stores.iter().cloned().zip(provider_writers))
        .zip(accesses)
        .zip(providers_access)
    {
        let [secrets_access, cms_access] = access;
        let (providers, _, _) = api_for(scope);
        // Reconciles only decide and start tests (see `inflight`), so they are short and
        // not bounded here (0). What costs (tests, Secret reads, token requests) is
        // bounded by the host and test semaphores, one test per provider at a time.
        // Every provider stays in memory; its managedFields (a few kB once status is
        // server-side applied, never read here) are not kept.
        let referrers = Arc::new(referrers::Referrers::default());
        let indexed = referrers.clone();
        let watched = watches::noted(watcher(providers, watches::config()), seen)
            .modify(|p: &mut IncomingMailProvider| p.managed_fields_mut().clear())
            .inspect_ok(move |event| indexed.apply(event));
        // No reconcile follows a deletion: a test of it waiting for a slot is told once the
        // cache has dropped it, and leaves the line.
        let deleted = ctx.clone();
        let cached = reflector::reflector(writer, watched).inspect_ok(move |event| {
            if let watcher::Event::Delete(p) = event {
                deleted.inflight.nudge(&ObjectRef::from_obj(p));
            }
        });
        // Once a (re)list of providers is in its cache, every provider of the scope is
        // reconciled, and after one of Secrets or ConfigMaps, every one that references
        // that kind: what changed while the watch was away shows only in the list (see
        // `watches::changes`).
        let (relisted_tx, relisted) = futures::channel::mpsc::unbounded();
        let reconcile = move |keys: Vec<ObjectRef<IncomingMailProvider>>| {
            for key in keys {
                let _ = relisted_tx.unbounded_send(key);
            }
        };
        let (all, scope_store, relisted_ctx) = (reconcile.clone(), store.clone(), ctx.clone());
        let providers_relisted = move || {
            all(scope_store
                .state()
                .iter()
                .map(|p| ObjectRef::from_obj(&**p))
                .collect());
            // Those deleted while the watch was away: their waiting tests leave.
            relisted_ctx.inflight.nudge_all();
        };
        let controller = Controller::for_stream(
            watches::changes(watches::on_relisted(cached, providers_relisted), false),
            store.clone(),
        )
        .with_config(ControllerConfig::default().concurrency(0));
        let (by_secret, by_cm) = (referrers.clone(), referrers.clone());
        let (secrets_seen, cms_seen) = (ctx.clone(), ctx.clone());
        let relisted_kind = |kind: ObjectKind| {
            let (ctx, scope, reconcile, referrers) = (
                ctx.clone(),
                scope.clone(),
                reconcile.clone(),
                referrers.clone(),
            );
            move || {
                ctx.objects.relisted(kind, scope.as_deref());
                reconcile(referrers.of_kind(kind));
            }
        };
        let secret_stream = watches::retried("Secrets", secret_stream, secrets_access);
        let cm_stream = watches::retried("ConfigMaps", cm_stream, cms_access);
        let controller = controller
            .watches_stream(
                watches::changes(
                    watches::on_relisted(secret_stream, relisted_kind(ObjectKind::Secret)),
                    true,
                ),
                move |meta: PartialObjectMeta<Secret>| {
                    dependents(&secrets_seen, &by_secret, ObjectKind::Secret, &meta)
                },
            )
            .watches_stream(
                watches::changes(
                    watches::on_relisted(cm_stream, relisted_kind(ObjectKind::ConfigMap)),
                    true,
                ),
                move |meta: PartialObjectMeta<ConfigMap>| {
                    dependents(&cms_seen, &by_cm, ObjectKind::ConfigMap, &meta)
                },
            )
            // A finished test asks for its provider's reconcile, which schedules the next.
            .reconcile_on(retest)
            .reconcile_on(relisted)
            // Now only the providers' own watch reaches this backoff (see `watches`).
            .trigger_backoff(watches::WatchBackoff::default())
            .graceful_shutdown_on(shutdown.clone().map(|_| ()));
        let ctx = ctx.clone();
        controllers.push(
            controller
                .run(reconcile::reconcile, reconcile::error_policy, ctx)
                .for_each(|res| async move {
                    match res {
                        Ok(_) => {}
                        Err(kube::runtime::controller::Error::QueueError(e)) => {
                            watches::failed("IncomingMailProviders", &e)
                        }
                        Err(e) => tracing::debug!(error = %e, "reconcile did not complete"),
                    }
                })
                .boxed(),
        );
    }
    let sweeper = sweep::run(ctx.clone());
    let staleness = staleness::run(ctx.clone());
    let synced = async {
        // Ready once every scope's providers, Secrets and ConfigMaps have listed, or after
        // a minute with those that cannot named: the others are tested meanwhile, and a
        // pod held unready by one namespace it may not read (its RoleBinding gone) would
        // stall every rollout.
        let unlisted_providers =
            || -> Vec<String> { unlisted(&ctx.providers).iter().map(scope_name).collect() };
        let listed = async {
            while !unlisted_providers().is_empty() || !ctx.objects.unsynced().is_empty() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        match tokio::time::timeout(Duration::from_secs(60), listed).await {
            Ok(()) => tracing::info!("caches synced"),
            Err(_) => tracing::error!(
                providers = ?unlisted_providers(),
                secrets_and_config_maps = ?ctx.objects.unsynced(),
                "these namespaces' providers, or their Secrets and ConfigMaps, could not be listed for a minute (see the watch errors): their providers wait, the others are tested"
            ),
        }
        // A replica that can list no providers at all tests nothing: it stays unready, so
        // the rollout that brought it stops and the Deployment's alerts say so.
        while unlisted_providers().len() == scopes.len() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        readiness.synced();
        futures::future::pending::<()>().await
    };
    tracing::info!(namespaces = ?settings.namespaces, "controller started");
    // Once the stop is asked, the reconciles under way (a status write to an API server
    // that is away, say) get the tests' share of the grace period, no more.
    let reconciles_bounded = async {
        let asked = shutdown.clone().await;
        tokio::time::sleep(settings.stopping.for_tests(Some(asked))).await;
        tracing::warn!("reconciles still running when the tests' time ran out: stopped");
    };
    tokio::select! {
        _ = futures::future::join_all(controllers) => {}
        _ = reconciles_bounded => {}
        _ = sweeper => {}
        _ = staleness => {}
        _ = synced => {}
    }
    // A stopping controller finishes the tests in flight (it starts no more), within a
    // bound that leaves the rest of the grace period to store kept tokens and release the
    // lease: a test of a slow server may take its whole check.timeout.
    let drain = settings.stopping.drain;
    let cancelled = ctx
        .inflight
        .finish(settings.stopping.for_tests(asked(&shutdown)))
        .await;
    if cancelled > 0 {
        tracing::warn!(
            cancelled,
            "tests still running {drain:?} after the stop was asked: cancelled; their providers keep their last status"
        );
    }
    tracing::info!("controller stopped");
    Ok(())
}

/// What the caches keep of a Secret or ConfigMap: name, namespace, resourceVersion,
/// labels, creation time and the time of its last change by anyone but the token
/// manager's refreshes (see [`tokens::REFRESH_WRITER`]). managedFields' field sets would
/// cost memory per object (only the newest entry's time is kept, for a provider first seen
/// after a restart), and a Secret's `kubectl.kubernetes.io/last-applied-configuration`
/// annotation holds its data.
fn slim_metadata<K: Resource>(meta: &mut K) {
    let m = meta.meta_mut();
    let changed = m
        .managed_fields
        .iter()
        .flatten()
        .filter(|f| f.manager.as_deref() != Some(tokens::REFRESH_WRITER))
        .filter_map(|f| f.time.clone())
        .max_by_key(|t| t.0);
    m.managed_fields = changed.map(|time| {
        vec![ManagedFieldsEntry {
            time: Some(time),
            ..Default::default()
        }]
    });
    m.annotations = None;
}

/// The providers in the object's namespace that reference it, for an event of the
/// object (which the cache now holds).
fn dependents<K: Resource>(
    ctx: &Context,
    referrers: &referrers::Referrers,
    kind: ObjectKind,
    obj: &K,
) -> Vec<ObjectRef<IncomingMailProvider>> {
    let meta = obj.meta();
    let (ns, name) = (
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default(),
    );
    ctx.objects.seen(kind, ns, name);
    referrers.of(kind, ns, name)
}

/// Resolves, for every holder, with the moment the controller was told to stop: each step
/// of the stop ends at its point after it (see [`Stopping`]).
pub type Stop = futures::future::Shared<futures::future::BoxFuture<'static, Instant>>;

/// When the stop was asked, if it was.
fn asked(stop: &Stop) -> Option<Instant> {
    stop.clone().now_or_never()
}

async fn wait_for_signal() -> Instant {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: finishing the tests in flight"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: finishing the tests in flight"),
    }
    Instant::now()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A token Secret refreshed by the controller after a person signed in: what a
    /// controller started afresh compares with the last test is the sign-in, not the
    /// refresh (its own write, which every test of a short-lived token makes).
    #[test]
    fn the_time_of_a_change_leaves_out_the_controllers_token_refreshes() {
        let at = |s: i64| {
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::from_second(1_800_000_000 + s).unwrap(),
            )
        };
        let entry = |manager: &str, s: i64| ManagedFieldsEntry {
            manager: Some(manager.into()),
            time: Some(at(s)),
            ..Default::default()
        };
        let mut secret = PartialObjectMeta::<Secret>::default();
        secret.metadata.managed_fields = Some(vec![
            entry(tokens::AUTHORIZE_WRITER, 10),
            entry(tokens::REFRESH_WRITER, 20),
        ]);
        secret.metadata.annotations = Some([("a".to_string(), "b".to_string())].into());
        slim_metadata(&mut secret);
        let kept = secret.metadata.managed_fields.unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].time, Some(at(10)));
        assert_eq!(kept[0].manager, None, "only the time is kept");
        assert_eq!(secret.metadata.annotations, None);
    }

    #[test]
    fn stopping_fits_in_the_grace_period_with_time_to_spare() {
        // The chart's default 30 s: 10 s of tests, 5 s of tokens, 10 s for the lease.
        assert_eq!(
            Stopping::within(Duration::from_secs(30)),
            Stopping {
                drain: Duration::from_secs(10),
                store_tokens: Duration::from_secs(5),
                release: Duration::from_secs(10),
            }
        );
        for grace in [1, 6, 9, 30, 120] {
            let grace = Duration::from_secs(grace);
            let s = Stopping::within(grace);
            let spent = s.drain + s.store_tokens + s.release;
            assert!(spent < grace && spent >= grace * 4 / 5, "{grace:?}: {s:?}");
        }
    }

    #[test]
    fn each_step_of_a_stop_ends_at_its_point_after_the_stop_was_asked() {
        let s = Stopping::within(Duration::from_secs(30));
        // 12 s after SIGTERM (tests and reconciles took longer than their 10 s): the
        // tokens have until 15 s; the lease its 10 s, by 25 s.
        let asked = Some(Instant::now() - Duration::from_secs(12));
        assert_eq!(s.for_tests(asked), Duration::ZERO);
        let tokens = s.for_tokens(asked);
        assert!(tokens <= Duration::from_secs(3) && tokens > Duration::from_secs(2));
        assert_eq!(s.for_lease(asked), Duration::from_secs(10));
        // 20 s after: the lease has until 25 s.
        let asked = Some(Instant::now() - Duration::from_secs(20));
        let lease = s.for_lease(asked);
        assert!(lease <= Duration::from_secs(5) && lease > Duration::from_secs(4));
        // At once: no step takes more than its share.
        let asked = Some(Instant::now());
        assert!(s.for_tokens(asked) <= Duration::from_secs(5));
        assert!(s.for_lease(asked) <= Duration::from_secs(10));
        // A lost lease, no stop asked: each its own share.
        assert_eq!(s.for_tokens(None), Duration::from_secs(5));
        assert_eq!(s.for_lease(None), Duration::from_secs(10));
    }
}
