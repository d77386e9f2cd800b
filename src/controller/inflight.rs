//! Tests run as tasks of their own, not inside kube-runtime's reconciles.
//!
//! A reconcile decides whether a test is due and returns at once; the test it starts waits
//! for its slots, runs, writes the status, and then asks for a reconcile of its provider,
//! which schedules the next test. Why: kube-runtime's runner polls every running
//! reconcile, and scans the triggers held back for them, each time any one of them wakes.
//! With 10,000 providers applied at once, 10,000 reconciles waited for their host's slot,
//! and the controller spent most of its CPU in those scans (perf: JoinHandle polls and
//! hashing of object refs) while the tests had long finished: the ramp took twice as long
//! as the tests did.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use futures::channel::mpsc::{UnboundedReceiver, UnboundedSender, unbounded};
use kube::runtime::reflector::ObjectRef;
use tokio::sync::Notify;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

use crate::api::IncomingMailProvider;

type Key = ObjectRef<IncomingMailProvider>;

/// The wait before a test that panicked is tried again.
const AFTER_A_PANIC: Duration = Duration::from_secs(60);

/// The tests running or waiting for a slot, at most one per provider, each with what
/// nudges it (see [`InFlight::nudge`]).
pub struct InFlight {
    running: Arc<Mutex<HashMap<Key, Arc<Notify>>>>,
    tasks: TaskTracker,
    /// Cancelled when the controllers are dropped (the lease is lost): the tests stop.
    cancel: CancellationToken,
    /// Where a finished test asks for its provider's reconcile: one channel per watched
    /// scope (all namespaces, or one namespace each).
    triggers: Vec<(Option<String>, UnboundedSender<Key>)>,
    stopping: super::Stop,
}

impl InFlight {
    /// One trigger stream per scope, in the order given, for `Controller::reconcile_on`.
    pub fn new(
        scopes: &[Option<String>],
        stopping: super::Stop,
    ) -> (InFlight, Vec<UnboundedReceiver<Key>>) {
        let (triggers, receivers) = scopes
            .iter()
            .map(|scope| {
                let (tx, rx) = unbounded();
                ((scope.clone(), tx), rx)
            })
            .unzip();
        let inflight = InFlight {
            running: Arc::default(),
            tasks: TaskTracker::new(),
            cancel: CancellationToken::new(),
            triggers,
            stopping,
        };
        (inflight, receivers)
    }

    pub fn is_running(&self, key: &Key) -> bool {
        self.running.lock().unwrap().contains_key(key)
    }

    /// Tells the test of `key`, if one runs, that its provider changed: one still waiting
    /// for a slot looks whether it is still the test to run (see `reconcile`).
    pub fn nudge(&self, key: &Key) {
        if let Some(nudges) = self.running.lock().unwrap().get(key) {
            nudges.notify_one();
        }
    }

    /// Nudges every test running or waiting (see [`InFlight::nudge`]): after a relist,
    /// whose deletions come as no event of their own.
    pub fn nudge_all(&self) {
        for nudges in self.running.lock().unwrap().values() {
            nudges.notify_one();
        }
    }

    /// Runs the test `test` makes for the provider `key` (given what nudges it) unless one
    /// runs already; when it ends, after the delay it returns, the provider is reconciled.
    /// Returns whether it started.
    pub fn start<F>(&self, key: Key, test: impl FnOnce(Arc<Notify>) -> F) -> bool
    where
        F: Future<Output = Duration> + Send + 'static,
    {
        let nudges = {
            let mut running = self.running.lock().unwrap();
            if running.contains_key(&key) {
                return false;
            }
            let nudges = Arc::new(Notify::new());
            running.insert(key.clone(), nudges.clone());
            nudges
        };
        let test = test(nudges);
        let running = Running {
            set: self.running.clone(),
            key: Some(key.clone()),
        };
        let cancel = self.cancel.clone();
        let stopping = self.stopping.clone();
        let trigger = self
            .triggers
            .iter()
            .find(|(scope, _)| super::in_scope(scope, key.namespace.as_deref()))
            .map(|(_, tx)| tx.clone());
        let provider = key.to_string();
        // A test that panics (a defect of mailroom's) is tried again later rather than
        // never: nothing else would ask for its provider's reconcile, and its last status
        // would stand unnoticed but for the overdue count.
        let test = AssertUnwindSafe(test).catch_unwind().map(move |ended| {
            ended.unwrap_or_else(|_| {
                tracing::error!(
                    provider,
                    "the test panicked (a defect of mailroom's); trying again in {AFTER_A_PANIC:?}"
                );
                AFTER_A_PANIC
            })
        });
        self.tasks.spawn(async move {
            let again = tokio::select! {
                again = test => again,
                () = cancel.cancelled() => return,
            };
            drop(running);
            // After a failure the reconcile waits a little, as kube-runtime's error
            // policy would; a controller that is stopping reconciles nothing more.
            tokio::select! {
                () = tokio::time::sleep(again) => {}
                _ = stopping => return,
                () = cancel.cancelled() => return,
            }
            if let Some(tx) = trigger {
                let _ = tx.unbounded_send(key);
            }
        });
        true
    }

    /// Cancels every test when the returned guard drops: held by the controllers, so
    /// that losing the lease (which drops them) stops the tests too.
    pub fn cancel_on_drop(&self) -> DropGuard {
        self.cancel.clone().drop_guard()
    }

    /// Waits for the tests in flight (a stopping controller starts no more), at most
    /// `within`; then cancels the rest (their providers keep their last status and are
    /// tested again by the next replica). Returns how many were cancelled.
    pub async fn finish(&self, within: std::time::Duration) -> usize {
        self.tasks.close();
        if tokio::time::timeout(within, self.tasks.wait())
            .await
            .is_ok()
        {
            return 0;
        }
        let cancelled = self.tasks.len();
        self.cancel.cancel();
        self.tasks.wait().await;
        cancelled
    }
}

/// Marks a provider's test as running until dropped (finished or cancelled).
struct Running {
    set: Arc<Mutex<HashMap<Key, Arc<Notify>>>>,
    key: Option<Key>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.set.lock().unwrap().remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{FutureExt, StreamExt};

    fn key(ns: &str, name: &str) -> Key {
        ObjectRef::new(name).within(ns)
    }

    fn never() -> crate::controller::Stop {
        futures::future::pending().boxed().shared()
    }

    #[tokio::test]
    async fn one_test_per_provider_then_a_reconcile_in_its_scope() {
        let scopes = [Some("a".to_string()), Some("b".to_string())];
        let (inflight, mut rx) = InFlight::new(&scopes, never());
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        assert!(inflight.start(key("b", "p"), |_| async move {
            let _ = released.await;
            Duration::ZERO
        }));
        assert!(inflight.is_running(&key("b", "p")));
        assert!(
            !inflight.start(key("b", "p"), |_| async { Duration::ZERO }),
            "a second test of one provider must not start while the first runs"
        );
        release.send(()).unwrap();
        let asked = tokio::time::timeout(Duration::from_secs(5), rx[1].next())
            .await
            .expect("a finished test asks for a reconcile");
        assert_eq!(asked, Some(key("b", "p")));
        assert!(!inflight.is_running(&key("b", "p")));
        assert!(
            rx[0].try_recv().is_err(),
            "not in another namespace's scope"
        );
    }

    #[tokio::test]
    async fn a_nudge_reaches_the_running_test_of_its_provider_only() {
        let (inflight, mut rx) = InFlight::new(&[None], never());
        for name in ["p", "q"] {
            assert!(inflight.start(key("a", name), |nudges| async move {
                nudges.notified().await;
                Duration::ZERO
            }));
        }
        inflight.nudge(&key("a", "p"));
        inflight.nudge(&key("a", "absent"));
        let asked = tokio::time::timeout(Duration::from_secs(5), rx[0].next())
            .await
            .expect("the nudged test ends");
        assert_eq!(asked, Some(key("a", "p")));
        assert!(
            inflight.is_running(&key("a", "q")),
            "another's test goes on"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_test_that_panics_is_tried_again_later() {
        let (inflight, mut rx) = InFlight::new(&[None], never());
        assert!(inflight.start(key("a", "p"), |_| async {
            panic!("a defect");
        }));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!inflight.is_running(&key("a", "p")));
        assert!(rx[0].try_recv().is_err(), "not at once");
        tokio::time::sleep(AFTER_A_PANIC).await;
        assert_eq!(rx[0].try_recv().ok(), Some(key("a", "p")));
    }

    #[tokio::test]
    async fn losing_the_controllers_cancels_the_tests() {
        let (inflight, mut rx) = InFlight::new(&[None], never());
        let guard = inflight.cancel_on_drop();
        let (_keep, never_released) = tokio::sync::oneshot::channel::<()>();
        assert!(inflight.start(key("a", "p"), |_| async move {
            let _ = never_released.await;
            Duration::ZERO
        }));
        drop(guard);
        tokio::time::timeout(
            Duration::from_secs(5),
            inflight.finish(Duration::from_secs(60)),
        )
        .await
        .expect("a cancelled test ends");
        assert!(!inflight.is_running(&key("a", "p")));
        assert!(
            rx[0].try_recv().is_err(),
            "a cancelled test reconciles nothing"
        );
    }

    #[tokio::test]
    async fn a_stopping_controller_waits_for_its_tests_and_reconciles_nothing_more() {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let stopping = async move {
            let _ = stopped.await;
            std::time::Instant::now()
        }
        .boxed()
        .shared();
        let (inflight, mut rx) = InFlight::new(&[None], stopping.clone());
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let d = done.clone();
        assert!(inflight.start(key("a", "p"), |_| async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            d.store(true, std::sync::atomic::Ordering::SeqCst);
            Duration::from_secs(3600)
        }));
        stop.send(()).unwrap();
        tokio::time::timeout(
            Duration::from_secs(5),
            inflight.finish(Duration::from_secs(60)),
        )
        .await
        .expect("finish returns once the test is done, without its retry delay");
        assert!(done.load(std::sync::atomic::Ordering::SeqCst));
        assert!(rx[0].try_recv().is_err());
    }

    #[tokio::test]
    async fn a_test_that_outlasts_the_drain_is_cancelled() {
        let (inflight, mut rx) = InFlight::new(&[None], never());
        let (_keep, never_released) = tokio::sync::oneshot::channel::<()>();
        assert!(inflight.start(key("a", "slow"), |_| async move {
            let _ = never_released.await;
            Duration::ZERO
        }));
        assert!(inflight.start(key("a", "quick"), |_| async { Duration::ZERO }));
        let cancelled = tokio::time::timeout(
            Duration::from_secs(5),
            inflight.finish(Duration::from_millis(200)),
        )
        .await
        .expect("finish returns once the drain's bound has passed");
        assert_eq!(cancelled, 1, "only the test still running is cancelled");
        assert!(!inflight.is_running(&key("a", "slow")));
        assert_eq!(rx[0].try_recv().ok(), Some(key("a", "quick")));
        assert!(
            rx[0].try_recv().is_err(),
            "a cancelled test reconciles nothing"
        );
    }
}
