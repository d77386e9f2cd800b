//! Whether the API server lets the controller watch a scope's Secrets (or ConfigMaps).
//! A list or watch refused with 403 (a Role or RoleBinding missing in one namespace) is
//! noted here, so that the providers there say so in their status (`AccessDenied`)
//! instead of keeping an old verdict while nobody tests them; whatever the watch yields
//! next clears it.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use kube::runtime::watcher;

#[derive(Default)]
pub struct Access {
    denied: Mutex<Option<Denied>>,
}

struct Denied {
    since: Instant,
    message: String,
}

impl Access {
    /// Notes a failed attempt of the watch; only a refusal (403) counts.
    pub fn failed(&self, error: &watcher::Error) {
        let Some(message) = forbidden(error) else {
            return;
        };
        let mut denied = self.denied.lock().unwrap();
        match denied.as_mut() {
            // Since the first refusal in a row; the latest words.
            Some(d) => d.message = message,
            None => {
                *denied = Some(Denied {
                    since: Instant::now(),
                    message,
                })
            }
        }
    }

    /// The watch yielded: it is allowed.
    pub fn allowed(&self) {
        *self.denied.lock().unwrap() = None;
    }

    /// The API server's words, if it has refused the watch for at least `for_at_least`
    /// (shorter refusals are a RoleBinding being created with the controller, say).
    pub fn denied(&self, for_at_least: Duration) -> Option<String> {
        let denied = self.denied.lock().unwrap();
        denied
            .as_ref()
            .filter(|d| d.since.elapsed() >= for_at_least)
            .map(|d| d.message.clone())
    }
}

/// The API server's words when it refused the controller a request (403).
pub fn refusal(error: &kube::Error) -> Option<&str> {
    match error {
        kube::Error::Api(s) if s.code == 403 => Some(&s.message),
        _ => None,
    }
}

/// The message of a 403, from whichever step of the watch it came.
fn forbidden(error: &watcher::Error) -> Option<String> {
    match error {
        watcher::Error::InitialListFailed(e)
        | watcher::Error::WatchStartFailed(e)
        | watcher::Error::WatchFailed(e) => refusal(e).map(str::to_string),
        watcher::Error::WatchError(s) if s.code == 403 => Some(s.message.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(code: u16) -> watcher::Error {
        let status = kube::core::Status::failure("secrets is forbidden: User \"system:serviceaccount:ops:mailroom\" cannot list resource \"secrets\" in API group \"\" in the namespace \"team-b\"", "Forbidden")
            .with_code(code);
        watcher::Error::InitialListFailed(kube::Error::Api(Box::new(status)))
    }

    #[test]
    fn a_refusal_counts_once_it_lasts_and_until_the_watch_yields() {
        let access = Access::default();
        access.failed(&refused(403));
        assert!(
            access.denied(Duration::from_secs(60)).is_none(),
            "too recent"
        );
        let message = access.denied(Duration::ZERO).expect("refused");
        assert!(
            message.contains("cannot list resource \"secrets\""),
            "{message}"
        );
        access.allowed();
        assert!(access.denied(Duration::ZERO).is_none());
    }

    #[test]
    fn only_a_refusal_is_a_denial() {
        let access = Access::default();
        // The API server away, or a 500: not the controller's rights.
        access.failed(&refused(500));
        access.failed(&watcher::Error::NoResourceVersion);
        assert!(access.denied(Duration::ZERO).is_none());
    }
}
