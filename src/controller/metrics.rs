//! Prometheus metrics. Labels are bounded sets (protocol, reason, Ready status) unless
//! per-provider series are switched on: a fleet of thousands must not become thousands of
//! series by default. No secret, host or user name is ever a label value.

use std::collections::HashMap;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TestLabels {
    protocol: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtocolLabels {
    protocol: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReadyLabels {
    ready: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabels {
    namespace: String,
    name: String,
    reason: String,
}

/// The `result` label values of `mailroom_token_refreshes_total`.
/// Each is a token endpoint's answer: a grant, a failure (no answer, an HTTP error, a
/// refusal), a refusal only a new sign-in cures, a request to wait (429 or 503 with
/// Retry-After).
pub const TOKEN_REFRESH_RESULTS: [&str; 4] = ["refreshed", "failed", "revoked", "throttled"];

/// The `kind` label values of `mailroom_namespaces_unlisted`: the caches a watched
/// namespace needs listed for its providers to be tested.
pub const UNLISTED_KINDS: [&str; 3] = ["IncomingMailProvider", "Secret", "ConfigMap"];

/// The upper bounds of `mailroom_test_duration_seconds`' buckets: a test takes
/// milliseconds against a nearby server, and may run for its whole `check.timeout`, which
/// can be minutes.
pub const TEST_DURATION_BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// Every series mailroom exports.
pub struct Metrics {
    registry: Registry,
    tests: Family<TestLabels, Counter>,
    duration: Family<ProtocolLabels, Histogram>,
    providers: Family<ReadyLabels, Gauge>,
    writes: Family<KindLabels, Counter>,
    token_refreshes: Family<ResultLabels, Counter>,
    leader: Gauge,
    overdue: Gauge,
    unlisted: Family<KindLabels, Gauge>,
    per_provider: Option<Family<ProviderLabels, Gauge>>,
    /// Ready status (and reason) last written per provider, for the gauges.
    ready: Mutex<HashMap<(String, String), (String, String)>>,
}

impl Metrics {
    pub fn new(per_provider: bool) -> Metrics {
        let mut registry = Registry::with_prefix("mailroom");
        // Which version each replica runs (mid-rollout, or a stuck old pod), as every
        // controller reports it.
        registry.register(
            "build",
            "The version of mailroom this replica runs",
            prometheus_client::metrics::info::Info::new(vec![(
                "version",
                env!("CARGO_PKG_VERSION"),
            )]),
        );
        let tests = Family::<TestLabels, Counter>::default();
        registry.register(
            "tests",
            "Tests run, by protocol and Ready reason",
            tests.clone(),
        );
        let duration = Family::<ProtocolLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(TEST_DURATION_BUCKETS)
        });
        registry.register(
            "test_duration_seconds",
            "How long one test took",
            duration.clone(),
        );
        let providers = Family::<ReadyLabels, Gauge>::default();
        registry.register(
            "providers",
            "Providers by the status of their Ready condition",
            providers.clone(),
        );
        let writes = Family::<KindLabels, Counter>::default();
        registry.register(
            "api_writes",
            "Writes to the API server, by kind (status, event)",
            writes.clone(),
        );
        let token_refreshes = Family::<ResultLabels, Counter>::default();
        registry.register(
            "token_refreshes",
            "OAuth2 token refreshes, by result",
            token_refreshes.clone(),
        );
        // Initialised so that rates and alerts work before the first refresh.
        for result in TOKEN_REFRESH_RESULTS {
            let _ = token_refreshes.get_or_create(&ResultLabels {
                result: result.into(),
            });
        }
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the lease and tests providers",
            leader.clone(),
        );
        let overdue = Gauge::default();
        registry.register(
            "providers_overdue",
            "Providers this replica tests whose last test is older than their schedule allows (interval or backoff with jitter, check.timeout and a minute): their status is going stale",
            overdue.clone(),
        );
        let unlisted = Family::<KindLabels, Gauge>::default();
        registry.register(
            "namespaces_unlisted",
            "Watched namespaces (1 for a watch of all namespaces) whose objects of this kind this replica has not listed, or may not list now: their providers are not tested, or say AccessDenied",
            unlisted.clone(),
        );
        // Initialised so that the alert sees 0, not nothing, while all are listed.
        for kind in UNLISTED_KINDS {
            let _ = unlisted.get_or_create(&KindLabels { kind: kind.into() });
        }
        let per_provider = per_provider.then(|| {
            let family = Family::<ProviderLabels, Gauge>::default();
            registry.register(
                "provider_ready",
                "1 when the provider is Ready, else 0 (per provider)",
                family.clone(),
            );
            family
        });
        Metrics {
            registry,
            tests,
            duration,
            providers,
            writes,
            token_refreshes,
            leader,
            overdue,
            unlisted,
            per_provider,
            ready: Mutex::new(HashMap::new()),
        }
    }

    /// A finished test; `seconds` is None when it stopped before connecting.
    pub fn test_finished(&self, protocol: &str, reason: &str, seconds: Option<f64>) {
        self.tests
            .get_or_create(&TestLabels {
                protocol: protocol.into(),
                reason: reason.into(),
            })
            .inc();
        if let Some(seconds) = seconds {
            self.duration
                .get_or_create(&ProtocolLabels {
                    protocol: protocol.into(),
                })
                .observe(seconds);
        }
    }

    pub fn api_write(&self, kind: &str) {
        self.writes
            .get_or_create(&KindLabels { kind: kind.into() })
            .inc();
    }

    pub fn token_refreshes(&self, result: &str, count: u64) {
        self.token_refreshes
            .get_or_create(&ResultLabels {
                result: result.into(),
            })
            .inc_by(count);
    }

    /// Whether this replica tests. One that stops (its lease lost) stops reporting the
    /// providers too: the replica testing them now does, and a sum over replicas must
    /// count each provider once.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
        if !leading {
            self.retain_providers(|_| false);
            self.overdue.set(0);
            for kind in UNLISTED_KINDS {
                self.set_unlisted(kind, 0);
            }
        }
    }

    /// Records a provider's Ready status ("True", "False", "Unknown"), or None when it is gone.
    pub fn provider_ready(&self, namespace: &str, name: &str, ready: Option<(&str, &str)>) {
        let key = (namespace.to_string(), name.to_string());
        let mut map = self.ready.lock().unwrap();
        // Called on every reconcile: most find nothing new.
        if map.get(&key).map(|(s, r)| (s.as_str(), r.as_str())) == ready {
            return;
        }
        let before = match ready {
            Some((status, reason)) => {
                map.insert(key.clone(), (status.to_string(), reason.to_string()))
            }
            None => map.remove(&key),
        };
        if let Some((status, reason)) = &before {
            self.providers
                .get_or_create(&ReadyLabels {
                    ready: status.clone(),
                })
                .dec();
            if let Some(f) = &self.per_provider {
                f.remove(&ProviderLabels {
                    namespace: key.0.clone(),
                    name: key.1.clone(),
                    reason: reason.clone(),
                });
            }
        }
        if let Some((status, reason)) = ready {
            self.providers
                .get_or_create(&ReadyLabels {
                    ready: status.into(),
                })
                .inc();
            if let Some(f) = &self.per_provider {
                let labels = ProviderLabels {
                    namespace: key.0,
                    name: key.1,
                    reason: reason.into(),
                };
                f.get_or_create(&labels).set(i64::from(status == "True"));
            }
        }
    }

    /// How many of this replica's providers are overdue (see `staleness`).
    pub fn set_overdue(&self, count: usize) {
        self.overdue.set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// How many watched namespaces' objects of `kind` (one of [`UNLISTED_KINDS`]) are not
    /// listed (see `staleness`).
    pub fn set_unlisted(&self, kind: &str, count: usize) {
        self.unlisted
            .get_or_create(&KindLabels { kind: kind.into() })
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// Records a provider's Ready status as its stored status says, unless one is known
    /// already: what this replica writes is recorded as it writes it, and the cache it
    /// reads here may not hold its last write yet (the gauge would go back for a moment).
    pub fn provider_seen(&self, namespace: &str, name: &str, ready: Option<(&str, &str)>) {
        let known = self
            .ready
            .lock()
            .unwrap()
            .contains_key(&(namespace.to_string(), name.to_string()));
        if !known && ready.is_some() {
            self.provider_ready(namespace, name, ready);
        }
    }

    /// Forgets the providers (namespace, name) for which `keep` is false.
    pub fn retain_providers(&self, keep: impl Fn(&(String, String)) -> bool) {
        let gone: Vec<_> = self
            .ready
            .lock()
            .unwrap()
            .keys()
            .filter(|k| !keep(k))
            .cloned()
            .collect();
        for (ns, name) in gone {
            self.provider_ready(&ns, &name, None);
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_gauges_follow_transitions_and_deletions() {
        let m = Metrics::new(false);
        m.provider_ready("ops", "a", Some(("True", "Connected")));
        m.provider_ready("ops", "b", Some(("False", "AuthenticationFailed")));
        m.provider_ready("ops", "b", Some(("True", "Connected")));
        let text = m.encode();
        assert!(
            text.contains("mailroom_providers{ready=\"True\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("mailroom_providers{ready=\"False\"} 0"),
            "{text}"
        );
        m.retain_providers(|k| k.0 == "ops" && k.1 == "a");
        assert!(m.encode().contains("mailroom_providers{ready=\"True\"} 1"));
        assert!(
            !m.encode().contains("ops"),
            "no provider names without per-provider series"
        );
    }

    #[test]
    fn a_stored_status_read_after_this_replica_wrote_a_newer_one_changes_nothing() {
        let m = Metrics::new(true);
        // Taking over: the stored status seeds the gauges.
        m.provider_seen("ops", "a", Some(("False", "Timeout")));
        assert!(m.encode().contains("mailroom_providers{ready=\"False\"} 1"));
        // Then a test's write; the cache still holds the status before it.
        m.provider_ready("ops", "a", Some(("True", "Connected")));
        m.provider_seen("ops", "a", Some(("False", "Timeout")));
        let text = m.encode();
        assert!(
            text.contains("mailroom_providers{ready=\"True\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("mailroom_providers{ready=\"False\"} 0"),
            "{text}"
        );
        assert!(
            text.contains(
                "mailroom_provider_ready{namespace=\"ops\",name=\"a\",reason=\"Connected\"} 1"
            ),
            "{text}"
        );
        assert!(!text.contains("reason=\"Timeout\""), "{text}");
    }

    #[test]
    fn a_replica_that_stops_testing_stops_counting_providers() {
        let m = Metrics::new(true);
        m.set_leader(true);
        m.provider_ready("ops", "a", Some(("False", "Timeout")));
        m.provider_ready("ops", "b", Some(("True", "Connected")));
        m.set_overdue(3);
        m.set_unlisted("Secret", 2);
        let text = m.encode();
        assert!(text.contains("mailroom_providers_overdue 3"), "{text}");
        assert!(
            text.contains("mailroom_namespaces_unlisted{kind=\"Secret\"} 2"),
            "{text}"
        );
        m.set_leader(false);
        let text = m.encode();
        assert!(text.contains("mailroom_leader 0"), "{text}");
        assert!(text.contains("mailroom_providers_overdue 0"), "{text}");
        assert!(
            text.contains("mailroom_namespaces_unlisted{kind=\"Secret\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("mailroom_providers{ready=\"False\"} 0")
                && text.contains("mailroom_providers{ready=\"True\"} 0"),
            "{text}"
        );
        assert!(!text.contains("mailroom_provider_ready{"), "{text}");
    }

    #[test]
    fn every_kind_of_unlisted_namespace_is_reported_before_any_is_counted() {
        let text = Metrics::new(false).encode();
        for kind in UNLISTED_KINDS {
            let series = format!("mailroom_namespaces_unlisted{{kind=\"{kind}\"}} 0");
            assert!(text.contains(&series), "{series} missing:\n{text}");
        }
    }

    #[test]
    fn a_test_that_runs_for_minutes_is_told_apart_from_one_that_runs_for_seconds() {
        let m = Metrics::new(false);
        m.test_finished("IMAP", "Connected", Some(0.004));
        m.test_finished("IMAP", "Timeout", Some(45.0));
        m.test_finished("IMAP", "Timeout", Some(240.0));
        let text = m.encode();
        for (le, count) in [
            ("0.005", 1),
            ("30.0", 1),
            ("60.0", 2),
            ("120.0", 2),
            ("300.0", 3),
            ("600.0", 3),
            ("+Inf", 3),
        ] {
            let series = format!(
                "mailroom_test_duration_seconds_bucket{{le=\"{le}\",protocol=\"IMAP\"}} {count}"
            );
            assert!(text.contains(&series), "{series} missing:\n{text}");
        }
    }

    #[test]
    fn per_provider_series_only_when_asked() {
        let m = Metrics::new(true);
        m.provider_ready("ops", "a", Some(("False", "Timeout")));
        let text = m.encode();
        assert!(
            text.contains(
                "mailroom_provider_ready{namespace=\"ops\",name=\"a\",reason=\"Timeout\"} 0"
            ),
            "{text}"
        );
    }
}
