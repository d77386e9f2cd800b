//! Sharding: with `--shard-count n`, replica `i` tests only the providers whose stable
//! hash of namespace/name falls in shard `i`, so n replicas share a fleet, each provider
//! tested by exactly one of them. The hash never changes between releases or machines
//! (FNV-1a, not Rust's randomised hasher), so a restart keeps every provider where it was.

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

    pub fn owns(&self, namespace: &str, name: &str) -> bool {
        self.count <= 1 || shard_of(namespace, name, self.count) == self.index
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

    #[test]
    fn every_provider_has_exactly_one_shard() {
        for count in 1..6 {
            let shards: Vec<Shard> = (0..count).map(|i| Shard::new(i, count).unwrap()).collect();
            for n in 0..500 {
                let name = format!("p{n}");
                let owners = shards.iter().filter(|s| s.owns("ops", &name)).count();
                assert_eq!(owners, 1, "{name} among {count} shards");
            }
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
