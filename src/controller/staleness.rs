//! Overdue providers: those whose last test is older than their schedule allows, so that
//! their status is going stale. Counted from the stored statuses, not from what this
//! replica believes it has started, so a replica whose tests never begin (its caches
//! never synced, say) or never get written (an API server refusing them) shows it.
//! Providers a cache does not hold cannot be counted so: the watched namespaces whose
//! providers, Secrets or ConfigMaps are not listed (a RoleBinding gone) are counted
//! beside them.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::runtime::reflector::ObjectRef;

use kube::Resource;

use super::{Context, schedule};
use crate::api::{IncomingMailProvider, Reason};
use crate::credentials::ObjectKind;

/// Slack past a provider's latest allowed test, for a queue behind its host's slots and
/// for clocks apart between replicas.
const GRACE: Duration = Duration::from_secs(60);

/// How often the count is taken.
const EVERY: Duration = Duration::from_secs(30);

/// Whether `p` should have been tested again by `now`. Its last test (the status's, or
/// `tested`, this replica's last one whose unchanged result it did not need to write; for
/// one never tested, its creation) plus the longest wait its schedule allows, the test's
/// own timeout and [`GRACE`]. Suspended providers are not tested on purpose, nor are those
/// being deleted (held by a finalizer), those that say `AccessDenied` are waiting for a
/// watch and say so, and those whose durations do not parse say `InvalidSpec`: none of
/// them is overdue.
pub fn overdue(p: &IncomingMailProvider, tested: Option<Timestamp>, now: Timestamp) -> bool {
    if p.spec.suspend || p.being_deleted() {
        return false;
    }
    let Ok((interval, timeout)) = crate::check::timing(&p.spec) else {
        return false;
    };
    let status = p.status.as_ref();
    if super::status::ready(status).is_some_and(|c| c.reason == Reason::AccessDenied.as_str()) {
        return false;
    }
    let written = status.and_then(|s| s.last_check_time.as_ref()).map(|t| t.0);
    let created = p.metadata.creation_timestamp.as_ref().map(|t| t.0);
    let Some(last) = written.max(tested).or(created) else {
        return false;
    };
    let failures = status.map_or(0, |s| u32::try_from(s.consecutive_failures).unwrap_or(0));
    let allowed = schedule::next_wait(interval, failures, &schedule::Longest) + timeout + GRACE;
    let allowed = SignedDuration::try_from(allowed).unwrap_or(SignedDuration::MAX);
    last.checked_add(allowed).is_ok_and(|due| due < now)
}

/// Counts this replica's overdue providers and unlisted namespaces every [`EVERY`], for
/// the metrics; first after [`EVERY`], by when the caches have listed unless they cannot.
pub async fn run(ctx: Arc<Context>) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + EVERY, EVERY);
    loop {
        tick.tick().await;
        let now = Timestamp::now();
        let providers: Vec<_> = ctx
            .providers
            .iter()
            .flat_map(|(_, store)| store.state())
            .filter(|p| ctx.shard.owns(p))
            .collect();
        let count = {
            let memory = ctx.memory.lock().unwrap();
            let unwritten = ctx.unwritten.lock().unwrap();
            providers
                .iter()
                .filter(|p| {
                    // A test whose result is still to be written does not count: its
                    // status is as stale as it looks.
                    let key = ObjectRef::from_obj(&***p);
                    let tested = memory
                        .get(&key)
                        .filter(|m| m.uid == p.metadata.uid && !unwritten.contains_key(&key))
                        .and_then(|m| m.tested);
                    overdue(p, tested, now)
                })
                .count()
        };
        ctx.metrics.set_overdue(count);
        ctx.metrics
            .set_unlisted(&IncomingMailProvider::kind(&()), ctx.unlisted_providers());
        for kind in [ObjectKind::Secret, ObjectKind::ConfigMap] {
            ctx.metrics
                .set_unlisted(&kind.to_string(), ctx.objects.unlisted(kind));
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;
    use crate::api::{IncomingMailProviderSpec, IncomingMailProviderStatus};

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    /// Interval 5m, timeout 30s, created at 0; tested at `last` with `failures`.
    fn provider(last: Option<i64>, failures: i32) -> IncomingMailProvider {
        let spec: IncomingMailProviderSpec = serde_json::from_value(serde_json::json!({
            "server": {"host": "mail.example.com", "protocol": "IMAP"},
            "authentication": {"method": "None"},
            "check": {"interval": "5m", "timeout": "30s"},
        }))
        .unwrap();
        let mut p = IncomingMailProvider::new("inbox", spec);
        p.metadata.creation_timestamp = Some(Time(at(0)));
        p.status = last.map(|last| IncomingMailProviderStatus {
            last_check_time: Some(Time(at(last))),
            consecutive_failures: failures,
            ..Default::default()
        });
        p
    }

    #[test]
    fn a_provider_tested_on_schedule_is_not_overdue_and_one_left_untested_is() {
        // Working: due within 5m + 30s of jitter, tested within its 30s timeout, plus a
        // minute of grace: 7m from its last test.
        let p = provider(Some(0), 0);
        assert!(!overdue(&p, None, at(7 * 60)));
        assert!(overdue(&p, None, at(7 * 60 + 1)));
        // Failing twice in a row: retried after at most 22s (20s + 10%).
        let p = provider(Some(0), 2);
        assert!(!overdue(&p, None, at(22 + 30 + 60)));
        assert!(overdue(&p, None, at(22 + 30 + 60 + 1)));
        // Failing for long: its retries are an interval apart, no closer.
        let p = provider(Some(0), 30);
        assert!(!overdue(&p, None, at(5 * 60 + 30 + 60)));
        assert!(overdue(&p, None, at(5 * 60 + 30 + 60 + 1)));
    }

    #[test]
    fn a_test_whose_unchanged_result_was_not_written_counts_as_the_last() {
        // Written at 0; tested again at 40m for a changed Secret, the same result, not
        // written (no heartbeat due within the interval): not overdue until 47m.
        let p = provider(Some(0), 0);
        assert!(overdue(&p, None, at(10 * 60)));
        assert!(!overdue(&p, Some(at(40 * 60)), at(10 * 60)));
        assert!(!overdue(&p, Some(at(40 * 60)), at(47 * 60)));
        assert!(overdue(&p, Some(at(40 * 60)), at(47 * 60 + 1)));
        // One older than the status's counts for nothing.
        assert!(overdue(&p, Some(at(-60)), at(10 * 60)));
    }

    #[test]
    fn the_kinds_counted_unlisted_are_those_the_metric_reports() {
        assert_eq!(
            super::super::metrics::UNLISTED_KINDS,
            [
                IncomingMailProvider::kind(&()).as_ref(),
                &ObjectKind::Secret.to_string(),
                &ObjectKind::ConfigMap.to_string(),
            ]
        );
    }

    #[test]
    fn a_provider_never_tested_is_overdue_from_its_creation() {
        let p = provider(None, 0);
        assert!(!overdue(&p, None, at(60)));
        assert!(overdue(&p, None, at(8 * 60)));
    }

    #[test]
    fn providers_not_tested_on_purpose_are_never_overdue() {
        let mut suspended = provider(Some(0), 0);
        suspended.spec.suspend = true;
        assert!(!overdue(&suspended, None, at(3600)));

        let mut denied = provider(Some(0), 1);
        denied.status.as_mut().unwrap().conditions =
            vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
                type_: "Ready".into(),
                status: "False".into(),
                reason: Reason::AccessDenied.as_str().into(),
                message: "forbidden".into(),
                last_transition_time: Time(at(0)),
                observed_generation: None,
            }];
        assert!(!overdue(&denied, None, at(3600)));

        let mut invalid = provider(Some(0), 0);
        invalid.spec.check.interval = "soon".into();
        assert!(!overdue(&invalid, None, at(3600)));

        // Deleted, held by a finalizer: not tested any more, on purpose.
        let mut held = provider(Some(0), 0);
        held.metadata.deletion_timestamp = Some(Time(at(60)));
        assert!(!overdue(&held, None, at(3600)));
    }
}
