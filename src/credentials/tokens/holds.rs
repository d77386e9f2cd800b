//! When not to call a token endpoint: after it asked (HTTP 429 or 503 with Retry-After),
//! and for a while after it failed. Every test of every provider of one client would
//! otherwise ask anew, one after another under the token Secret's lock (each up to the
//! request's timeout, with its mail host's slot held): 200 mailboxes of one app-only
//! client on an unreachable endpoint made 200 requests a round, and stalled their host.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use secrecy::{ExposeSecret, SecretString};

/// The first hold after a failure, doubled with each failure in a row up to [`MOST`].
const FIRST: Duration = Duration::from_secs(10);
const MOST: Duration = Duration::from_secs(300);

/// (token endpoint, client id).
pub(super) type Client = (String, String);

/// What a request went with that a person may change to fix it (the client secret, the
/// CA bundle trusted for the endpoint, the flow and scopes asked for), as a digest: a request with others is not held
/// back by the failure of one without them.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) struct Inputs([u8; 32]);

impl Inputs {
    pub(super) fn of(
        client_secret: Option<&SecretString>,
        ca_bundle: Option<&[u8]>,
        settings: &str,
    ) -> Inputs {
        let mut text = Vec::new();
        let parts = [
            client_secret.map(|s| s.expose_secret().as_bytes()),
            ca_bundle,
            Some(settings.as_bytes()),
        ];
        for part in parts {
            // Length-prefixed, and None told from empty.
            match part {
                Some(bytes) => {
                    text.push(1);
                    text.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
                    text.extend_from_slice(bytes);
                }
                None => text.push(0),
            }
        }
        Inputs(crate::probe::sha256(&text))
    }
}

enum Hold {
    /// The endpoint asked not to be called before `until`.
    Asked { until: Timestamp },
    /// The last request failed (no answer, an HTTP error, a refusal that is no sign-in's):
    /// `failures` in a row, the last at `at`, sent with `inputs`.
    Failed {
        at: Timestamp,
        until: Timestamp,
        failures: u32,
        message: String,
        inputs: Inputs,
    },
}

/// Holds by client.
#[derive(Default)]
pub(super) struct Holds(Mutex<HashMap<Client, Hold>>);

impl Holds {
    /// Why no request is to go to `client` now, if none is. A failure holds back neither
    /// a request with other [`Inputs`] (perhaps the fix) nor one a person asked for
    /// (`mailroom retest`, after fixing a proxy or a NetworkPolicy); the endpoint's own
    /// request to wait holds back everything.
    pub(super) fn why_not(
        &self,
        client: &Client,
        inputs: Inputs,
        asked: bool,
        now: Timestamp,
    ) -> Option<String> {
        let mut holds = self.0.lock().unwrap();
        holds.retain(|_, h| match h {
            Hold::Asked { until } => *until > now,
            // Kept a while past its end: the next failure's hold builds on it.
            Hold::Failed { until, .. } => {
                now.duration_since(*until) < SignedDuration::from_secs(MOST.as_secs() as i64)
            }
        });
        let url = &client.0;
        match holds.get(client)? {
            Hold::Asked { until } if *until > now => Some(throttled(url, *until)),
            Hold::Failed {
                at,
                until,
                failures,
                message,
                inputs: sent,
            } if *until > now && !asked && *sent == inputs => {
                let times = if *failures == 1 {
                    String::new()
                } else {
                    format!(" ({failures} times in a row)")
                };
                Some(format!(
                    "the last request to the token endpoint {url} failed at {at}{times}: {message}; it is not asked again before {until}"
                ))
            }
            _ => None,
        }
    }

    /// The endpoint asked not to be called before `until`; what the hold says.
    pub(super) fn asked(&self, client: Client, until: Timestamp) -> String {
        let words = throttled(&client.0, until);
        self.0.lock().unwrap().insert(client, Hold::Asked { until });
        words
    }

    /// A request failed with `message`: no other is sent for a while, longer with each
    /// failure in a row.
    pub(super) fn failed(&self, client: Client, inputs: Inputs, message: &str, now: Timestamp) {
        let mut holds = self.0.lock().unwrap();
        let failures = match holds.get(&client) {
            // Requests sent together (for several token Secrets) that fail together are
            // one failure, not a hold doubled for each; and a wait the endpoint asked for
            // stands.
            Some(Hold::Failed { until, .. } | Hold::Asked { until }) if *until > now => return,
            Some(Hold::Failed { failures, .. }) => failures.saturating_add(1),
            _ => 1,
        };
        let hold = FIRST
            .saturating_mul(2u32.saturating_pow(failures - 1))
            .min(MOST);
        // Whole seconds, as status shows them.
        let until = Timestamp::from_second(now.as_second() + hold.as_secs() as i64)
            .unwrap_or(Timestamp::MAX);
        holds.insert(
            client,
            Hold::Failed {
                at: Timestamp::from_second(now.as_second()).unwrap_or(now),
                until,
                failures,
                message: message.to_string(),
                inputs,
            },
        );
    }

    /// The endpoint answered with a grant (or a refusal only a sign-in cures, which says
    /// nothing of the endpoint): nothing is held back.
    pub(super) fn answered(&self, client: &Client) {
        self.0.lock().unwrap().remove(client);
    }
}

fn throttled(url: &str, until: Timestamp) -> String {
    format!(
        "the token endpoint {url} asked (HTTP 429 or 503 with Retry-After) not to be called before {until}: throttled until {until}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn client() -> Client {
        ("https://login.example/token".into(), "app".into())
    }

    #[test]
    fn failures_hold_requests_back_longer_each_time_up_to_five_minutes() {
        let holds = Holds::default();
        let s = Inputs::of(Some(&SecretString::from("s3cret-value")), None, "");
        assert_eq!(holds.why_not(&client(), s, false, at(0)), None);
        holds.failed(client(), s, "connection refused", at(0));
        // Another request that was in flight fails too: one failure, not two.
        holds.failed(client(), s, "connection refused", at(1));
        let why = holds.why_not(&client(), s, false, at(9)).unwrap();
        assert!(why.contains("connection refused"), "{why}");
        assert!(!why.contains("in a row"), "{why}");
        assert_eq!(holds.why_not(&client(), s, false, at(10)), None);
        // 10 s, 20 s, 40 s, … 300 s at most.
        let mut now = 10;
        for (failures, hold) in [(2, 20), (3, 40), (4, 80), (5, 160), (6, 300), (7, 300)] {
            holds.failed(client(), s, "HTTP 503", at(now));
            let why = holds.why_not(&client(), s, false, at(now + hold - 1));
            assert!(
                why.as_deref()
                    .is_some_and(|w| w.contains(&format!("{failures} times in a row"))),
                "{failures}: {why:?}"
            );
            assert_eq!(holds.why_not(&client(), s, false, at(now + hold)), None);
            now += hold;
        }
        // An answer ends it: the next failure holds 10 s again.
        holds.answered(&client());
        holds.failed(client(), s, "HTTP 503", at(now));
        assert_eq!(holds.why_not(&client(), s, false, at(now + 10)), None);
    }

    #[test]
    fn a_failure_holds_back_neither_other_inputs_nor_a_persons_request() {
        let holds = Holds::default();
        let secret = |s: &str| SecretString::from(s.to_string());
        let old = Inputs::of(Some(&secret("old-client-secret")), None, "");
        holds.failed(client(), old, "invalid_client", at(0));
        assert!(holds.why_not(&client(), old, false, at(1)).is_some());
        for other in [
            Inputs::of(Some(&secret("new-client-secret")), None, ""),
            Inputs::of(None, None, ""),
            Inputs::of(
                Some(&secret("old-client-secret")),
                Some(b"-----BEGIN CERTIFICATE-----"),
                "",
            ),
            // The same client asking other scopes (another team's provider).
            Inputs::of(
                Some(&secret("old-client-secret")),
                None,
                "AuthorizationCode https://mail.example/.default",
            ),
        ] {
            assert_eq!(holds.why_not(&client(), other, false, at(1)), None);
        }
        assert_eq!(holds.why_not(&client(), old, true, at(1)), None);
        // Another client of the same endpoint is not held back.
        let other = (client().0, "other-app".to_string());
        assert_eq!(holds.why_not(&other, old, false, at(1)), None);
        // Nothing but a CA bundle is not an empty one.
        assert!(Inputs::of(None, None, "") != Inputs::of(None, Some(b""), ""));
    }

    #[test]
    fn a_retry_after_holds_back_everything_until_then() {
        let holds = Holds::default();
        holds.asked(client(), at(30));
        let any = Inputs::of(None, None, "");
        // A failure meanwhile (another request in flight) does not shorten it.
        holds.failed(client(), any, "HTTP 502", at(1));
        let why = holds.why_not(&client(), any, true, at(29)).unwrap();
        assert!(why.contains("throttled until"), "{why}");
        assert_eq!(holds.why_not(&client(), any, true, at(30)), None);
    }
}
