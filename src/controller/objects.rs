//! The Secrets and ConfigMaps providers reference. Only their metadata is watched (and
//! cached), so the controller's memory does not grow with every Secret in the cluster;
//! a value is fetched when a test needs it and kept until its resourceVersion changes,
//! so a steady fleet costs the API server no reads.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt};

use crate::credentials::tokens::Written;
use crate::credentials::{Fetched, ObjectKind, Reference};

#[derive(Clone)]
enum Value {
    Secret(Arc<Secret>),
    ConfigMap(Arc<ConfigMap>),
}

/// (kind, namespace, name) of a referenced object.
type Key = (ObjectKind, String, String);

/// Metadata stores (one per watched scope) and the value cache.
pub struct Objects {
    client: Client,
    secrets: Vec<Store<PartialObjectMeta<Secret>>>,
    config_maps: Vec<Store<PartialObjectMeta<ConfigMap>>>,
    values: Mutex<HashMap<Key, (String, Value)>>,
    own: Mutex<OwnWrites>,
}

/// The versions the controller wrote itself (an OAuth2 token Secret after a refresh), each
/// with the version it replaced. Such a write is no change of what a provider references:
/// counted as one, every write-back set off a test of each provider sharing the Secret,
/// and when access tokens live under the five minutes kept in hand, each of those tests
/// refreshed and wrote back again, without end.
///
/// Every version of a run of our own writes stands for the version before the run, not
/// only the last: providers sharing a token Secret write it one after another, and the
/// Secrets' watch may deliver an earlier of those versions after a later one was written.
/// Counted as a change, it set off a test, whose refresh wrote again, and so on.
#[derive(Debug, Default)]
struct OwnWrites(HashMap<Key, OwnRun>);

/// The versions one run of our own writes made (the latest last), and the version before.
#[derive(Debug)]
struct OwnRun {
    written: Vec<String>,
    base: Option<String>,
}

/// The most versions of one run remembered: a watch lags by a few writes, not by dozens.
const OWN_RUN_MAX: usize = 16;

impl OwnWrites {
    /// `key` went from `before` to `after` by the controller's own write.
    fn note(&mut self, key: Key, before: Option<String>, after: String) {
        match self.0.get_mut(&key) {
            // A write over one of our own continues the run.
            Some(run) if before.as_ref().is_some_and(|b| run.written.contains(b)) => {
                if run.written.len() == OWN_RUN_MAX {
                    run.written.remove(0);
                }
                run.written.push(after);
            }
            // Over someone else's version: a new run, standing for theirs.
            _ => {
                let run = OwnRun {
                    written: vec![after],
                    base: before,
                };
                self.0.insert(key, run);
            }
        }
    }

    /// The version a provider's schedule should see for `key` at `version`.
    fn resolve(&self, key: &Key, version: Option<String>) -> Option<String> {
        match self.0.get(key) {
            Some(run) if version.as_ref().is_some_and(|v| run.written.contains(v)) => {
                run.base.clone()
            }
            _ => version,
        }
    }
}

impl Objects {
    pub fn new(
        client: Client,
        secrets: Vec<Store<PartialObjectMeta<Secret>>>,
        config_maps: Vec<Store<PartialObjectMeta<ConfigMap>>>,
    ) -> Self {
        Objects {
            client,
            secrets,
            config_maps,
            values: Mutex::new(HashMap::new()),
            own: Mutex::new(OwnWrites::default()),
        }
    }

    /// Waits until every metadata store has listed once: before that, "absent" would be
    /// a guess, and a test on a guess is a test to repeat. Polled, because a reconcile
    /// parked on the stores' own readiness futures was seen not to be woken.
    pub async fn ready(&self) -> bool {
        loop {
            let pending = self
                .secrets
                .iter()
                .map(|s| s.wait_until_ready().now_or_never())
                .chain(
                    self.config_maps
                        .iter()
                        .map(|s| s.wait_until_ready().now_or_never()),
                )
                .find(|state| !matches!(state, Some(Ok(()))));
            match pending {
                None => return true,
                Some(Some(Err(_))) => return false,
                _ => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        }
    }

    /// The resourceVersion of a referenced object, or None when it does not exist.
    fn version(&self, namespace: &str, r: &Reference) -> Option<String> {
        match r.kind {
            ObjectKind::Secret => {
                let key = ObjectRef::new(&r.name).within(namespace);
                self.secrets
                    .iter()
                    .find_map(|s| s.get(&key))
                    .and_then(|m| m.resource_version())
            }
            ObjectKind::ConfigMap => {
                let key = ObjectRef::new(&r.name).within(namespace);
                self.config_maps
                    .iter()
                    .find_map(|s| s.get(&key))
                    .and_then(|m| m.resource_version())
            }
        }
    }

    /// A hash of the references' current versions: a change means "test again". The
    /// controller's own writes do not count (see [`OwnWrites`]).
    pub fn fingerprint(&self, namespace: &str, refs: &[Reference]) -> u64 {
        let own = self.own.lock().unwrap();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for r in refs {
            r.hash(&mut h);
            let key = (r.kind, namespace.to_string(), r.name.clone());
            own.resolve(&key, self.version(namespace, r)).hash(&mut h);
        }
        h.finish()
    }

    /// Notes a token Secret the controller itself rewrote (see [`OwnWrites`]).
    pub fn note_own_write(&self, namespace: &str, written: &Written) {
        let key = (
            ObjectKind::Secret,
            namespace.to_string(),
            written.secret.clone(),
        );
        self.own
            .lock()
            .unwrap()
            .note(key, written.before.clone(), written.after.clone());
    }

    /// The referenced objects that exist, read from the cache or, when their version
    /// moved, from the API server.
    pub async fn fetch(&self, namespace: &str, refs: &[Reference]) -> Result<Fetched, kube::Error> {
        let mut fetched = Fetched {
            namespace: namespace.to_string(),
            ..Default::default()
        };
        for r in refs {
            let Some(version) = self.version(namespace, r) else {
                continue;
            };
            let key = (r.kind, namespace.to_string(), r.name.clone());
            let cached = {
                let values = self.values.lock().unwrap();
                values
                    .get(&key)
                    .filter(|(v, _)| *v == version)
                    .map(|(_, value)| value.clone())
            };
            let value = match cached {
                Some(v) => Some(v),
                None => self.get(namespace, r).await?,
            };
            match value {
                Some(Value::Secret(s)) => {
                    let rv = s.resource_version().unwrap_or_default();
                    self.values
                        .lock()
                        .unwrap()
                        .insert(key, (rv, Value::Secret(s.clone())));
                    fetched.secrets.insert(r.name.clone(), (*s).clone());
                }
                Some(Value::ConfigMap(c)) => {
                    let rv = c.resource_version().unwrap_or_default();
                    self.values
                        .lock()
                        .unwrap()
                        .insert(key, (rv, Value::ConfigMap(c.clone())));
                    fetched.config_maps.insert(r.name.clone(), (*c).clone());
                }
                None => {}
            }
        }
        Ok(fetched)
    }

    async fn get(&self, namespace: &str, r: &Reference) -> Result<Option<Value>, kube::Error> {
        Ok(match r.kind {
            ObjectKind::Secret => Api::<Secret>::namespaced(self.client.clone(), namespace)
                .get_opt(&r.name)
                .await?
                .map(|s| Value::Secret(Arc::new(s))),
            ObjectKind::ConfigMap => Api::<ConfigMap>::namespaced(self.client.clone(), namespace)
                .get_opt(&r.name)
                .await?
                .map(|c| Value::ConfigMap(Arc::new(c))),
        })
    }

    /// Drops cached values no provider references any more.
    pub fn retain(&self, live: &std::collections::HashSet<Key>) {
        self.values.lock().unwrap().retain(|k, _| live.contains(k));
        self.own.lock().unwrap().0.retain(|k, _| live.contains(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Key {
        (ObjectKind::Secret, "ops".into(), "alice-token".into())
    }

    #[test]
    fn own_writes_look_like_the_version_they_replaced() {
        let mut own = OwnWrites::default();
        own.note(key(), Some("10".into()), "11".into());
        assert_eq!(own.resolve(&key(), Some("11".into())), Some("10".into()));
        // Another write over ours: still the version before the first.
        own.note(key(), Some("11".into()), "12".into());
        assert_eq!(own.resolve(&key(), Some("12".into())), Some("10".into()));
        // Someone else's write is a change.
        assert_eq!(own.resolve(&key(), Some("13".into())), Some("13".into()));
        // Our write over someone else's stands for theirs.
        own.note(key(), Some("13".into()), "14".into());
        assert_eq!(own.resolve(&key(), Some("14".into())), Some("13".into()));
        // Providers sharing the Secret write it in turn, and the watch delivers the
        // versions late: every one of the run is still no change.
        own.note(key(), Some("14".into()), "15".into());
        assert_eq!(own.resolve(&key(), Some("14".into())), Some("13".into()));
        assert_eq!(own.resolve(&key(), Some("15".into())), Some("13".into()));
        // Bounded: the oldest versions of a long run are forgotten.
        for v in 16..40 {
            own.note(key(), Some((v - 1).to_string()), v.to_string());
        }
        assert_eq!(own.resolve(&key(), Some("39".into())), Some("13".into()));
        assert_eq!(own.resolve(&key(), Some("14".into())), Some("14".into()));
        // A Secret we created looks like none.
        let other = (ObjectKind::Secret, "ops".into(), "app-token".into());
        own.note(other.clone(), None, "1".into());
        assert_eq!(own.resolve(&other, Some("1".into())), None);
    }
}
