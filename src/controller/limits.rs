//! Bounds on what runs at once: tests per mail host, so a fleet of providers on one
//! server never opens more connections than that server is willing to take from one
//! client; and writes to the API server, by how much they matter.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{Semaphore, SemaphorePermit};

use super::fair_slots::{FairSlot, FairSlots};

pub struct HostLimits {
    per_host: usize,
    hosts: Mutex<HashMap<String, Arc<FairSlots>>>,
}

impl HostLimits {
    pub fn new(per_host: usize) -> Self {
        HostLimits {
            per_host: per_host.max(1),
            hosts: Mutex::new(HashMap::new()),
        }
    }

    /// Waits for a slot for `host`, however it is spelt (see [`host_key`]), for a test of
    /// a provider in `namespace`: shared fairly between namespaces (see [`FairSlots`]).
    pub async fn acquire(&self, host: &str, namespace: &str) -> FairSlot {
        let slots = {
            let mut hosts = self.hosts.lock().unwrap();
            // Forget hosts nobody is testing or waiting for, so the map does not grow
            // without bound. By who holds them, not by what they count: a caller that has
            // just taken a host's slots from the map but not yet its turn holds them too,
            // and forgetting them then would give the host a second set.
            if hosts.len() > 4096 {
                hosts.retain(|_, s| Arc::strong_count(s) > 1);
            }
            hosts
                .entry(host_key(host))
                .or_insert_with(|| Arc::new(FairSlots::new(self.per_host)))
                .clone()
        };
        slots.acquire(namespace).await
    }
}

/// One server's key however its name is spelt: DNS names without case or a final dot
/// (`Mail.Example.com.` is `mail.example.com`), IP addresses in their one written form
/// (`2001:DB8:0:0:0:0:0:1` is `2001:db8::1`).
fn host_key(host: &str) -> String {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<std::net::IpAddr>() {
        return ip.to_string();
    }
    host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase()
}

/// What a write to the API server carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Write {
    /// A status that changed, or an Event of a transition: what people wait for.
    Change,
    /// The `lastCheckTime` heartbeat of an unchanged status, or Checking: worth writing,
    /// but never ahead of a change.
    Background,
}

/// Status writes and Events in flight. Tests run outside reconciles (see `inflight`), so
/// without a bound 10,000 providers applied at once would each open a request when their
/// result came: thousands of connections, and the memory they hold. Background writes
/// take at most a few of the slots, so that a Secret fixed during a wave of heartbeats
/// shows its new status in a second, not behind thousands of unchanged ones.
pub struct WriteSlots {
    all: Semaphore,
    background: Semaphore,
}

/// A slot for one write, given back when dropped.
pub struct WriteSlot<'a> {
    _all: SemaphorePermit<'a>,
    _background: Option<SemaphorePermit<'a>>,
}

impl WriteSlots {
    pub fn new(all: usize, background: usize) -> Self {
        WriteSlots {
            all: Semaphore::new(all.max(1)),
            background: Semaphore::new(background.clamp(1, all.max(1))),
        }
    }

    pub async fn acquire(&self, what: Write) -> WriteSlot<'_> {
        let background = match what {
            Write::Change => None,
            Write::Background => Some(
                self.background
                    .acquire()
                    .await
                    .expect("write semaphores are never closed"),
            ),
        };
        WriteSlot {
            _all: self
                .all
                .acquire()
                .await
                .expect("write semaphores are never closed"),
            _background: background,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn background_writes_leave_slots_to_changes() {
        let slots = WriteSlots::new(3, 1);
        let _heartbeat = slots.acquire(Write::Background).await;
        let second =
            tokio::time::timeout(Duration::from_millis(50), slots.acquire(Write::Background)).await;
        assert!(second.is_err(), "a second background write must wait");
        let _a = slots.acquire(Write::Change).await;
        let _b = slots.acquire(Write::Change).await;
        let fourth =
            tokio::time::timeout(Duration::from_millis(50), slots.acquire(Write::Change)).await;
        assert!(fourth.is_err(), "no more writes than slots in all");
    }

    #[tokio::test]
    async fn one_server_spelt_two_ways_shares_its_slots() {
        for (a, b) in [
            ("mail.example.com", "Mail.Example.com."),
            ("2001:db8::1", "2001:DB8:0:0:0:0:0:1"),
        ] {
            let limits = HostLimits::new(1);
            let _held = limits.acquire(a, "ns").await;
            let second =
                tokio::time::timeout(Duration::from_millis(50), limits.acquire(b, "ns")).await;
            assert!(
                second.is_err(),
                "{b:?} is the server {a:?}: its test must wait"
            );
        }
        assert_ne!(host_key("mail.example.com"), host_key("mail.example.org"));
    }

    #[tokio::test]
    async fn a_host_gets_at_most_its_share() {
        let limits = HostLimits::new(2);
        let _a = limits.acquire("mail.example.com", "ns").await;
        let _b = limits.acquire("MAIL.example.com", "ns").await;
        let third = tokio::time::timeout(
            Duration::from_millis(50),
            limits.acquire("mail.example.com", "ns"),
        )
        .await;
        assert!(
            third.is_err(),
            "a third simultaneous test of one host must wait"
        );
        let other = tokio::time::timeout(
            Duration::from_millis(50),
            limits.acquire("other.example.com", "ns"),
        )
        .await;
        assert!(other.is_ok(), "another host must not wait");
    }
}
