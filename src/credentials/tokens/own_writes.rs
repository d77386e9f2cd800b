//! The token Secrets the token manager itself rewrote, so that the controller can tell its
//! own write-back from a change of what a provider references.
//!
//! Counted as a change, every write-back set off a test of each provider sharing the
//! Secret, and when access tokens live under the five minutes kept in hand, each of those
//! tests refreshed and wrote back again, without end.
//!
//! Every version of a run of our own writes stands for the version before the run, not
//! only the last: providers sharing a token Secret write it one after another, and the
//! Secrets' watch may deliver an earlier of those versions after a later one was written.
//!
//! A write is marked before its request leaves: the watch may deliver the new version
//! before the request returns it, and a version seen meanwhile is neither known as ours
//! nor as someone else's until it does.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// (namespace, name) of a token Secret.
type Key = (String, String);

/// The ledger of our own writes, shared by the token manager (which writes) and the
/// controller's view of referenced objects (which reads versions).
#[derive(Debug, Default)]
pub struct OwnWrites(Mutex<Ledger>);

#[derive(Debug, Default)]
struct Ledger {
    runs: HashMap<Key, Run>,
    /// Writes on their way, each with the version it replaces (None: a create).
    writing: HashMap<Key, Option<String>>,
}

/// The versions one run of our own writes made (the latest last), and the version before.
#[derive(Debug)]
struct Run {
    written: Vec<String>,
    base: Option<String>,
}

/// The most versions of one run remembered: a watch lags by a few writes, not by dozens.
const RUN_MAX: usize = 16;

/// What a referenced Secret's version means for a provider's schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// The version to compare (None: the Secret does not exist, or did not before a run
    /// of our writes that created it).
    Version(Option<String>),
    /// A version that may be the one our write on its way is making: ask again shortly.
    Writing,
}

/// A write on its way; dropped without [`Pending::done`], it failed and counts for nothing.
pub struct Pending {
    ledger: Arc<OwnWrites>,
    key: Key,
    before: Option<String>,
}

impl OwnWrites {
    /// Marks a write of `name` over version `before` (None: a create) as on its way.
    pub fn begin(self: &Arc<Self>, namespace: &str, name: &str, before: Option<String>) -> Pending {
        let key = (namespace.to_string(), name.to_string());
        let mut ledger = self.0.lock().unwrap();
        ledger.writing.insert(key.clone(), before.clone());
        Pending {
            ledger: self.clone(),
            key,
            before,
        }
    }

    /// The version a provider's schedule should see for Secret `name` at `version`.
    pub fn resolve(&self, namespace: &str, name: &str, version: Option<String>) -> Resolved {
        let ledger = self.0.lock().unwrap();
        // Every reconcile asks, for every Secret it references; most fleets never write one.
        if ledger.runs.is_empty() && ledger.writing.is_empty() {
            return Resolved::Version(version);
        }
        ledger.resolve(&(namespace.to_string(), name.to_string()), version)
    }

    /// Forgets the Secrets for which `keep` is false (no provider references them).
    pub fn retain(&self, mut keep: impl FnMut(&str, &str) -> bool) {
        let mut ledger = self.0.lock().unwrap();
        ledger.runs.retain(|(ns, name), _| keep(ns, name));
    }
}

impl Pending {
    /// The write made version `after`.
    pub fn done(self, after: String) {
        let mut ledger = self.ledger.0.lock().unwrap();
        ledger.note(self.key.clone(), self.before.clone(), after);
        // `self` drops here, which ends the mark.
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut ledger = self.ledger.0.lock().unwrap();
        // Only our own mark: the token manager writes one Secret at a time, but a mark
        // is cheap to check.
        if ledger.writing.get(&self.key) == Some(&self.before) {
            ledger.writing.remove(&self.key);
        }
    }
}

impl Ledger {
    fn note(&mut self, key: Key, before: Option<String>, after: String) {
        match self.runs.get_mut(&key) {
            // A write over one of our own continues the run.
            Some(run) if before.as_ref().is_some_and(|b| run.written.contains(b)) => {
                if run.written.len() == RUN_MAX {
                    run.written.remove(0);
                }
                run.written.push(after);
            }
            // Over someone else's version: a new run, standing for theirs.
            _ => {
                let run = Run {
                    written: vec![after],
                    base: before,
                };
                self.runs.insert(key, run);
            }
        }
    }

    fn resolve(&self, key: &Key, version: Option<String>) -> Resolved {
        if let Some(run) = self.runs.get(key)
            && version.as_ref().is_some_and(|v| run.written.contains(v))
        {
            return Resolved::Version(run.base.clone());
        }
        match self.writing.get(key) {
            // Not the version our write replaces, not one we know: it may be ours.
            Some(before) if *before != version => Resolved::Writing,
            _ => Resolved::Version(version),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: &str = "ops";
    const NAME: &str = "alice-token";

    fn v(s: &str) -> Option<String> {
        Some(s.to_string())
    }

    fn seen(own: &OwnWrites, version: &str) -> Resolved {
        own.resolve(NS, NAME, v(version))
    }

    fn write(own: &Arc<OwnWrites>, before: &str, after: &str) {
        own.begin(NS, NAME, v(before)).done(after.to_string());
    }

    #[test]
    fn own_writes_look_like_the_version_they_replaced() {
        let own = Arc::new(OwnWrites::default());
        write(&own, "10", "11");
        assert_eq!(seen(&own, "11"), Resolved::Version(v("10")));
        // Another write over ours: still the version before the first.
        write(&own, "11", "12");
        assert_eq!(seen(&own, "12"), Resolved::Version(v("10")));
        // Someone else's write is a change.
        assert_eq!(seen(&own, "13"), Resolved::Version(v("13")));
        // Our write over someone else's stands for theirs.
        write(&own, "13", "14");
        assert_eq!(seen(&own, "14"), Resolved::Version(v("13")));
        // Providers sharing the Secret write it in turn, and the watch delivers the
        // versions late: every one of the run is still no change.
        write(&own, "14", "15");
        assert_eq!(seen(&own, "14"), Resolved::Version(v("13")));
        assert_eq!(seen(&own, "15"), Resolved::Version(v("13")));
        // Bounded: the oldest versions of a long run are forgotten.
        for n in 16..40 {
            write(&own, &(n - 1).to_string(), &n.to_string());
        }
        assert_eq!(seen(&own, "39"), Resolved::Version(v("13")));
        assert_eq!(seen(&own, "14"), Resolved::Version(v("14")));
        // A Secret we created looks like none.
        own.begin(NS, "app-token", None).done("1".into());
        assert_eq!(
            own.resolve(NS, "app-token", v("1")),
            Resolved::Version(None)
        );
    }

    #[test]
    fn a_version_seen_while_our_write_is_on_its_way_waits_for_its_answer() {
        let own = Arc::new(OwnWrites::default());
        let pending = own.begin(NS, NAME, v("10"));
        // The version the write replaces is what it was: no change yet.
        assert_eq!(seen(&own, "10"), Resolved::Version(v("10")));
        // The watch delivered the new version before the write returned.
        assert_eq!(seen(&own, "11"), Resolved::Writing);
        pending.done("11".into());
        assert_eq!(seen(&own, "11"), Resolved::Version(v("10")));
    }

    #[test]
    fn a_write_that_failed_leaves_the_version_seen_a_change() {
        let own = Arc::new(OwnWrites::default());
        let pending = own.begin(NS, NAME, v("10"));
        // Someone else wrote first; our write will be refused.
        assert_eq!(seen(&own, "11"), Resolved::Writing);
        drop(pending);
        assert_eq!(seen(&own, "11"), Resolved::Version(v("11")));
        // A later write over theirs makes a run standing for theirs.
        write(&own, "11", "12");
        assert_eq!(seen(&own, "12"), Resolved::Version(v("11")));
    }

    #[test]
    fn forgotten_secrets_resolve_as_seen() {
        let own = Arc::new(OwnWrites::default());
        write(&own, "10", "11");
        own.retain(|_, name| name != NAME);
        assert_eq!(seen(&own, "11"), Resolved::Version(v("11")));
    }
}
