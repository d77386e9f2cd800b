//! The controller: watches providers and the objects they reference, tests each one on
//! its schedule, and writes what it found into `.status` (and Events on transitions).
//! The decisions live in pure modules (`schedule`, `status`); this module reads, calls
//! them, and writes.

mod limits;
mod objects;
mod reconcile;
pub mod schedule;
pub mod status;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use tokio::sync::Semaphore;

use crate::api::IncomingMailProvider;
use crate::credentials::{ObjectKind, references};

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
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub objects: Objects,
    pub limits: HostLimits,
    pub tests: Semaphore,
    pub memory: Mutex<HashMap<ObjectRef<IncomingMailProvider>, schedule::Memory>>,
    pub jitter: Box<dyn schedule::Jitter>,
    /// OAuth2: keeps access tokens fresh and writes rotated refresh tokens back.
    pub tokens: crate::credentials::tokens::TokenManager,
}

/// Runs until SIGTERM or SIGINT, then finishes the tests in flight and returns.
pub async fn run(client: Client, settings: Settings) -> anyhow::Result<()> {
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
    let mut secret_streams = Vec::new();
    let mut cm_streams = Vec::new();
    for scope in &scopes {
        let (_, secrets, cms) = api_for(scope);
        let (store, writer) = reflector::store::<PartialObjectMeta<Secret>>();
        secret_streams.push(reflector::reflector(
            writer,
            watcher(secrets, watcher::Config::default()),
        ));
        secret_stores.push(store);
        let (store, writer) = reflector::store::<PartialObjectMeta<ConfigMap>>();
        cm_streams.push(reflector::reflector(
            writer,
            watcher(cms, watcher::Config::default()),
        ));
        cm_stores.push(store);
    }

    let reporter = Reporter {
        controller: "mailroom".into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(client.clone(), reporter),
        objects: Objects::new(client.clone(), secret_stores.clone(), cm_stores.clone()),
        limits: HostLimits::new(settings.per_host),
        tests: Semaphore::new(settings.concurrency.max(1)),
        memory: Mutex::new(HashMap::new()),
        jitter: Box::new(schedule::RandomJitter),
        tokens: crate::credentials::tokens::TokenManager::new(client.clone())?,
    });

    let shutdown = shutdown_signal().shared();
    let mut controllers = Vec::new();
    let mut provider_stores = Vec::new();
    for ((scope, secret_stream), cm_stream) in scopes.iter().zip(secret_streams).zip(cm_streams) {
        let (providers, _, _) = api_for(scope);
        let controller = Controller::new(providers, watcher::Config::default()).with_config(
            // Reconciles that only reschedule are cheap; tests are bounded by `ctx.tests`.
            ControllerConfig::default()
                .concurrency(u16::try_from(settings.concurrency * 4).unwrap_or(u16::MAX)),
        );
        let store = controller.store();
        provider_stores.push(store.clone());
        let by_secret = store.clone();
        let by_cm = store.clone();
        let controller = controller
            .watches_stream(
                secret_stream.default_backoff().touched_objects(),
                move |meta: PartialObjectMeta<Secret>| {
                    dependents(&by_secret, ObjectKind::Secret, &meta)
                },
            )
            .watches_stream(
                cm_stream.default_backoff().touched_objects(),
                move |meta: PartialObjectMeta<ConfigMap>| {
                    dependents(&by_cm, ObjectKind::ConfigMap, &meta)
                },
            )
            .graceful_shutdown_on(shutdown.clone());
        let ctx = ctx.clone();
        controllers.push(
            controller
                .run(reconcile::reconcile, reconcile::error_policy, ctx)
                .for_each(|res| async move {
                    if let Err(e) = res {
                        tracing::debug!(error = %e, "reconcile did not complete");
                    }
                })
                .boxed(),
        );
    }
    let sweeper = sweep(ctx.clone(), provider_stores);
    tracing::info!(namespaces = ?settings.namespaces, "controller started");
    tokio::select! {
        _ = futures::future::join_all(controllers) => {}
        _ = sweeper => {}
    }
    tracing::info!("controller stopped");
    Ok(())
}

/// The providers in the object's namespace that reference it.
fn dependents<K: Resource>(
    store: &Store<IncomingMailProvider>,
    kind: ObjectKind,
    obj: &K,
) -> Vec<ObjectRef<IncomingMailProvider>> {
    let ns = obj.meta().namespace.clone().unwrap_or_default();
    let name = obj.meta().name.clone().unwrap_or_default();
    store
        .state()
        .into_iter()
        .filter(|p| p.namespace().as_deref() == Some(ns.as_str()))
        .filter(|p| {
            references(&p.spec)
                .iter()
                .any(|r| r.kind == kind && r.name == name)
        })
        .map(|p| ObjectRef::from_obj(&*p))
        .collect()
}

/// Forgets deleted providers and the values only they used, once a minute.
async fn sweep(ctx: Arc<Context>, stores: Vec<Store<IncomingMailProvider>>) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tick.tick().await;
        let providers: Vec<_> = stores.iter().flat_map(|s| s.state()).collect();
        let live: HashSet<_> = providers
            .iter()
            .map(|p| ObjectRef::from_obj(&**p))
            .collect();
        ctx.memory.lock().unwrap().retain(|k, _| live.contains(k));
        let used: HashSet<_> = providers
            .iter()
            .flat_map(|p| {
                let ns = p.namespace().unwrap_or_default();
                references(&p.spec)
                    .into_iter()
                    .map(move |r| (r.kind, ns.clone(), r.name))
            })
            .collect();
        ctx.objects.retain(&used);
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: finishing the tests in flight"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: finishing the tests in flight"),
    }
}
