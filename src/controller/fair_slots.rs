//! Slots shared fairly between namespaces: a bounded number of tests at once (against one
//! mail host, or in all), where a freed slot goes to the namespace that holds the fewest,
//! and within a namespace to its oldest waiter.
//!
//! Namespaces are tenants: whoever may edit providers in one chooses how long its tests
//! hold a slot (a server that never answers holds one for the whole `check.timeout`). In
//! first-come order, a tenant with a dozen such providers on a shared host (a mail
//! service every team uses) kept every slot of that host, and every other tenant's test
//! of it waited behind them, timeout after timeout. Here another namespace's waiter is
//! served at the next slot freed, and keeps being served first while it holds fewer.
//! tokio's Semaphore is first-come only, hence this small queue of our own.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

pub struct FairSlots {
    capacity: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    in_use: usize,
    /// Slots held, by namespace (only namespaces holding some).
    held: HashMap<Arc<str>, usize>,
    /// Waiters by namespace, oldest first, each with its place in the line of all.
    waiting: HashMap<Arc<str>, VecDeque<(u64, oneshot::Sender<()>)>>,
    next_place: u64,
}

/// One slot, given back when dropped.
pub struct FairSlot {
    slots: Arc<FairSlots>,
    namespace: Arc<str>,
}

impl Drop for FairSlot {
    fn drop(&mut self) {
        self.slots.release(&self.namespace);
    }
}

/// A waiter's end of the line. Dropped before its slot came (a test cancelled while it
/// waited), it leaves the line; dropped just after its slot was handed over but before it
/// looked, it gives that slot back.
struct Waiting<'a> {
    turn: Option<oneshot::Receiver<()>>,
    slots: &'a FairSlots,
    namespace: Arc<str>,
    place: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(mut turn) = self.turn.take() {
            turn.close();
            if turn.try_recv().is_ok() {
                self.slots.release(&self.namespace);
            } else {
                self.slots.leave(&self.namespace, self.place);
            }
        }
    }
}

impl FairSlots {
    pub fn new(capacity: usize) -> FairSlots {
        FairSlots {
            capacity: capacity.max(1),
            state: Mutex::default(),
        }
    }

    /// Waits for a slot for a test of a provider in `namespace`.
    pub async fn acquire(self: &Arc<Self>, namespace: &str) -> FairSlot {
        let namespace: Arc<str> = namespace.into();
        let (turn, place) = {
            let mut state = self.state.lock().unwrap();
            // Free slots are handed to waiters at once, so a free slot means nobody waits.
            if state.in_use < self.capacity {
                state.take(&namespace);
                return FairSlot {
                    slots: self.clone(),
                    namespace,
                };
            }
            let (tx, rx) = oneshot::channel();
            let place = state.next_place;
            state.next_place += 1;
            state
                .waiting
                .entry(namespace.clone())
                .or_default()
                .push_back((place, tx));
            (rx, place)
        };
        let mut waiting = Waiting {
            turn: Some(turn),
            slots: self,
            namespace,
            place,
        };
        if let Some(turn) = waiting.turn.as_mut() {
            // Its sender stays in the line until a hand-over sends on it, or this waiter
            // leaves it: no error while `self` lives.
            turn.await
                .expect("a waiter's sender is dropped only by sending or by its leaving");
        }
        waiting.turn = None;
        FairSlot {
            slots: self.clone(),
            namespace: waiting.namespace.clone(),
        }
    }

    /// Whether no slot is held (nor waited for).
    #[cfg(test)]
    fn idle(&self) -> bool {
        let state = self.state.lock().unwrap();
        state.in_use == 0 && state.waiting.is_empty()
    }

    /// A waiter gone before its turn leaves the line.
    fn leave(&self, namespace: &str, place: u64) {
        let mut state = self.state.lock().unwrap();
        if let Some(line) = state.waiting.get_mut(namespace) {
            line.retain(|(p, _)| *p != place);
            if line.is_empty() {
                state.waiting.remove(namespace);
            }
        }
    }

    fn release(&self, namespace: &str) {
        let mut state = self.state.lock().unwrap();
        state.in_use -= 1;
        if let Some(n) = state.held.get_mut(namespace) {
            *n -= 1;
            if *n == 0 {
                state.held.remove(namespace);
            }
        }
        state.hand_over(self.capacity);
    }
}

impl State {
    fn take(&mut self, namespace: &Arc<str>) {
        self.in_use += 1;
        *self.held.entry(namespace.clone()).or_default() += 1;
    }

    /// Gives free slots to waiters: first to the namespace holding the fewest, the oldest
    /// waiter first between namespaces holding as many. Waiters gone meanwhile are passed.
    fn hand_over(&mut self, capacity: usize) {
        while self.in_use < capacity {
            let Some(namespace) = self
                .waiting
                .iter()
                .filter_map(|(ns, line)| {
                    let held = self.held.get(ns).copied().unwrap_or(0);
                    line.front().map(|(place, _)| ((held, *place), ns))
                })
                .min_by_key(|(rank, _)| *rank)
                .map(|(_, ns)| ns.clone())
            else {
                return;
            };
            let line = self.waiting.get_mut(&namespace).expect("just found");
            let (_, tx) = line.pop_front().expect("not empty");
            if line.is_empty() {
                self.waiting.remove(&namespace);
            }
            if tx.send(()).is_ok() {
                self.take(&namespace);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn waits<F: std::future::Future>(f: F) -> bool {
        tokio::time::timeout(Duration::from_millis(50), f)
            .await
            .is_err()
    }

    #[tokio::test]
    async fn no_more_at_once_than_the_capacity() {
        let slots = Arc::new(FairSlots::new(2));
        let a = slots.acquire("a").await;
        let _b = slots.acquire("b").await;
        assert!(waits(slots.acquire("c")).await);
        drop(a);
        assert!(!waits(slots.acquire("c")).await);
    }

    /// A namespace holding every slot, with more of its tests in line, does not keep the
    /// next slot from another namespace that came later.
    #[tokio::test]
    async fn a_freed_slot_goes_to_the_namespace_holding_fewest() {
        let slots = Arc::new(FairSlots::new(2));
        let held = [slots.acquire("greedy").await, slots.acquire("greedy").await];
        let (tx, mut order) = tokio::sync::mpsc::unbounded_channel();
        let mut waiters = Vec::new();
        for (i, ns) in ["greedy", "greedy", "greedy", "modest"]
            .into_iter()
            .enumerate()
        {
            let (slots, tx) = (slots.clone(), tx.clone());
            waiters.push(tokio::spawn(async move {
                let slot = slots.acquire(ns).await;
                tx.send(format!("{ns}{i}")).unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
                drop(slot);
            }));
            // In line in this order.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let [first, second] = held;
        drop(first);
        assert_eq!(order.recv().await.unwrap(), "modest3");
        drop(second);
        for w in waiters {
            w.await.unwrap();
        }
        drop(tx);
        let mut rest = Vec::new();
        while let Some(next) = order.recv().await {
            rest.push(next);
        }
        // Within a namespace, first come first served.
        assert_eq!(rest, ["greedy0", "greedy1", "greedy2"]);
        assert!(slots.idle());
    }

    /// A waiter cancelled in line leaves it, and one cancelled just after its slot was
    /// handed over gives the slot back: no slot is lost either way.
    #[tokio::test]
    async fn cancelled_waiters_lose_no_slot() {
        let slots = Arc::new(FairSlots::new(1));
        let held = slots.acquire("a").await;
        assert!(waits(slots.acquire("b")).await, "cancelled in line");
        assert!(
            slots.state.lock().unwrap().waiting.is_empty(),
            "b left the line"
        );
        drop(held);
        assert!(slots.idle());
        let held = soon(slots.acquire("c")).await;

        let mut handed = Box::pin(slots.acquire("d"));
        assert!(futures::poll!(handed.as_mut()).is_pending());
        drop(held); // the slot goes to d, which has not looked yet
        drop(handed);
        assert!(
            slots.idle(),
            "the slot handed to a dropped waiter came back"
        );
        let _again = soon(slots.acquire("e")).await;
    }

    async fn soon<F: std::future::Future>(f: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(1), f)
            .await
            .expect("a free slot is given at once")
    }
}
