//! How the watches retry. kube-runtime's `Controller` puts one backoff (0.8 s doubling to
//! 30 s) on all its triggers together: an error from any watch pauses every watch, and
//! the pause only shrinks once one yields again. Across a kube-apiserver restart each
//! watch fails while the server is down and once more when it is back ("410 Gone": the
//! new server's cache starts past the watch's resourceVersion), so the pause had grown
//! to 20-30 s just when the server returned, and the controller acted on no change for
//! half a minute or more (the restarts tests saw it). Here the Secrets' and ConfigMaps'
//! watches retry on their own short backoff ([`schedule::watch_retry`]) and keep their
//! errors away from the shared one, which is given the same short backoff and so paces
//! only the providers' own watch. Every failed attempt is logged.

use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use kube::runtime::utils::{Backoff, StreamBackoff};
use kube::runtime::watcher;

use super::access::Access;
use super::schedule::{self, RandomJitter};

/// How long the API server keeps one watch open before the watcher makes it again (from
/// where it was, so nothing is listed again). kube-runtime gives up a watch that carries
/// nothing for this long plus 5 s: a watch whose connection went silent without closing
/// (a node lost behind a load balancer) is then made again on a new one. At kube's default
/// of 290 s a Secret fixed meanwhile went unseen for five minutes; at a minute it is seen
/// within about 65 s, for one more watch request per watch and minute.
pub const WATCH_TIMEOUT_SECS: u32 = 60;

/// The controller's watches: see [`WATCH_TIMEOUT_SECS`].
pub fn config() -> watcher::Config {
    watcher::Config::default().timeout(WATCH_TIMEOUT_SECS)
}

/// [`schedule::watch_retry`] as kube-runtime's backoff; reset by every item a watch
/// yields.
#[derive(Default)]
pub struct WatchBackoff {
    failures: u32,
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        self.failures = self.failures.saturating_add(1);
        Some(schedule::watch_retry(self.failures, &RandomJitter))
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.failures = 0;
    }
}

/// Each object a reflector's watch applied (and deleted, with `deletes`), for a
/// controller's triggers; the objects of a (re)list are left to [`on_relisted`].
/// kube-runtime's own `applied_objects` and `touched_objects` give each listed object as
/// its page arrives, while the store still holds what it held before the list (the
/// reflector swaps the list in whole at its end): after a watch gap ended by "410 Gone",
/// a reconcile started then read a provider, or a Secret's version, from before the gap,
/// or found no provider at all for one created meanwhile, and nothing asked again until
/// its next test was due.
pub fn changes<K, S>(events: S, deletes: bool) -> impl Stream<Item = Result<K, watcher::Error>>
where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
{
    events.filter_map(move |event| {
        futures::future::ready(match event {
            Ok(watcher::Event::Apply(o)) => Some(Ok(o)),
            Ok(watcher::Event::Delete(o)) if deletes => Some(Ok(o)),
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        })
    })
}

/// Calls `relisted` each time a (re)list is in the store: placed after the reflector,
/// which applies each event to its store before passing it on.
pub fn on_relisted<K, S>(
    events: S,
    mut relisted: impl FnMut() + Send,
) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>
where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
{
    events.inspect(move |event| {
        if matches!(event, Ok(watcher::Event::InitDone)) {
            relisted();
        }
    })
}

/// A watch (or reflector) stream that retries on its own [`WatchBackoff`] and logs each
/// failure instead of passing it on, for `Controller::watches_stream`. The watcher says
/// `Init` before each attempt to list; it is left out here (the reflector before has its
/// store already), or it would reset the backoff at every attempt of a list that keeps
/// failing (403 in a namespace), which then retried twice a second for ever. `access`
/// learns whether the API server lets this watch through.
pub fn retried<S, K>(
    watch: &'static str,
    stream: S,
    access: Arc<Access>,
) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static
where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    K: Send + 'static,
{
    let attempts = noted(stream, access)
        .filter(|item| futures::future::ready(!matches!(item, Ok(watcher::Event::Init))));
    StreamBackoff::new(attempts, WatchBackoff::default()).filter_map(move |item| {
        futures::future::ready(match item {
            Ok(item) => Some(Ok(item)),
            Err(error) => {
                failed(watch, &error);
                None
            }
        })
    })
}

/// Tells `access` what each attempt of a watch came to: a refusal, or something listed
/// or watched (for the providers' own watch, paced by kube-runtime's controller, alone;
/// [`retried`] does it for the others). `Init` starts every attempt to list, one that
/// will be refused too, so it tells nothing.
pub fn noted<K, S>(
    stream: S,
    access: Arc<Access>,
) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>
where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
{
    stream.inspect(move |item| match item {
        Ok(watcher::Event::Init) => {}
        Ok(_) => access.allowed(),
        Err(error) => access.failed(error),
    })
}

/// One log line per failed attempt of a watch; with the backoff, at most one per 5 s
/// per watch while the API server is away.
pub fn failed(watch: &str, error: &watcher::Error) {
    tracing::warn!(watch, %error, "watch failed; retrying");
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use futures::StreamExt;
    use kube::runtime::reflector::{self, ObjectRef};
    use kube::runtime::watcher::Event;

    use super::*;
    use crate::api::IncomingMailProvider;

    fn provider(name: &str, version: &str) -> IncomingMailProvider {
        let spec = serde_json::from_value(serde_json::json!({
            "server": {"host": "mail.example.com", "protocol": "IMAP"},
            "authentication": {"method": "None"},
        }))
        .unwrap();
        let mut p = IncomingMailProvider::new(name, spec);
        p.metadata.namespace = Some("team".into());
        p.metadata.resource_version = Some(version.into());
        p
    }

    #[tokio::test]
    async fn a_refused_list_is_noted_until_one_is_let_through() {
        let access = Arc::new(Access::default());
        let forbidden = kube::core::Status::failure("forbidden", "Forbidden").with_code(403);
        let refused = || {
            futures::stream::iter([
                Ok(Event::Init),
                Err(watcher::Error::InitialListFailed(kube::Error::Api(
                    Box::new(forbidden.clone()),
                ))),
                // The next attempt begins: no answer yet.
                Ok(Event::<IncomingMailProvider>::Init),
            ])
        };
        let _: Vec<_> = noted(refused(), access.clone()).collect().await;
        assert!(access.denied(Duration::ZERO).is_some());
        let listed =
            futures::stream::iter([Ok(Event::Init), Ok(Event::<IncomingMailProvider>::InitDone)]);
        let _: Vec<_> = noted(listed, access.clone()).collect().await;
        assert!(access.denied(Duration::ZERO).is_none());
    }

    /// A relist after a watch gap: `old` changed and `new` was created meanwhile. No
    /// trigger comes while the list's pages arrive (the store still holds the old copies
    /// then); once the list is in the store, the relisted callback sees it whole.
    #[tokio::test]
    async fn a_relist_triggers_once_its_objects_are_in_the_store() {
        let (store, writer) = reflector::store::<IncomingMailProvider>();
        let events = vec![
            Event::Init,
            Event::InitApply(provider("old", "1")),
            Event::InitDone,
            Event::Apply(provider("old", "2")),
            Event::Init,
            Event::InitApply(provider("old", "3")),
            Event::InitApply(provider("new", "4")),
            Event::InitDone,
            Event::Delete(provider("new", "5")),
        ];
        let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
        let relists = seen.clone();
        let reader = store.clone();
        let stream =
            reflector::reflector(writer, futures::stream::iter(events.into_iter().map(Ok)));
        let triggered: Vec<_> = changes(
            on_relisted(stream, move || {
                let mut versions: Vec<_> = reader
                    .state()
                    .iter()
                    .map(|p| {
                        format!(
                            "{}@{}",
                            p.metadata.name.clone().unwrap(),
                            p.metadata.resource_version.clone().unwrap()
                        )
                    })
                    .collect();
                versions.sort();
                relists.lock().unwrap().push(versions);
            }),
            false,
        )
        .map(|p| p.unwrap().metadata.resource_version.unwrap())
        .collect()
        .await;
        assert_eq!(
            triggered,
            ["2"],
            "only the watch's own change, not the listed ones"
        );
        assert_eq!(
            *seen.lock().unwrap(),
            [vec!["old@1"], vec!["new@4", "old@3"]],
            "each list whole in the store when it is done"
        );
        assert!(store.get(&ObjectRef::new("new").within("team")).is_none());
    }
}
