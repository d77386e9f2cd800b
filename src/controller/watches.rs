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
    let attempts =
        stream.filter(|item| futures::future::ready(!matches!(item, Ok(watcher::Event::Init))));
    StreamBackoff::new(attempts, WatchBackoff::default()).filter_map(move |item| {
        futures::future::ready(match item {
            Ok(item) => {
                access.allowed();
                Some(Ok(item))
            }
            Err(error) => {
                access.failed(&error);
                failed(watch, &error);
                None
            }
        })
    })
}

/// One log line per failed attempt of a watch; with the backoff, at most one per 5 s
/// per watch while the API server is away.
pub fn failed(watch: &str, error: &watcher::Error) {
    tracing::warn!(watch, %error, "watch failed; retrying");
}
