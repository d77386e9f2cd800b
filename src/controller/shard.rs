//! Sharding: with `--shard-count n`, replica `i` tests only the providers whose stable
//! hash of namespace/name falls in shard `i`, so n replicas share a fleet, each provider
//! tested by exactly one of them. The hash never changes between releases or machines
//! (FNV-1a, not Rust's randomised hasher), so a restart keeps every provider where it was.
//!
//! An OAuth2 provider goes by the name of its token Secret instead: the controller
//! refreshes the tokens there and writes them back, and only within one process is there
//! one refresh of a Secret at a time, and are its own write-backs known for its own. Two
//! providers of one token Secret in two replicas took each other's write-back for a
//! change of their Secret and were tested again; with access tokens of five minutes or
//! less, refreshed at every test, that was a loop of refreshes and logins.

use crate::api::IncomingMailProvider;
use crate::credentials::tokens::oauth2_of;

/// This replica's slice of the providers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl Shard {
    /// All providers.
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    pub fn new(index: u32, count: u32) -> Result<Shard, String> {
        if count == 0 || index >= count {
            return Err(format!(
                "--shard-index {index} must be below --shard-count {count} (and the count at least 1)"
            ));
        }
        Ok(Shard { index, count })
    }

    /// Whether this replica tests `p`.
    pub fn owns(&self, p: &IncomingMailProvider) -> bool {
        let namespace = p.metadata.namespace.as_deref().unwrap_or_default();
        self.count <= 1 || shard_of(namespace, placed_by(p), self.count) == self.index
    }
}

/// The name that places a provider among the shards (with its namespace): that of its
/// token Secret for OAuth2, its own otherwise.
pub fn placed_by(p: &IncomingMailProvider) -> &str {
    match oauth2_of(p) {
        Some(o) => &o.token_secret_ref.name,
        None => p.metadata.name.as_deref().unwrap_or_default(),
    }
}

/// The shard of namespace/name among `count`.
pub fn shard_of(namespace: &str, name: &str, count: u32) -> u32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in namespace.bytes().chain([b'/']).chain(name.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % u64::from(count.max(1))) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(name: &str, auth: serde_json::Value) -> IncomingMailProvider {
        let spec = serde_json::from_value(serde_json::json!({
            "server": {"host": "mail.example.com", "protocol": "IMAP"},
            "authentication": auth,
        }))
        .unwrap();
        let mut p = IncomingMailProvider::new(name, spec);
        p.metadata.namespace = Some("ops".into());
        p
    }

    fn password(name: &str) -> IncomingMailProvider {
        provider(
            name,
            serde_json::json!({"method": "Password", "username": "u", "secretRef": {"name": "login"}}),
        )
    }

    fn oauth2(name: &str, tokens: &str) -> IncomingMailProvider {
        provider(
            name,
            serde_json::json!({"method": "OAuth2", "username": "u", "oauth2": {
                "provider": "Microsoft", "clientId": "c", "tokenSecretRef": {"name": tokens}}}),
        )
    }

    #[test]
    fn every_provider_has_exactly_one_shard() {
        for count in 1..6 {
            let shards: Vec<Shard> = (0..count).map(|i| Shard::new(i, count).unwrap()).collect();
            for n in 0..500 {
                for p in [
                    password(&format!("p{n}")),
                    oauth2(&format!("o{n}"), &format!("t{n}")),
                ] {
                    let owners = shards.iter().filter(|s| s.owns(&p)).count();
                    assert_eq!(
                        owners,
                        1,
                        "{} among {count} shards",
                        p.metadata.name.unwrap()
                    );
                }
            }
        }
    }

    #[test]
    fn the_providers_of_one_token_secret_share_a_shard() {
        // Names that the shards would otherwise split.
        let names: Vec<String> = (0..50).map(|n| format!("mailbox-{n}")).collect();
        assert!(
            names
                .iter()
                .any(|n| shard_of("ops", n, 3) != shard_of("ops", &names[0], 3))
        );
        let shards: Vec<Shard> = (0..3).map(|i| Shard::new(i, 3).unwrap()).collect();
        let owner = |p: &IncomingMailProvider| shards.iter().position(|s| s.owns(p)).unwrap();
        for name in &names {
            assert_eq!(
                owner(&oauth2(name, "team-tokens")) as u32,
                shard_of("ops", "team-tokens", 3),
                "{name}"
            );
            // A password provider goes by its own name, whatever Secret it reads.
            assert_eq!(owner(&password(name)) as u32, shard_of("ops", name, 3));
        }
    }

    #[test]
    fn the_hash_is_stable_and_spreads() {
        // Fixed values: a change here would move providers between replicas on upgrade.
        // FNV-1a of "ops/alice-imap" is 0xc137238fa95dcbf8.
        assert_eq!(shard_of("ops", "alice-imap", 3), 2);
        assert_eq!(shard_of("ops", "alice-imap", 7), 0);
        let mut counts = [0; 3];
        for n in 0..3000 {
            counts[shard_of("team", &format!("mailbox-{n}"), 3) as usize] += 1;
        }
        assert!(
            counts.iter().all(|c| (800..1200).contains(c)),
            "uneven: {counts:?}"
        );
    }

    #[test]
    fn bad_settings_are_refused() {
        assert!(Shard::new(3, 3).is_err());
        assert!(Shard::new(0, 0).is_err());
    }
}
