//! When the next test is due: pure functions of durations and counts, with randomness
//! passed in, so schedules are tested without sleeping.

use std::time::Duration;

/// The first retry after a failure; doubles per failure, never past the interval.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(10);

/// A source of uniform numbers in [0, 1), for jitter.
pub trait Jitter: Send + Sync {
    fn unit(&self) -> f64;
}

/// Jitter from the thread's random generator.
pub struct RandomJitter;

impl Jitter for RandomJitter {
    fn unit(&self) -> f64 {
        rand::random::<f64>()
    }
}

/// The wait after a test. A success waits the interval plus up to 10% (at most 30s), so
/// tests of one provider are never closer than the interval and heartbeats never exceed
/// one per interval, while providers applied together drift apart. A failure waits
/// 10s, 20s, 40s, ... (± 10%), never more than the interval.
pub fn next_wait(interval: Duration, consecutive_failures: u32, jitter: &dyn Jitter) -> Duration {
    if consecutive_failures == 0 {
        let spread = (interval / 10).min(Duration::from_secs(30));
        return interval + spread.mul_f64(jitter.unit());
    }
    let exp = consecutive_failures.saturating_sub(1).min(16);
    let base = FIRST_BACKOFF.saturating_mul(1 << exp).min(interval);
    let factor = 0.9 + 0.2 * jitter.unit();
    base.mul_f64(factor).min(interval)
}

/// The first retry of a failed watch; doubles per failure up to [`WATCH_RETRY_CAP`].
pub const WATCH_RETRY_FIRST: Duration = Duration::from_millis(500);
/// The longest wait between two attempts of one watch. Short, so that a control plane
/// back from an outage is seen within seconds; each watch then costs the API server one
/// request per 5 s while it is down, and only the leader watches.
pub const WATCH_RETRY_CAP: Duration = Duration::from_secs(5);

/// The wait before attempt `failures + 1` of a watch that failed `failures` times in a
/// row: 0.5 s, 1 s, 2 s, 4 s, then 5 s, each shortened by up to half at random so that
/// the replicas and watches that failed together do not retry together.
pub fn watch_retry(failures: u32, jitter: &dyn Jitter) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    let base = WATCH_RETRY_FIRST
        .saturating_mul(1 << exp)
        .min(WATCH_RETRY_CAP);
    base.mul_f64(1.0 - 0.5 * jitter.unit())
}

/// Whether a heartbeat write (only lastCheckTime changed) is due: at most one per
/// interval, so an unchanged provider costs the API server one write per interval.
pub fn heartbeat_due(since_last_write: Duration, interval: Duration) -> bool {
    since_last_write >= interval
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(f64);
    impl Jitter for Fixed {
        fn unit(&self) -> f64 {
            self.0
        }
    }

    const FIVE_MIN: Duration = Duration::from_secs(300);

    #[test]
    fn success_waits_at_least_the_interval_and_at_most_ten_percent_more() {
        assert_eq!(next_wait(FIVE_MIN, 0, &Fixed(0.0)), FIVE_MIN);
        assert_eq!(next_wait(FIVE_MIN, 0, &Fixed(0.999_999)).as_secs(), 329);
        let hour = Duration::from_secs(3600);
        assert!(next_wait(hour, 0, &Fixed(0.999)) <= hour + Duration::from_secs(30));
    }

    #[test]
    fn failures_back_off_from_ten_seconds_doubling_up_to_the_interval() {
        let mid = Fixed(0.5);
        let waits: Vec<u64> = (1..=7)
            .map(|n| next_wait(FIVE_MIN, n, &mid).as_secs())
            .collect();
        assert_eq!(waits, vec![10, 20, 40, 80, 160, 300, 300]);
        assert!(next_wait(FIVE_MIN, 1, &Fixed(0.0)) >= Duration::from_secs(9));
        assert!(next_wait(FIVE_MIN, 1, &Fixed(0.999)) <= Duration::from_secs(11));
        assert!(next_wait(FIVE_MIN, u32::MAX, &Fixed(0.999)) <= FIVE_MIN);
    }

    #[test]
    fn backoff_never_exceeds_a_short_interval() {
        let thirty = Duration::from_secs(30);
        for n in 1..10 {
            assert!(next_wait(thirty, n, &Fixed(0.999)) <= thirty);
        }
    }

    #[test]
    fn a_failed_watch_retries_from_half_a_second_doubling_up_to_five() {
        let none = Fixed(0.0);
        let waits: Vec<u128> = (1..=6).map(|n| watch_retry(n, &none).as_millis()).collect();
        assert_eq!(waits, vec![500, 1000, 2000, 4000, 5000, 5000]);
        assert_eq!(watch_retry(0, &none), WATCH_RETRY_FIRST);
        assert_eq!(watch_retry(u32::MAX, &none), WATCH_RETRY_CAP);
        let most = Fixed(0.999_999);
        assert!(watch_retry(5, &most) >= WATCH_RETRY_CAP / 2);
        assert!(watch_retry(1, &most) >= WATCH_RETRY_FIRST / 2);
    }

    #[test]
    fn heartbeat_once_per_interval() {
        assert!(!heartbeat_due(Duration::from_secs(299), FIVE_MIN));
        assert!(heartbeat_due(FIVE_MIN, FIVE_MIN));
    }
}

/// Why a test runs now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// Never tested (or the controller has no record and the status has none).
    First,
    /// The spec's generation moved past the one last tested.
    SpecChanged,
    /// A new value of the check-requested-at annotation.
    Requested,
    /// A referenced Secret or ConfigMap changed, appeared or went away.
    ReferencesChanged,
    /// The interval (or backoff) elapsed.
    Scheduled,
    /// Its Secrets could not be read (AccessDenied) and now can.
    AccessRestored,
    /// Its status was replaced after this replica's last write by one of another
    /// generation (a shard it moved from, writing late).
    StatusReplaced,
    /// Its status says Checking, and this replica runs no test of it: the one that wrote
    /// it stopped during the test (killed, or its Lease lost).
    Interrupted,
}

impl Why {
    pub fn as_str(self) -> &'static str {
        match self {
            Why::First => "first test",
            Why::SpecChanged => "spec changed",
            Why::Requested => "test requested",
            Why::ReferencesChanged => "referenced object changed",
            Why::Scheduled => "scheduled",
            Why::AccessRestored => "its Secrets can be read again",
            Why::StatusReplaced => "status replaced by another writer",
            Why::Interrupted => "a test under way was interrupted",
        }
    }
}

/// What the controller remembers of a provider between tests.
#[derive(Clone, Debug, PartialEq)]
pub struct Memory {
    /// The object it was of: a provider deleted and created again under its name is
    /// another object, with a schedule of its own.
    pub uid: Option<String>,
    pub generation: Option<i64>,
    pub request: Option<String>,
    pub references: u64,
    pub next_due: k8s_openapi::jiff::Timestamp,
    /// When this replica's last test of it finished, written or not (an unchanged
    /// result within the interval is not written): what its schedule counts from.
    pub tested: Option<k8s_openapi::jiff::Timestamp>,
    /// This replica's last write of a test's result into its status.
    pub written: Option<Written>,
}

/// A status write of a test's result: the lastCheckTime it wrote, what tells it from
/// another written within the same second (see [`mark`]), and when.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Written {
    pub last_check: k8s_openapi::jiff::Timestamp,
    pub generation: Option<i64>,
    pub mark: u64,
    pub at: tokio::time::Instant,
}

impl Written {
    pub fn of(status: &crate::api::IncomingMailProviderStatus, at: tokio::time::Instant) -> Self {
        Written {
            last_check: status
                .last_check_time
                .as_ref()
                .map_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH, |t| t.0),
            generation: status.observed_generation,
            mark: mark(status),
            at,
        }
    }
}

/// What tells two results written within one second apart (lastCheckTime is stored in
/// whole seconds): the generation and request answered, the failures counted, Ready.
pub fn mark(status: &crate::api::IncomingMailProviderStatus) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    status.observed_generation.hash(&mut h);
    status.last_handled_check_request.hash(&mut h);
    status.consecutive_failures.hash(&mut h);
    super::status::ready(Some(status))
        .map(|c| (&c.status, &c.reason))
        .hash(&mut h);
    h.finish()
}

/// When `status` was checked, by the second (as lastCheckTime is stored), against this
/// replica's last write `w`; None for a status without a lastCheckTime.
fn against(
    status: &crate::api::IncomingMailProviderStatus,
    w: &Written,
) -> Option<std::cmp::Ordering> {
    let shown = status.last_check_time.as_ref()?;
    Some(shown.0.as_second().cmp(&w.last_check.as_second()))
}

/// The longest the controller waits for its cache to show its own last status write of a
/// provider (see [`behind_own_write`]).
pub const OWN_WRITE_LAG: Duration = Duration::from_secs(5);

/// Whether `status` came after this replica's last write `w` (by lastCheckTime) and is of
/// another generation: written by someone else since, with an older spec's result (the
/// shard a provider moved from, its test ending late). Not a status the cache has not
/// caught up with (older), nor one cleared by hand (no lastCheckTime).
fn replaced(w: &Written, status: Option<&crate::api::IncomingMailProviderStatus>) -> bool {
    status.is_some_and(|s| {
        against(s, w).is_some_and(|o| o.is_ge()) && s.observed_generation != w.generation
    })
}

/// Whether `status`, the cache's, is older than this replica's last write of it (the
/// watch that brings the write lags): a status built on it, or a decision taken from it,
/// would miss that result (a failure not counted, a change announced twice). Not past
/// [`OWN_WRITE_LAG`] after the write: a status someone else cleared or replaced must not
/// hold the provider up. Compared by the second, as lastCheckTime is stored, and within
/// one second by [`mark`].
pub fn behind_own_write(
    written: Option<&Written>,
    status: Option<&crate::api::IncomingMailProviderStatus>,
    now: tokio::time::Instant,
) -> bool {
    let Some(w) = written else {
        return false;
    };
    if now.saturating_duration_since(w.at) >= OWN_WRITE_LAG {
        return false;
    }
    let Some(status) = status else {
        return true;
    };
    match against(status, w) {
        None | Some(std::cmp::Ordering::Less) => true,
        Some(std::cmp::Ordering::Equal) => mark(status) != w.mark,
        Some(std::cmp::Ordering::Greater) => false,
    }
}

/// The jitter at its most: the longest wait.
pub struct Longest;

impl Jitter for Longest {
    fn unit(&self) -> f64 {
        1.0
    }
}

/// What the provider looks like now.
pub struct Seen<'a> {
    pub generation: Option<i64>,
    pub request: Option<&'a str>,
    pub references: u64,
    /// What became of the referenced objects while no replica watched them; read only
    /// for a provider this replica has no memory of (see `reconcile`).
    pub unwatched: Unwatched,
    pub status: Option<&'a crate::api::IncomingMailProviderStatus>,
    pub interval: Duration,
    pub now: k8s_openapi::jiff::Timestamp,
}

/// The referenced objects (the OAuth2 token Secret, the controller's own writes, aside)
/// as a restarted controller finds them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Unwatched {
    /// When one was last created or changed, by the API server's clock.
    pub changed: Option<k8s_openapi::jiff::Timestamp>,
    /// Whether one does not exist (a deletion leaves no time).
    pub missing: bool,
}

/// Test now (and why), or wait this long. Memory wins over status (the status in the
/// cache may lag behind our own last write); status alone is used after a restart, so a
/// restarted controller resumes each provider's schedule instead of testing all at once.
pub fn decide(memory: Option<&Memory>, seen: &Seen, jitter: &dyn Jitter) -> Result<Duration, Why> {
    // No wait is longer than a success's (the interval and its jitter): a due time
    // further off than that was set by a clock since stepped back, and would delay the
    // test by the whole step.
    let longest = next_wait(seen.interval, 0, &Longest);
    let until = |due: k8s_openapi::jiff::Timestamp| -> Result<Duration, Why> {
        let left = seen.now.duration_until(due);
        if left.is_positive() {
            Ok(Duration::try_from(left).unwrap_or_default().min(longest))
        } else {
            Err(Why::Scheduled)
        }
    };
    let requested = |handled: Option<&str>| seen.request.is_some() && seen.request != handled;
    if let Some(m) = memory {
        if m.generation != seen.generation {
            return Err(Why::SpecChanged);
        }
        if requested(m.request.as_deref()) {
            return Err(Why::Requested);
        }
        if m.references != seen.references {
            return Err(Why::ReferencesChanged);
        }
        if m.written.is_some_and(|w| replaced(&w, seen.status)) {
            return Err(Why::StatusReplaced);
        }
        return until(m.next_due);
    }
    let Some(status) = seen.status else {
        return Err(Why::First);
    };
    let Some(last) = &status.last_check_time else {
        return Err(Why::First);
    };
    if status.observed_generation != seen.generation {
        return Err(Why::SpecChanged);
    }
    if requested(status.last_handled_check_request.as_deref()) {
        return Err(Why::Requested);
    }
    // Changed while no replica watched it (a restart, a failover, a rollout): tested now,
    // as a change the watch saw would be, not at the end of the interval or backoff. Both
    // times are whole seconds, and a change in the second of the test does not count: a
    // provider applied with its Secret is first tested in that second, and would be
    // tested again at every failover until its next test.
    if seen.unwatched.changed.is_some_and(|t| t > last.0) {
        return Err(Why::ReferencesChanged);
    }
    let reason = super::status::ready(Some(status)).map(|c| c.reason.as_str());
    // Checking stays until a result replaces it: none would come before the interval.
    if reason == Some(crate::api::Reason::Checking.as_str()) {
        return Err(Why::Interrupted);
    }
    // Deleted meanwhile: the last verdict did not miss it.
    if seen.unwatched.missing && reason != Some(crate::api::Reason::SecretNotFound.as_str()) {
        return Err(Why::ReferencesChanged);
    }
    // Not tested while its Secrets could not be read: due as soon as they can (the
    // reconcile does not get here while they cannot).
    if super::status::ready(Some(status))
        .is_some_and(|c| c.reason == crate::api::Reason::AccessDenied.as_str())
    {
        return Err(Why::AccessRestored);
    }
    let failures = u32::try_from(status.consecutive_failures).unwrap_or(0);
    let wait = next_wait(seen.interval, failures, jitter);
    // Written by a replica whose clock is ahead of ours: counted from now, so the skew
    // does not lengthen the wait.
    let last = last.0.min(seen.now);
    let due = last
        .checked_add(k8s_openapi::jiff::SignedDuration::try_from(wait).unwrap_or_default())
        .unwrap_or(seen.now);
    until(due)
}

#[cfg(test)]
mod decide_tests {
    use super::*;
    use crate::api::IncomingMailProviderStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::{SignedDuration, Timestamp};

    struct Zero;
    impl Jitter for Zero {
        fn unit(&self) -> f64 {
            0.0
        }
    }

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn seen<'a>(status: Option<&'a IncomingMailProviderStatus>, now: i64) -> Seen<'a> {
        Seen {
            generation: Some(1),
            request: None,
            references: 7,
            unwatched: Unwatched::default(),
            status,
            interval: Duration::from_secs(300),
            now: at(now),
        }
    }

    fn memory(next_due: i64) -> Memory {
        Memory {
            written: None,
            tested: None,
            uid: None,
            generation: Some(1),
            request: None,
            references: 7,
            next_due: at(next_due),
        }
    }

    #[test]
    fn a_new_provider_is_tested_at_once() {
        assert_eq!(decide(None, &seen(None, 0), &Zero), Err(Why::First));
    }

    #[test]
    fn memory_schedules_and_notices_changes() {
        let m = memory(100);
        assert_eq!(
            decide(Some(&m), &seen(None, 40), &Zero),
            Ok(Duration::from_secs(60))
        );
        assert_eq!(
            decide(Some(&m), &seen(None, 100), &Zero),
            Err(Why::Scheduled)
        );
        let mut s = seen(None, 40);
        s.generation = Some(2);
        assert_eq!(decide(Some(&m), &s, &Zero), Err(Why::SpecChanged));
        let mut s = seen(None, 40);
        s.references = 8;
        assert_eq!(decide(Some(&m), &s, &Zero), Err(Why::ReferencesChanged));
        let mut s = seen(None, 40);
        s.request = Some("now");
        assert_eq!(decide(Some(&m), &s, &Zero), Err(Why::Requested));
        let handled = Memory {
            tested: None,
            uid: None,
            request: Some("now".into()),
            ..m
        };
        assert_eq!(
            decide(Some(&handled), &s, &Zero),
            Ok(Duration::from_secs(60))
        );
    }

    #[test]
    fn a_checking_left_by_a_replica_that_stopped_is_tested_at_once() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
        let status = IncomingMailProviderStatus {
            observed_generation: Some(1),
            last_check_time: Some(Time(at(0))),
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: "Unknown".into(),
                reason: "Checking".into(),
                message: "the first test is running".into(),
                last_transition_time: Time(at(0)),
                observed_generation: Some(1),
            }],
            ..Default::default()
        };
        assert_eq!(
            decide(None, &seen(Some(&status), 10), &Zero),
            Err(Why::Interrupted)
        );
    }

    #[test]
    fn after_a_restart_the_schedule_resumes_from_the_status() {
        let status = IncomingMailProviderStatus {
            observed_generation: Some(1),
            last_check_time: Some(Time(at(0))),
            ..Default::default()
        };
        assert_eq!(
            decide(None, &seen(Some(&status), 200), &Zero),
            Ok(Duration::from_secs(100))
        );
        assert_eq!(
            decide(None, &seen(Some(&status), 300), &Zero),
            Err(Why::Scheduled)
        );
        let failing = IncomingMailProviderStatus {
            consecutive_failures: 1,
            ..status.clone()
        };
        assert_eq!(
            decide(None, &seen(Some(&failing), 5), &Zero),
            Ok(Duration::from_secs(4))
        );
        let old_gen = IncomingMailProviderStatus {
            observed_generation: Some(0),
            ..status
        };
        assert_eq!(
            decide(None, &seen(Some(&old_gen), 5), &Zero),
            Err(Why::SpecChanged)
        );
        let _ = SignedDuration::ZERO;
    }

    /// After a restart, a Secret or ConfigMap changed since the last test (while no
    /// replica watched) makes the provider due at once; one changed before it does not.
    #[test]
    fn after_a_restart_a_reference_changed_since_the_last_test_is_tested_at_once() {
        let status = IncomingMailProviderStatus {
            observed_generation: Some(1),
            last_check_time: Some(Time(at(0))),
            ..Default::default()
        };
        let changed = |t: i64| Seen {
            unwatched: Unwatched {
                changed: Some(at(t)),
                missing: false,
            },
            ..seen(Some(&status), 60)
        };
        assert_eq!(
            decide(None, &changed(30), &Zero),
            Err(Why::ReferencesChanged)
        );
        assert_eq!(
            decide(None, &changed(-30), &Zero),
            Ok(Duration::from_secs(240))
        );
        // In the second of the test: taken as tested (a provider applied with its Secret).
        assert_eq!(
            decide(None, &changed(0), &Zero),
            Ok(Duration::from_secs(240))
        );
        // With memory, the fingerprint decides: the watch saw every change.
        let m = memory(100);
        assert_eq!(
            decide(Some(&m), &changed(30), &Zero),
            Ok(Duration::from_secs(40))
        );
    }

    /// After a restart, a referenced object gone since the last verdict makes the
    /// provider due at once, unless that verdict already said it was missing.
    #[test]
    fn after_a_restart_a_reference_deleted_since_the_last_test_is_tested_at_once() {
        let with_reason = |reason: &str| IncomingMailProviderStatus {
            observed_generation: Some(1),
            last_check_time: Some(Time(at(0))),
            conditions: vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
                type_: "Ready".into(),
                status: "False".into(),
                reason: reason.into(),
                message: String::new(),
                observed_generation: Some(1),
                last_transition_time: Time(at(0)),
            }],
            ..Default::default()
        };
        let (connected, not_found) = (with_reason("Connected"), with_reason("SecretNotFound"));
        let missing = |status| Seen {
            unwatched: Unwatched {
                changed: None,
                missing: true,
            },
            ..seen(Some(status), 60)
        };
        assert_eq!(
            decide(None, &missing(&connected), &Zero),
            Err(Why::ReferencesChanged)
        );
        assert_eq!(
            decide(None, &missing(&not_found), &Zero),
            Ok(Duration::from_secs(240))
        );
    }

    /// A provider that said AccessDenied was not tested: once the reconcile gets this far
    /// (its Secrets can be read), it is tested at once, not after its backoff.
    #[test]
    fn a_provider_whose_secrets_could_not_be_read_is_tested_once_they_can() {
        let denied = IncomingMailProviderStatus {
            observed_generation: Some(1),
            last_check_time: Some(Time(at(0))),
            consecutive_failures: 4,
            conditions: vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
                type_: "Ready".into(),
                status: "False".into(),
                reason: "AccessDenied".into(),
                message: String::new(),
                observed_generation: Some(1),
                last_transition_time: Time(at(0)),
            }],
            ..Default::default()
        };
        assert_eq!(
            decide(None, &seen(Some(&denied), 1), &Zero),
            Err(Why::AccessRestored)
        );
        // Tested since: the memory of that test decides.
        assert_eq!(
            decide(Some(&memory(300)), &seen(Some(&denied), 1), &Zero),
            Ok(Duration::from_secs(299))
        );
    }

    /// A lastCheckTime from a replica whose clock is 60 s ahead counts from now: the next
    /// test is an interval away, not an interval and the skew.
    #[test]
    fn a_last_check_from_a_clock_ahead_counts_from_now() {
        let status = IncomingMailProviderStatus {
            observed_generation: Some(1),
            last_check_time: Some(Time(at(60))),
            ..Default::default()
        };
        assert_eq!(
            decide(None, &seen(Some(&status), 0), &Zero),
            Ok(Duration::from_secs(300))
        );
    }

    /// The replica's own clock stepped back an hour after a test (an NTP step, a VM
    /// resumed): the wait it remembers is no longer than the interval and its jitter.
    #[test]
    fn a_clock_stepped_back_does_not_stretch_the_wait_past_the_interval() {
        let wait = decide(Some(&memory(300)), &seen(None, -3600), &Zero);
        assert_eq!(wait, Ok(Duration::from_secs(330)));
    }

    #[test]
    fn a_status_of_another_generation_written_after_the_own_is_tested_again() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        let status = |secs: i64, generation: i64| IncomingMailProviderStatus {
            last_check_time: Some(Time(at(secs))),
            observed_generation: Some(generation),
            ..Default::default()
        };
        let mut m = memory(300);
        m.generation = Some(2);
        m.written = Some(Written::of(&status(10, 2), tokio::time::Instant::now()));
        let mut s = seen(None, 40);
        s.generation = Some(2);
        let replaced = status(12, 1);
        s.status = Some(&replaced);
        assert_eq!(decide(Some(&m), &s, &Zero), Err(Why::StatusReplaced));
        // The cache not caught up with the own write, the own write itself, one cleared
        // by hand: none of these.
        let others = [
            status(8, 1),
            status(10, 2),
            IncomingMailProviderStatus::default(),
        ];
        for shown in &others {
            s.status = Some(shown);
            assert_eq!(
                decide(Some(&m), &s, &Zero),
                Ok(Duration::from_secs(260)),
                "{shown:?}"
            );
        }
    }

    #[test]
    fn a_cache_is_behind_the_own_write_until_it_shows_it_or_a_few_seconds_pass() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        let checked = |secs: i64| IncomingMailProviderStatus {
            last_check_time: Some(Time(at(secs))),
            ..Default::default()
        };
        let now = tokio::time::Instant::now();
        // Written with a lastCheckTime of 10.6 s, which the API server keeps as 10 s, and
        // a second failure.
        let mut written = checked(10);
        written.last_check_time = Some(Time(
            at(10) + k8s_openapi::jiff::SignedDuration::from_millis(600),
        ));
        written.consecutive_failures = 2;
        let w = Written::of(&written, now);
        let mut shown = checked(10);
        shown.consecutive_failures = 2;
        assert!(behind_own_write(Some(&w), Some(&checked(-290)), now));
        assert!(behind_own_write(Some(&w), None, now), "no status yet");
        assert!(!behind_own_write(Some(&w), Some(&shown), now), "shown");
        // Another result of ours within the same second (the first failure) is not it.
        let mut earlier = checked(10);
        earlier.consecutive_failures = 1;
        assert!(behind_own_write(Some(&w), Some(&earlier), now));
        assert!(
            !behind_own_write(Some(&w), Some(&checked(70)), now),
            "and more"
        );
        assert!(
            !behind_own_write(None, Some(&checked(-290)), now),
            "none written"
        );
        let later = now + OWN_WRITE_LAG;
        assert!(
            !behind_own_write(Some(&w), Some(&checked(-290)), later),
            "not waited for past the bound"
        );
    }
}
