//! The Secrets and ConfigMaps providers reference. Only their metadata is watched (and
//! cached), so the controller's memory does not grow with every Secret in the cluster;
//! a value is fetched when a test needs it and kept until its resourceVersion changes,
//! so a steady fleet costs the API server no reads.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt};

use super::access::Access;
use super::schedule::Unwatched;
use crate::credentials::tokens::own_writes::{OwnWrites, Resolved};
use crate::credentials::{Fetched, ObjectKind, Reference};

#[derive(Clone)]
enum Value {
    Secret(Arc<Secret>),
    ConfigMap(Arc<ConfigMap>),
}

impl Value {
    fn version(&self) -> Option<String> {
        match self {
            Value::Secret(s) => s.resource_version(),
            Value::ConfigMap(c) => c.resource_version(),
        }
    }
}

/// The longest a test or a decision waits for the answer to the controller's own write
/// of a Secret it references: one API request, which its client bounds anyway.
const OWN_WRITE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// (kind, namespace, name) of a referenced object.
type Key = (ObjectKind, String, String);

/// `AccessDenied`'s message: what may not be read, the API server's words, and what to
/// grant (`resource`, where, and through which role).
fn refused(what: &str, words: &str, resource: &str, (r#where, grant): (String, &str)) -> String {
    format!(
        "mailroom may not read {what}: the API server says {words:?}; \
         give its ServiceAccount get, list and watch on {resource} {where} through {grant}"
    )
}

/// Whether the cache of `kinds` a provider references may be trusted: listed (and let
/// through by the API server), refused (its words), or neither yet.
pub enum Readiness {
    Listed,
    Denied(String),
    NotListed,
}

/// Metadata stores (one per watched scope) and the value cache.
pub struct Objects {
    client: Client,
    /// The watched scopes (a namespace, or None for all), one per store below.
    scopes: Vec<Option<String>>,
    secrets: Vec<Store<PartialObjectMeta<Secret>>>,
    config_maps: Vec<Store<PartialObjectMeta<ConfigMap>>>,
    /// Whether each scope's Secrets and ConfigMaps watches are let through.
    access: Vec<[Arc<Access>; 2]>,
    values: Mutex<HashMap<Key, (String, Value)>>,
    /// Objects a test read from the API server before their watch brought them, at the
    /// version read: what the cache will show, until their first event comes.
    read_ahead: Mutex<HashMap<Key, String>>,
    /// The token Secrets the controller rewrote itself (its token manager's ledger).
    own: Arc<OwnWrites>,
}

impl Objects {
    pub fn new(
        client: Client,
        scopes: Vec<Option<String>>,
        secrets: Vec<Store<PartialObjectMeta<Secret>>>,
        config_maps: Vec<Store<PartialObjectMeta<ConfigMap>>>,
        access: Vec<[Arc<Access>; 2]>,
        own: Arc<OwnWrites>,
    ) -> Self {
        Objects {
            client,
            scopes,
            secrets,
            config_maps,
            access,
            values: Mutex::new(HashMap::new()),
            read_ahead: Mutex::new(HashMap::new()),
            own,
        }
    }

    /// Waits until the metadata stores of the scope that holds `namespace` have listed
    /// once, those of the `kinds` a provider references: before that, "absent" would be a
    /// guess, and a test on a guess is a test to repeat. Only that scope's: a namespace
    /// whose Secrets the controller may not list (a RoleBinding gone) must not stop the
    /// tests of every other. Denied once the API server has refused one of those watches
    /// for `denied_after`, before the first list or since (what the cache holds may then
    /// be stale); see [`Objects::denied`]. Polled, because a reconcile parked on the
    /// stores' own readiness futures was seen not to be woken.
    pub async fn ready_for(
        &self,
        namespace: &str,
        kinds: &[ObjectKind],
        denied_after: std::time::Duration,
    ) -> Readiness {
        let Some(i) = self.scope_of(namespace) else {
            return Readiness::NotListed;
        };
        loop {
            if let Some(message) = self.denied(namespace, kinds, denied_after) {
                return Readiness::Denied(message);
            }
            match self.listed(i, kinds) {
                Some(true) => return Readiness::Listed,
                Some(false) => return Readiness::NotListed,
                None => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        }
    }

    /// Why the controller may not read the `kinds` of object (Secrets, ConfigMaps) a
    /// provider of `namespace` references, if the API server has refused their watch for at
    /// least `for_at_least`: the API server's words, and what to grant.
    fn denied(
        &self,
        namespace: &str,
        kinds: &[ObjectKind],
        for_at_least: std::time::Duration,
    ) -> Option<String> {
        let i = self.scope_of(namespace)?;
        let (words, resource) = kinds.iter().find_map(|&kind| {
            let (access, resource) = match kind {
                ObjectKind::Secret => (&self.access[i][0], "secrets"),
                ObjectKind::ConfigMap => (&self.access[i][1], "configmaps"),
            };
            access.denied(for_at_least).map(|words| (words, resource))
        })?;
        let grant = self.grant(i, namespace);
        Some(refused(
            &format!("{resource} {}", grant.0),
            &words,
            resource,
            grant,
        ))
    }

    /// What a provider says when the API server lets the controller list and watch the
    /// Secrets and ConfigMaps of `namespace` but refuses it one of them (`get`); `None`
    /// for any other failed read.
    pub fn get_refused(&self, namespace: &str, error: &kube::Error) -> Option<String> {
        let words = super::access::refusal(error)?;
        // The API server names the resource it refused in the details.
        let resource = match error {
            kube::Error::Api(status) => status
                .details
                .as_ref()
                .map(|d| d.kind.as_str())
                .filter(|k| matches!(*k, "secrets" | "configmaps")),
            _ => None,
        }
        .unwrap_or("secrets and configmaps");
        let grant = match self.scope_of(namespace) {
            Some(i) => self.grant(i, namespace),
            None => (
                format!("in namespace {namespace}"),
                "a Role and RoleBinding there",
            ),
        };
        Some(refused(
            "a Secret or ConfigMap this provider references",
            words,
            resource,
            grant,
        ))
    }

    /// Where rights are missing and what grants them, by how the controller watches:
    /// one namespace (a Role there), or all (a ClusterRole).
    fn grant(&self, scope: usize, namespace: &str) -> (String, &'static str) {
        match &self.scopes[scope] {
            Some(_) => (
                format!("in namespace {namespace}"),
                "a Role and RoleBinding there (the Helm chart makes them for every namespace in watchNamespaces)",
            ),
            None => (
                "in all namespaces".to_string(),
                "a ClusterRole and ClusterRoleBinding (the Helm chart makes them when watchNamespaces is empty)",
            ),
        }
    }

    fn scope_of(&self, namespace: &str) -> Option<usize> {
        self.scopes
            .iter()
            .position(|scope| super::in_scope(scope, Some(namespace)))
    }

    /// The watched namespaces (or "all namespaces") whose metadata stores have not listed
    /// yet.
    pub fn unsynced(&self) -> Vec<String> {
        (0..self.scopes.len())
            .filter(|&i| self.listed(i, &[ObjectKind::Secret, ObjectKind::ConfigMap]) != Some(true))
            .map(|i| super::scope_name(&self.scopes[i]))
            .collect()
    }

    /// How many watched scopes' caches of `kind` cannot be trusted now: not listed (yet,
    /// or ever), or listed before the API server began refusing their watch (the cache
    /// keeps what it held then).
    pub fn unlisted(&self, kind: ObjectKind) -> usize {
        let watch = match kind {
            ObjectKind::Secret => 0,
            ObjectKind::ConfigMap => 1,
        };
        (0..self.scopes.len())
            .filter(|&i| {
                self.listed(i, &[kind]) != Some(true)
                    || self.access[i][watch]
                        .denied(std::time::Duration::ZERO)
                        .is_some()
            })
            .count()
    }

    /// Whether scope `i`'s stores of these kinds have listed: `None` while they have not
    /// yet, `Some(false)` if they never will (their watch is gone).
    fn listed(&self, i: usize, kinds: &[ObjectKind]) -> Option<bool> {
        let mut states = kinds.iter().map(|kind| match kind {
            ObjectKind::Secret => self.secrets[i].wait_until_ready().now_or_never(),
            ObjectKind::ConfigMap => self.config_maps[i].wait_until_ready().now_or_never(),
        });
        match states.find(|state| !matches!(state, Some(Ok(())))) {
            None => Some(true),
            Some(Some(Err(_))) => Some(false),
            Some(_) => None,
        }
    }

    /// `read` of a referenced object's metadata as the cache holds it; None when it does
    /// not exist.
    fn with_meta<T>(
        &self,
        namespace: &str,
        r: &Reference,
        read: impl FnOnce(&ObjectMeta) -> T,
    ) -> Option<T> {
        match r.kind {
            ObjectKind::Secret => {
                let key = ObjectRef::new(&r.name).within(namespace);
                let found = self.secrets.iter().find_map(|s| s.get(&key))?;
                Some(read(&found.metadata))
            }
            ObjectKind::ConfigMap => {
                let key = ObjectRef::new(&r.name).within(namespace);
                let found = self.config_maps.iter().find_map(|s| s.get(&key))?;
                Some(read(&found.metadata))
            }
        }
    }

    /// The resourceVersion of a referenced object, or None when it does not exist.
    fn version(&self, namespace: &str, r: &Reference) -> Option<String> {
        self.with_meta(namespace, r, |m| m.resource_version.clone())
            .flatten()
            .or_else(|| {
                let key = (r.kind, namespace.to_string(), r.name.clone());
                self.read_ahead.lock().unwrap().get(&key).cloned()
            })
    }

    /// `versions` (as [`Self::versions`] gave them before `fetched` was read), with the
    /// objects the cache does not hold at the version the test read from the API server:
    /// their event, when it comes, is then no change.
    pub fn with_fetched(
        &self,
        namespace: &str,
        refs: &[Reference],
        mut versions: Vec<Option<String>>,
        fetched: &Fetched,
    ) -> Vec<Option<String>> {
        for (r, v) in refs.iter().zip(versions.iter_mut()) {
            if self.with_meta(namespace, r, |_| ()).is_some() {
                continue;
            }
            if let Some(read) = fetched.meta(r) {
                *v = read.resource_version.clone();
            }
        }
        versions
    }

    /// A (re)list of the `kind` of object in `scope` (a namespace, or None for all) is in
    /// the cache: it holds every one of them as it is now.
    pub fn relisted(&self, kind: ObjectKind, scope: Option<&str>) {
        self.read_ahead
            .lock()
            .unwrap()
            .retain(|(k, ns, _), _| *k != kind || scope.is_some_and(|s| s != ns));
    }

    /// An event of this object came: the cache holds what it is now.
    pub fn seen(&self, kind: ObjectKind, namespace: &str, name: &str) {
        let key = (kind, namespace.to_string(), name.to_string());
        self.read_ahead.lock().unwrap().remove(&key);
    }

    /// What happened to `refs` that a watch would have seen: when one was last created
    /// or changed (the newest of its creation and managedFields times, which the caches
    /// keep for this alone), and whether one does not exist.
    pub fn unwatched(&self, namespace: &str, refs: &[Reference]) -> Unwatched {
        let mut seen = Unwatched::default();
        for r in refs {
            let changed = self.with_meta(namespace, r, |m| {
                let times = m
                    .managed_fields
                    .iter()
                    .flatten()
                    .filter_map(|f| f.time.as_ref());
                m.creation_timestamp.iter().chain(times).map(|t| t.0).max()
            });
            match changed {
                None => seen.missing = true,
                Some(at) => seen.changed = seen.changed.max(at),
            }
        }
        seen
    }

    /// A hash of the references' current versions: a change means "test again". The
    /// controller's own token writes do not count (see [`OwnWrites`]); while one is on
    /// its way and the Secret shows a version not yet known as ours or not, this waits
    /// for the write's answer (one API request; at most [`OWN_WRITE_WAIT`]).
    pub async fn fingerprint(&self, namespace: &str, refs: &[Reference]) -> u64 {
        fingerprint(refs, &self.versions(namespace, refs).await)
    }

    /// The references' current versions, as [`Self::fingerprint`] hashes them (in the
    /// order of `refs`): what a test keeps of what it read.
    pub async fn versions(&self, namespace: &str, refs: &[Reference]) -> Vec<Option<String>> {
        settled(|give_up| {
            refs.iter()
                .map(|r| {
                    let seen = self.version(namespace, r);
                    match r.kind {
                        ObjectKind::Secret => self.resolved(namespace, &r.name, seen, give_up),
                        ObjectKind::ConfigMap => Some(seen),
                    }
                })
                .collect()
        })
        .await
    }

    /// `versions` of `refs` with Secret `read.0` at version `read.1` instead (what a test
    /// used, which the cache may not show yet), resolved as our own writes are; the
    /// others as they were.
    pub async fn with_read(
        &self,
        namespace: &str,
        refs: &[Reference],
        mut versions: Vec<Option<String>>,
        read: &(String, String),
    ) -> Vec<Option<String>> {
        let (name, version) = read;
        let resolved =
            settled(|give_up| self.resolved(namespace, name, Some(version.clone()), give_up)).await;
        for (r, v) in refs.iter().zip(versions.iter_mut()) {
            if r.kind == ObjectKind::Secret && &r.name == name {
                *v = resolved.clone();
            }
        }
        versions
    }

    /// Secret `name` at `seen` as the schedule compares it (our own writes stand for the
    /// version before them), or None while a write of ours on its way may have made it
    /// (unless `as_seen`: a write that outlived the wait, `seen` then counts as it is).
    fn resolved(
        &self,
        namespace: &str,
        name: &str,
        seen: Option<String>,
        as_seen: bool,
    ) -> Option<Option<String>> {
        match self.own.resolve(namespace, name, seen.clone()) {
            Resolved::Version(v) => Some(v),
            Resolved::Writing if as_seen => Some(seen),
            Resolved::Writing => None,
        }
    }

    /// The referenced objects that exist, read from the cache or, when their version
    /// moved, from the API server; with `read_missing`, also those the cache has not seen:
    /// a Secret applied just before its provider may reach the controller later than the
    /// provider (separate watches), and must not be said missing meanwhile. Only for a
    /// provider new, changed or asked for a test: one whose Secret is missing for good
    /// costs the API server no read per test.
    pub async fn fetch(
        &self,
        namespace: &str,
        refs: &[Reference],
        read_missing: bool,
    ) -> Result<Fetched, kube::Error> {
        let mut fetched = Fetched {
            namespace: namespace.to_string(),
            ..Default::default()
        };
        for r in refs {
            let key = (r.kind, namespace.to_string(), r.name.clone());
            let in_cache = self
                .with_meta(namespace, r, |m| m.resource_version.clone())
                .flatten();
            if in_cache.is_none() && !read_missing {
                continue;
            }
            let version = in_cache.clone().unwrap_or_default();
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
            // Unless the watch brought it during the read (then the cache has it).
            if in_cache.is_none() && self.with_meta(namespace, r, |_| ()).is_none() {
                let read = value.as_ref().and_then(Value::version);
                let mut ahead = self.read_ahead.lock().unwrap();
                match read {
                    Some(rv) => ahead.insert(key.clone(), rv),
                    None => ahead.remove(&key),
                };
            }
            let Some(value) = value else { continue };
            match &value {
                Value::Secret(s) => {
                    fetched.secrets.insert(r.name.clone(), (**s).clone());
                }
                Value::ConfigMap(c) => {
                    fetched.config_maps.insert(r.name.clone(), (**c).clone());
                }
            }
            let rv = value.version().unwrap_or_default();
            self.values.lock().unwrap().insert(key, (rv, value));
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
    pub fn retain(&self, keep: impl Fn(&Key) -> bool) {
        self.values.lock().unwrap().retain(|k, _| keep(k));
        self.read_ahead.lock().unwrap().retain(|k, _| keep(k));
    }
}

/// `attempt(give_up)` until it answers: None while a version seen may be our own write
/// on its way, asked again every 20 ms until [`OWN_WRITE_WAIT`] has passed, when
/// `give_up` is true and it takes what it sees.
async fn settled<T>(attempt: impl Fn(bool) -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + OWN_WRITE_WAIT;
    loop {
        if let Some(answer) = attempt(tokio::time::Instant::now() >= deadline) {
            return answer;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The hash of `refs` at `versions` (as [`Objects::versions`] gives them): a change
/// means "test again".
pub fn fingerprint(refs: &[Reference], versions: &[Option<String>]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for (r, v) in refs.iter().zip(versions) {
        r.hash(&mut h);
        v.hash(&mut h);
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::{reflector, watcher};

    /// Objects watching `scopes`, whose Secrets watch the API server refuses.
    fn secrets_refused(scopes: Vec<Option<String>>) -> Objects {
        let config = kube::Config::new("https://127.0.0.1:1".parse().unwrap());
        let client = Client::try_from(config).unwrap();
        let n = scopes.len();
        let access: Vec<[Arc<Access>; 2]> = (0..n)
            .map(|_| [Arc::new(Access::default()), Arc::new(Access::default())])
            .collect();
        let status =
            kube::core::Status::failure("secrets is forbidden", "Forbidden").with_code(403);
        for [secrets, _] in &access {
            secrets.failed(&watcher::Error::InitialListFailed(kube::Error::Api(
                Box::new(status.clone()),
            )));
        }
        Objects::new(
            client,
            scopes,
            (0..n).map(|_| reflector::store().0).collect(),
            (0..n).map(|_| reflector::store().0).collect(),
            access,
            Arc::default(),
        )
    }

    #[tokio::test]
    async fn a_refusal_concerns_only_providers_that_reference_that_kind() {
        let objects = secrets_refused(vec![Some("team-b".into())]);
        let now = std::time::Duration::ZERO;
        let message = objects
            .denied("team-b", &[ObjectKind::Secret, ObjectKind::ConfigMap], now)
            .expect("a provider with a Secret is refused");
        assert!(
            message.contains("may not read secrets in namespace team-b")
                && message.contains("a Role and RoleBinding there"),
            "{message}"
        );
        assert_eq!(
            objects.denied("team-b", &[ObjectKind::ConfigMap], now),
            None
        );
    }

    #[tokio::test]
    async fn a_scope_is_unlisted_until_it_lists_and_again_once_its_watch_is_refused() {
        let config = kube::Config::new("https://127.0.0.1:1".parse().unwrap());
        let scopes = vec![Some("team-a".to_string()), Some("team-b".to_string())];
        let (mut secrets, mut cms) = (Vec::new(), Vec::new());
        let mut writers = Vec::new();
        for _ in &scopes {
            let (store, writer) = reflector::store();
            secrets.push(store);
            writers.push(writer);
            cms.push(reflector::store().0);
        }
        let access: Vec<[Arc<Access>; 2]> = scopes
            .iter()
            .map(|_| [Arc::new(Access::default()), Arc::new(Access::default())])
            .collect();
        let objects = Objects::new(
            Client::try_from(config).unwrap(),
            scopes,
            secrets,
            cms,
            access.clone(),
            Arc::default(),
        );
        assert_eq!(objects.unlisted(ObjectKind::Secret), 2, "none listed yet");
        for writer in &mut writers {
            writer.apply_watcher_event(&watcher::Event::InitDone);
        }
        assert_eq!(objects.unlisted(ObjectKind::Secret), 0);
        assert_eq!(objects.unlisted(ObjectKind::ConfigMap), 2);
        // team-b's RoleBinding removed: its cache stays listed, but is stale.
        let status =
            kube::core::Status::failure("secrets is forbidden", "Forbidden").with_code(403);
        access[1][0].failed(&watcher::Error::WatchFailed(kube::Error::Api(Box::new(
            status,
        ))));
        assert_eq!(objects.unlisted(ObjectKind::Secret), 1);
        access[1][0].allowed();
        assert_eq!(objects.unlisted(ObjectKind::Secret), 0);
    }

    #[tokio::test]
    async fn a_refused_read_names_the_resource_and_the_role_to_grant() {
        let forbidden = |kind: &str| {
            let mut status = kube::core::Status::failure(
                &format!("{kind} \"ca\" is forbidden: cannot get resource"),
                "Forbidden",
            )
            .with_code(403);
            status.details = Some(kube::core::response::StatusDetails {
                kind: kind.into(),
                name: "ca".into(),
                group: String::new(),
                uid: String::new(),
                causes: Vec::new(),
                retry_after_seconds: 0,
            });
            kube::Error::Api(Box::new(status))
        };
        let everywhere = secrets_refused(vec![None]);
        let message = everywhere
            .get_refused("team-b", &forbidden("configmaps"))
            .unwrap();
        assert!(
            message.contains("get, list and watch on configmaps in all namespaces")
                && message.contains("ClusterRole"),
            "{message}"
        );
        let one = secrets_refused(vec![Some("team-b".into())]);
        let message = one.get_refused("team-b", &forbidden("secrets")).unwrap();
        assert!(
            message.contains("on secrets in namespace team-b through a Role"),
            "{message}"
        );
    }

    #[tokio::test]
    async fn watching_every_namespace_asks_for_cluster_wide_rights() {
        let objects = secrets_refused(vec![None]);
        let message = objects
            .denied("team-b", &[ObjectKind::Secret], std::time::Duration::ZERO)
            .unwrap();
        assert!(
            message.contains("in all namespaces") && message.contains("ClusterRoleBinding"),
            "{message}"
        );
    }

    #[tokio::test]
    async fn a_test_keeps_what_it_read_with_the_token_secret_it_used() {
        let config = kube::Config::new("https://127.0.0.1:1".parse().unwrap());
        let own = Arc::new(OwnWrites::default());
        let objects = Objects::new(
            Client::try_from(config).unwrap(),
            vec![None],
            vec![reflector::store().0],
            vec![reflector::store().0],
            vec![[Arc::new(Access::default()), Arc::new(Access::default())]],
            own.clone(),
        );
        let refs = [
            Reference {
                kind: ObjectKind::ConfigMap,
                name: "ca".into(),
            },
            Reference {
                kind: ObjectKind::Secret,
                name: "token".into(),
            },
        ];
        let read = vec![Some("c1".to_string()), Some("t1".to_string())];
        // Its own write-back (t2 over t1) stands for what it replaced: nothing changed.
        own.begin("ns", "token", Some("t1".into()))
            .done("t2".into());
        let used = objects
            .with_read("ns", &refs, read.clone(), &("token".into(), "t2".into()))
            .await;
        assert_eq!(used, read);
        // Another writer's version (stored kept tokens, a replica's) is what it used; the
        // ConfigMap stays as read before the token step, though the cache (empty here)
        // no longer has it: a change meanwhile is not taken as tested.
        let used = objects
            .with_read("ns", &refs, read.clone(), &("token".into(), "t9".into()))
            .await;
        assert_eq!(used, vec![Some("c1".to_string()), Some("t9".to_string())]);
        assert_ne!(fingerprint(&refs, &used), fingerprint(&refs, &read));
    }
}
