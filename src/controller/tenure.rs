//! How long the holder of the Lease may go on testing. The lease manager renews the Lease
//! and says when another replica holds it, but not when its renewals fail: it retries
//! them and logs. A leader cut off from the API server would go on testing after its
//! Lease expired and a standby took over, and both would log in to every mailbox. So the
//! holder reads the Lease itself once each renewal is due, and stops testing before the
//! Lease can expire unrenewed (as client-go's renew deadline does); it tests again once
//! it sees a renewal.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;

/// The Lease as this replica reads it.
enum Seen {
    /// Held by this replica, renewed at this time (the holder's clock, which is ours).
    Renewed(Timestamp),
    /// Held by another replica, or by none.
    NotOurs,
    /// Not read: the API server did not answer in time, or refused.
    Unknown,
}

#[derive(Clone)]
pub struct Tenure {
    api: Api<Lease>,
    name: String,
    identity: String,
    /// The Lease's duration, and how long before its expiry the lease manager renews it.
    duration: Duration,
    grace: Duration,
}

impl Tenure {
    pub fn new(
        api: Api<Lease>,
        name: &str,
        identity: &str,
        duration: Duration,
        grace: Duration,
    ) -> Self {
        Tenure {
            api,
            name: name.to_string(),
            identity: identity.to_string(),
            duration,
            grace,
        }
    }

    /// Reads the Lease, waiting at most `within` for the answer.
    async fn read(&self, within: Duration) -> Seen {
        let lease = match tokio::time::timeout(within, self.api.get_opt(&self.name)).await {
            Ok(Ok(lease)) => lease,
            _ => return Seen::Unknown,
        };
        let spec = lease.and_then(|l| l.spec).unwrap_or_default();
        match (spec.holder_identity, spec.renew_time) {
            (Some(holder), Some(renewed)) if holder == self.identity => Seen::Renewed(renewed.0),
            _ => Seen::NotOurs,
        }
    }

    /// Waits until the Lease is seen held by this replica and renewed recently enough to
    /// test; returns when it was renewed.
    pub async fn confirmed(&self) -> Timestamp {
        loop {
            // As long as the lease manager's own renewal may take: an API server slow to
            // answer (seconds, under load) must not keep a replica whose Lease is renewed
            // from testing.
            if let Seen::Renewed(at) = self.read(self.grace).await
                && Timestamp::now() < stop_at(at, self.duration, self.grace)
            {
                return at;
            }
            tokio::time::sleep(self.look_again()).await;
        }
    }

    /// Resolves when this replica can no longer be sure it holds the Lease: the Lease was
    /// not seen renewed by [`stop_at`], or another replica holds it. `renewed` is when it
    /// was last seen renewed.
    pub async fn lapsed(&self, mut renewed: Timestamp) {
        loop {
            sleep_until(look_at(renewed, self.duration, self.grace)).await;
            let stop = stop_at(renewed, self.duration, self.grace);
            loop {
                let left =
                    Duration::try_from(Timestamp::now().duration_until(stop)).unwrap_or_default();
                if left.is_zero() {
                    return;
                }
                // Until the stop, not less: a slow answer that says the Lease was renewed
                // keeps the tests going, and none may run past the stop.
                match self.read(left).await {
                    Seen::Renewed(at) if at > renewed => {
                        renewed = at;
                        break;
                    }
                    Seen::NotOurs => return,
                    Seen::Renewed(_) | Seen::Unknown => {
                        let pause = Timestamp::now().duration_until(stop);
                        let pause = Duration::try_from(pause).unwrap_or_default();
                        tokio::time::sleep(pause.min(self.grace / 8)).await;
                    }
                }
            }
        }
    }
}

impl Tenure {
    /// Creates the Lease again after a `kubectl delete lease`: the lease manager creates
    /// it only when it starts, and without it no replica would test again until one
    /// restarted. Called when the lease manager finds it gone.
    pub async fn recreate(&self) {
        let lease = Lease {
            metadata: kube::api::ObjectMeta {
                name: Some(self.name.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        match self.api.create(&Default::default(), &lease).await {
            Ok(_) => tracing::warn!(lease = %self.name, "the lease was deleted: created it again"),
            Err(error) => {
                tracing::warn!(lease = %self.name, %error, "the lease was deleted, and could not be created again")
            }
        }
    }

    /// The wait before reading the Lease again while it is not seen renewed.
    fn look_again(&self) -> Duration {
        (self.grace / 4).max(Duration::from_millis(250))
    }
}

fn after(t: Timestamp, d: Duration) -> Timestamp {
    t.checked_add(SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX))
        .unwrap_or(Timestamp::MAX)
}

fn before(t: Timestamp, d: Duration) -> Timestamp {
    t.checked_sub(SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX))
        .unwrap_or(Timestamp::MIN)
}

/// When a holder whose Lease was renewed at `renewed` stops testing unless it has seen a
/// renewal since: a quarter of the grace before the Lease expires, so that its tests end
/// before a standby may take the Lease, and the renewal (due `grace` before expiry) has
/// three quarters of the grace to land and be seen.
fn stop_at(renewed: Timestamp, duration: Duration, grace: Duration) -> Timestamp {
    before(after(renewed, duration), grace / 4)
}

/// When to look for the next renewal: a quarter of the grace after the lease manager
/// renews (`grace` before expiry); until [`stop_at`] it looks again every eighth.
fn look_at(renewed: Timestamp, duration: Duration, grace: Duration) -> Timestamp {
    after(before(after(renewed, duration), grace), grace / 4)
}

async fn sleep_until(t: Timestamp) {
    let wait = Timestamp::now().duration_until(t);
    if let Ok(wait) = Duration::try_from(wait) {
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64, millis: i64) -> Timestamp {
        Timestamp::from_millisecond(1_800_000_000_000 + secs * 1000 + millis).unwrap()
    }

    #[test]
    fn the_holder_stops_before_its_lease_expires_and_looks_after_the_renewal() {
        // The chart's 15 s Lease, renewed 7 s before it expires.
        let (duration, grace) = (Duration::from_secs(15), Duration::from_secs(7));
        let renewed = at(0, 0);
        // Renewal due at 8 s; looked for at 9.75 s; testing stops at 13.25 s, 1.75 s
        // before a standby may take the expired Lease at 15 s.
        assert_eq!(look_at(renewed, duration, grace), at(9, 750));
        assert_eq!(stop_at(renewed, duration, grace), at(13, 250));
        // The tests' 6 s Lease, renewed 3 s before it expires: 2.25 s for a renewal to
        // land and be seen.
        let (duration, grace) = (Duration::from_secs(6), Duration::from_secs(3));
        assert_eq!(look_at(renewed, duration, grace), at(3, 750));
        assert_eq!(stop_at(renewed, duration, grace), at(5, 250));
    }
}
