//! Which providers reference each Secret and ConfigMap, kept up to date from the
//! providers' watch. A Secret's event asks for the reconcile of the providers that use
//! it; looking them up by scanning every provider cost O(providers) per event, and a
//! relist of 10,000 Secrets under 10,000 providers (an API server restart, a new Lease
//! term) took seconds of CPU.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher::Event;

use crate::api::IncomingMailProvider;
use crate::credentials::{ObjectKind, references};

type Provider = ObjectRef<IncomingMailProvider>;
/// A referenced object: kind, namespace, name.
type Object = (ObjectKind, String, String);

#[derive(Default)]
pub struct Referrers(Mutex<Index>);

#[derive(Default)]
struct Index {
    by_object: HashMap<Object, HashSet<Provider>>,
    by_provider: HashMap<Provider, Vec<Object>>,
    /// During a relist: what it has listed so far, which replaces everything at its end
    /// (as the providers' cache does; providers not listed again were deleted meanwhile).
    relisting: Option<HashMap<Provider, Vec<Object>>>,
}

impl Referrers {
    /// Follows one event of the providers' watch.
    pub fn apply(&self, event: &Event<IncomingMailProvider>) {
        let mut index = self.0.lock().unwrap();
        match event {
            Event::Apply(p) => {
                let (key, objects) = entry(p);
                index.remove(&key);
                index.insert(key, objects);
            }
            Event::Delete(p) => index.remove(&entry(p).0),
            Event::Init => index.relisting = Some(HashMap::new()),
            Event::InitApply(p) => {
                let (key, objects) = entry(p);
                index.relisting.get_or_insert_default().insert(key, objects);
            }
            Event::InitDone => {
                let listed = index.relisting.take().unwrap_or_default();
                *index = Index::default();
                for (key, objects) in listed {
                    index.insert(key, objects);
                }
            }
        }
    }

    /// The providers that reference any object of this kind.
    pub fn of_kind(&self, kind: ObjectKind) -> Vec<Provider> {
        let index = self.0.lock().unwrap();
        index
            .by_provider
            .iter()
            .filter(|(_, objects)| objects.iter().any(|(k, _, _)| *k == kind))
            .map(|(provider, _)| provider.clone())
            .collect()
    }

    /// The providers that reference this object.
    pub fn of(&self, kind: ObjectKind, namespace: &str, name: &str) -> Vec<Provider> {
        let object = (kind, namespace.to_string(), name.to_string());
        self.0
            .lock()
            .unwrap()
            .by_object
            .get(&object)
            .map(|providers| providers.iter().cloned().collect())
            .unwrap_or_default()
    }
}

impl Index {
    fn insert(&mut self, key: Provider, objects: Vec<Object>) {
        for object in &objects {
            self.by_object
                .entry(object.clone())
                .or_default()
                .insert(key.clone());
        }
        self.by_provider.insert(key, objects);
    }

    fn remove(&mut self, key: &Provider) {
        for object in self.by_provider.remove(key).unwrap_or_default() {
            if let Some(providers) = self.by_object.get_mut(&object) {
                providers.remove(key);
                if providers.is_empty() {
                    self.by_object.remove(&object);
                }
            }
        }
    }
}

fn entry(p: &IncomingMailProvider) -> (Provider, Vec<Object>) {
    let ns = p.namespace().unwrap_or_default();
    let key = ObjectRef::new(&p.name_any()).within(&ns);
    let objects = references(&p.spec)
        .into_iter()
        .map(|r| (r.kind, ns.clone(), r.name))
        .collect();
    (key, objects)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(namespace: &str, name: &str, secret: &str) -> IncomingMailProvider {
        let spec = serde_json::from_value(serde_json::json!({
            "server": {"host": "mail.example.com", "protocol": "IMAP"},
            "tls": {"caBundleRef": {"kind": "ConfigMap", "name": "ca"}},
            "authentication": {"method": "Password", "secretRef": {"name": secret}},
        }))
        .unwrap();
        let mut p = IncomingMailProvider::new(name, spec);
        p.metadata.namespace = Some(namespace.into());
        p
    }

    fn names(mut refs: Vec<Provider>) -> Vec<String> {
        refs.sort_by(|a, b| a.name.cmp(&b.name));
        refs.into_iter().map(|r| r.name).collect()
    }

    #[test]
    fn follows_providers_as_they_come_change_and_go() {
        let r = Referrers::default();
        r.apply(&Event::Apply(provider("team", "a", "login")));
        r.apply(&Event::Apply(provider("team", "b", "login")));
        r.apply(&Event::Apply(provider("other", "c", "login")));
        assert_eq!(names(r.of(ObjectKind::Secret, "team", "login")), ["a", "b"]);
        assert_eq!(names(r.of(ObjectKind::ConfigMap, "team", "ca")), ["a", "b"]);
        // Same name, other kind or namespace: another object.
        assert!(r.of(ObjectKind::ConfigMap, "team", "login").is_empty());
        assert_eq!(names(r.of(ObjectKind::Secret, "other", "login")), ["c"]);

        // b moves to another Secret: it leaves the first one's referrers.
        r.apply(&Event::Apply(provider("team", "b", "rotated")));
        assert_eq!(names(r.of(ObjectKind::Secret, "team", "login")), ["a"]);
        assert_eq!(names(r.of(ObjectKind::Secret, "team", "rotated")), ["b"]);
        r.apply(&Event::Delete(provider("team", "a", "login")));
        assert!(r.of(ObjectKind::Secret, "team", "login").is_empty());
        assert_eq!(names(r.of(ObjectKind::ConfigMap, "team", "ca")), ["b"]);
    }

    #[test]
    fn the_providers_of_a_kind_are_those_referencing_any_object_of_it() {
        let r = Referrers::default();
        r.apply(&Event::Apply(provider("team", "a", "login")));
        r.apply(&Event::Apply(provider("other", "b", "login")));
        let mut none = provider("team", "c", "login");
        none.spec.authentication.secret_ref = None;
        none.spec.tls.ca_bundle_ref = None;
        r.apply(&Event::Apply(none));
        assert_eq!(names(r.of_kind(ObjectKind::Secret)), ["a", "b"]);
        assert_eq!(names(r.of_kind(ObjectKind::ConfigMap)), ["a", "b"]);
    }

    #[test]
    fn a_relist_replaces_everything_at_its_end() {
        let r = Referrers::default();
        r.apply(&Event::Apply(provider("team", "gone", "old")));
        r.apply(&Event::Init);
        r.apply(&Event::InitApply(provider("team", "new", "login")));
        // Until the relist is done, what was known stands.
        assert_eq!(names(r.of(ObjectKind::Secret, "team", "old")), ["gone"]);
        assert!(r.of(ObjectKind::Secret, "team", "login").is_empty());
        r.apply(&Event::InitDone);
        assert!(r.of(ObjectKind::Secret, "team", "old").is_empty());
        assert_eq!(names(r.of(ObjectKind::Secret, "team", "login")), ["new"]);
    }
}
