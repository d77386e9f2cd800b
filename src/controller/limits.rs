//! Per-host bounds on simultaneous tests, so a fleet of providers on one server never
//! opens more connections than that server is willing to take from one client.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct HostLimits {
    per_host: usize,
    hosts: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl HostLimits {
    pub fn new(per_host: usize) -> Self {
        HostLimits {
            per_host: per_host.max(1),
            hosts: Mutex::new(HashMap::new()),
        }
    }

    /// Waits for a slot for `host` (case-insensitive).
    pub async fn acquire(&self, host: &str) -> OwnedSemaphorePermit {
        let sem = {
            let mut hosts = self.hosts.lock().unwrap();
            // Forget hosts nobody is testing, so the map does not grow without bound.
            if hosts.len() > 4096 {
                let per_host = self.per_host;
                hosts.retain(|_, s| s.available_permits() < per_host);
            }
            hosts
                .entry(host.to_ascii_lowercase())
                .or_insert_with(|| Arc::new(Semaphore::new(self.per_host)))
                .clone()
        };
        sem.acquire_owned()
            .await
            .expect("host semaphores are never closed")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_host_gets_at_most_its_share() {
        let limits = HostLimits::new(2);
        let _a = limits.acquire("mail.example.com").await;
        let _b = limits.acquire("MAIL.example.com").await;
        let third = tokio::time::timeout(
            Duration::from_millis(50),
            limits.acquire("mail.example.com"),
        )
        .await;
        assert!(
            third.is_err(),
            "a third simultaneous test of one host must wait"
        );
        let other = tokio::time::timeout(
            Duration::from_millis(50),
            limits.acquire("other.example.com"),
        )
        .await;
        assert!(other.is_ok(), "another host must not wait");
    }
}
