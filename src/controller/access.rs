//! Whether the API server lets the controller watch a scope's Secrets (or ConfigMaps).
//! A list or watch refused with 403 (a Role or RoleBinding missing in one namespace) is
//! noted here, so that the providers there say so in their status (`AccessDenied`)
//! instead of keeping an old verdict while nobody tests them; whatever the watch yields
//! next clears it, and so does a refusal not repeated for [`REFUSAL_LASTS`].

use std::sync::Mutex;
use std::time::{Duration, Instant};

use kube::runtime::watcher;

use super::schedule::WATCH_RETRY_CAP;

/// How long a refusal stands without another. A refused watch is tried again at least
/// every [`WATCH_RETRY_CAP`], each try refused anew while the refusal lasts; one given back
/// its rights after it had listed is resumed from where it was and yields nothing until
/// something in its scope changes, so without this a quiet namespace stayed counted
/// refused (and its providers `AccessDenied`) for as long as nothing changed there.
pub const REFUSAL_LASTS: Duration = WATCH_RETRY_CAP.saturating_mul(6);

#[derive(Default)]
pub struct Access {
    denied: Mutex<Option<Denied>>,
}

struct Denied {
    since: Instant,
    last: Instant,
    message: String,
}

impl Access {
    /// Notes a failed attempt of the watch; only a refusal (403) counts.
    pub fn failed(&self, error: &watcher::Error) {
        self.failed_at(error, Instant::now())
    }

    fn failed_at(&self, error: &watcher::Error, now: Instant) {
        let Some(message) = forbidden(error) else {
            return;
        };
        let mut denied = self.denied.lock().unwrap();
        match denied.as_mut() {
            // Since the first refusal in a row; the latest words.
            Some(d) if standing(d, now) => {
                d.last = now;
                d.message = message;
            }
            _ => {
                *denied = Some(Denied {
                    since: now,
                    last: now,
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
        self.denied_at(for_at_least, Instant::now())
    }

    fn denied_at(&self, for_at_least: Duration, now: Instant) -> Option<String> {
        let denied = self.denied.lock().unwrap();
        denied
            .as_ref()
            .filter(|d| standing(d, now) && now.saturating_duration_since(d.since) >= for_at_least)
            .map(|d| d.message.clone())
    }
}

/// Whether a refusal still stands: see [`REFUSAL_LASTS`].
fn standing(denied: &Denied, now: Instant) -> bool {
    now.saturating_duration_since(denied.last) < REFUSAL_LASTS
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

    /// A watch that had listed, refused (its RoleBinding gone), then let through again
    /// yields nothing until something changes; the refusal ends once it is not repeated.
    #[test]
    fn a_refusal_not_repeated_is_over() {
        let access = Access::default();
        let start = Instant::now();
        // Refused every retry for a minute: it stands, counted from the first.
        for s in (0..=60).step_by(5) {
            access.failed_at(&refused(403), start + Duration::from_secs(s));
        }
        let minute = start + Duration::from_secs(60);
        assert!(access.denied_at(Duration::from_secs(60), minute).is_some());
        assert!(
            access
                .denied_at(
                    Duration::ZERO,
                    minute + REFUSAL_LASTS - Duration::from_secs(1)
                )
                .is_some(),
            "between retries"
        );
        // Let through, silently: no more refusals.
        let after = minute + REFUSAL_LASTS;
        assert!(access.denied_at(Duration::ZERO, after).is_none());
        // Refused again later: a new refusal, counted from then.
        access.failed_at(&refused(403), after);
        assert!(access.denied_at(Duration::from_secs(1), after).is_none());
        assert!(access.denied_at(Duration::ZERO, after).is_some());
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
