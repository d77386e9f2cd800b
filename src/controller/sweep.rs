//! Forgetting deleted providers: what the controller keeps per provider (schedule memory,
//! unwritten results, failed writes, metrics series) and per referenced object (cached
//! metadata, kept OAuth2 tokens) goes once nothing live uses it.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};

use super::{Context, in_scope};
use crate::api::IncomingMailProvider;
use crate::credentials::{ObjectKind, references};

/// What is live now, as the provider caches see it. A scope whose cache has not listed
/// yet (a new Lease term, a watch that cannot list) is empty, not deleted: everything in
/// its namespaces counts as live until it has.
pub struct Live {
    providers: HashSet<ObjectRef<IncomingMailProvider>>,
    used: HashSet<(ObjectKind, String, String)>,
    unlisted: Vec<Option<String>>,
    /// The uids of every provider the caches hold, being deleted or not.
    uids: HashSet<String>,
}

impl Live {
    pub fn of(stores: &[(Option<String>, Store<IncomingMailProvider>)]) -> Self {
        let unlisted = super::unlisted(stores);
        let cached: Vec<_> = stores.iter().flat_map(|(_, s)| s.state()).collect();
        let uids = cached
            .iter()
            .filter_map(|p| p.metadata.uid.clone())
            .collect();
        // What providers being deleted reference stays: a refresh token kept since a
        // failed write may still be stored for a provider created again on that Secret.
        let used = cached
            .iter()
            .flat_map(|p| {
                let ns = p.namespace().unwrap_or_default();
                references(&p.spec)
                    .into_iter()
                    .map(move |r| (r.kind, ns.clone(), r.name))
            })
            .collect();
        Live {
            providers: cached
                .iter()
                .filter(|p| !p.being_deleted())
                .map(|p| ObjectRef::from_obj(&**p))
                .collect(),
            used,
            unlisted,
            uids,
        }
    }

    /// Whether a provider of this uid, in this namespace, may still be in a cache (a
    /// scope not listed yet may hold anything of its namespaces, and only of those: one
    /// namespace whose providers cannot be listed must not keep every other's).
    pub fn uid(&self, uid: &str, namespace: &str) -> bool {
        self.uids.contains(uid) || self.held(namespace)
    }

    fn held(&self, namespace: &str) -> bool {
        self.unlisted
            .iter()
            .any(|scope| in_scope(scope, Some(namespace)))
    }

    pub fn provider(&self, key: &ObjectRef<IncomingMailProvider>) -> bool {
        self.providers.contains(key) || self.held(key.namespace.as_deref().unwrap_or_default())
    }

    /// The same, for a provider named by (namespace, name), as metrics are.
    pub fn provider_named(&self, (namespace, name): &(String, String)) -> bool {
        self.provider(&ObjectRef::new(name).within(namespace))
    }

    /// Whether a live provider references this object (or its namespace is held).
    pub fn object(&self, kind: ObjectKind, namespace: &str, name: &str) -> bool {
        self.held(namespace)
            || self
                .used
                .contains(&(kind, namespace.to_string(), name.to_string()))
    }
}

/// Forgets deleted providers and the values only they used, once a minute.
pub async fn run(ctx: Arc<Context>) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tick.tick().await;
        forget(&ctx, &Live::of(&ctx.providers));
    }
}

fn forget(ctx: &Context, live: &Live) {
    ctx.memory.lock().unwrap().retain(|k, _| live.provider(k));
    ctx.unwritten
        .lock()
        .unwrap()
        .retain(|k, _| live.provider(k));
    ctx.failed_writes
        .lock()
        .unwrap()
        .retain(|k, _| live.provider(k));
    ctx.gone.lock().unwrap().retain(|uid, ns| live.uid(uid, ns));
    ctx.metrics.retain_providers(|k| live.provider_named(k));
    ctx.objects
        .retain(|(kind, ns, name)| live.object(*kind, ns, name));
    ctx.tokens
        .retain(|ns, name| live.object(ObjectKind::Secret, ns, name));
}

#[cfg(test)]
mod tests {
    use kube::runtime::reflector::store;
    use kube::runtime::watcher::Event;

    use super::*;
    use crate::api::IncomingMailProviderSpec;

    fn provider(namespace: &str, name: &str, secret: &str) -> IncomingMailProvider {
        let spec: IncomingMailProviderSpec = serde_json::from_value(serde_json::json!({
            "server": {"host": "mail.example.com", "protocol": "IMAP"},
            "authentication": {"method": "Password", "username": "u",
                "secretRef": {"name": secret}},
        }))
        .unwrap();
        let mut p = IncomingMailProvider::new(name, spec);
        p.metadata.namespace = Some(namespace.into());
        p
    }

    /// A cache that has listed these providers.
    fn listed(providers: Vec<IncomingMailProvider>) -> Store<IncomingMailProvider> {
        let (reader, mut writer) = store();
        writer.apply_watcher_event(&Event::Init);
        for p in providers {
            writer.apply_watcher_event(&Event::InitApply(p));
        }
        writer.apply_watcher_event(&Event::InitDone);
        reader
    }

    fn key(namespace: &str, name: &str) -> ObjectRef<IncomingMailProvider> {
        ObjectRef::new(name).within(namespace)
    }

    #[test]
    fn a_deleted_provider_and_the_secret_only_it_used_are_forgotten() {
        let stores = vec![(
            Some("team".to_string()),
            listed(vec![provider("team", "kept", "kept-login")]),
        )];
        let live = Live::of(&stores);
        assert!(live.provider(&key("team", "kept")));
        assert!(live.provider_named(&("team".into(), "kept".into())));
        assert!(live.object(ObjectKind::Secret, "team", "kept-login"));
        assert!(!live.provider(&key("team", "deleted")));
        assert!(!live.provider_named(&("team".into(), "deleted".into())));
        assert!(!live.object(ObjectKind::Secret, "team", "deleted-login"));
        // The same name elsewhere is another object.
        assert!(!live.object(ObjectKind::Secret, "other", "kept-login"));
        assert!(!live.object(ObjectKind::ConfigMap, "team", "kept-login"));
    }

    #[test]
    fn a_provider_being_deleted_is_forgotten_while_a_finalizer_holds_it() {
        let mut held = provider("team", "held", "held-login");
        held.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ));
        held.metadata.finalizers = Some(vec!["example.com/hold".into()]);
        held.metadata.uid = Some("held-uid".into());
        let stores = vec![(
            Some("team".to_string()),
            listed(vec![held, provider("team", "kept", "kept-login")]),
        )];
        let live = Live::of(&stores);
        assert!(
            live.uid("held-uid", "team"),
            "still cached: its uid is kept"
        );
        assert!(!live.uid("deleted-uid", "team"));
        assert!(!live.provider(&key("team", "held")));
        // What it references is kept while the cache holds it.
        assert!(live.object(ObjectKind::Secret, "team", "held-login"));
        assert!(live.provider(&key("team", "kept")));
    }

    #[test]
    fn a_scope_not_listed_yet_keeps_everything_in_its_namespaces() {
        // A new Lease term: the caches start empty. What was kept across the lost term
        // (tokens not stored yet among it) must survive until they have listed.
        let (empty, _writer) = store::<IncomingMailProvider>();
        let stores = vec![
            (Some("waiting".to_string()), empty),
            (Some("team".to_string()), listed(vec![])),
        ];
        let live = Live::of(&stores);
        assert!(live.provider(&key("waiting", "any")));
        assert!(live.uid("any-uid", "waiting"));
        assert!(live.provider_named(&("waiting".into(), "any".into())));
        assert!(live.object(ObjectKind::Secret, "waiting", "tokens"));
        // A listed scope beside it is swept as usual.
        assert!(!live.provider(&key("team", "deleted")));
        assert!(!live.uid("deleted-uid", "team"));
        assert!(!live.object(ObjectKind::Secret, "team", "tokens"));

        // All namespaces in one scope, not listed yet: nothing is forgotten.
        let (empty, _writer) = store::<IncomingMailProvider>();
        let live = Live::of(&[(None, empty)]);
        assert!(live.provider(&key("anywhere", "any")));
        assert!(live.object(ObjectKind::ConfigMap, "anywhere", "ca"));
    }
}
