//! Finding the providers that reference a Secret, for each Secret event: the controller's
//! index (`controller::referrers`) beside a scan of every provider, as the controller did
//! before, in the same run. A relist of the Secrets (an API server restart, a new Lease
//! term) sends one event per Secret. Prints a table; asserts nothing; needs no test bed.
//!
//! Run: `scripts/bench referrers` (or `cargo bench --bench referrers`).
//! MAILROOM_BENCH_PROVIDERS=N (default 10000) providers over 10 namespaces, each with its
//! own Secret and one shared CA ConfigMap; one event per Secret.

use std::time::Instant;

use kube::ResourceExt;
use kube::runtime::watcher::Event;
use mailroom::api::{IncomingMailProvider, IncomingMailProviderSpec};
use mailroom::controller::referrers::Referrers;
use mailroom::credentials::{ObjectKind, references};

fn provider(i: usize) -> IncomingMailProvider {
    let spec: IncomingMailProviderSpec = serde_json::from_value(serde_json::json!({
        "server": {"host": "mail.example.com", "protocol": "IMAP"},
        "tls": {"caBundleRef": {"kind": "ConfigMap", "name": "ca"}},
        "authentication": {"method": "Password", "secretRef": {"name": format!("login-{i}")}},
    }))
    .unwrap();
    let mut p = IncomingMailProvider::new(&format!("p-{i}"), spec);
    p.metadata.namespace = Some(namespace(i));
    p
}

fn namespace(i: usize) -> String {
    format!("ns-{}", i % 10)
}

fn main() {
    let n: usize = std::env::var("MAILROOM_BENCH_PROVIDERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let providers: Vec<_> = (0..n).map(provider).map(std::sync::Arc::new).collect();

    let started = Instant::now();
    let index = Referrers::default();
    index.apply(&Event::Init);
    for p in &providers {
        index.apply(&Event::InitApply((**p).clone()));
    }
    index.apply(&Event::InitDone);
    let built = started.elapsed();

    let started = Instant::now();
    let mut found = 0;
    for i in 0..n {
        found += index
            .of(ObjectKind::Secret, &namespace(i), &format!("login-{i}"))
            .len();
    }
    let indexed = started.elapsed();
    assert_eq!(found, n);

    // The baseline: every provider looked at for each event (the store's snapshot, then
    // each provider's references), as before the index.
    let started = Instant::now();
    let mut found = 0;
    for i in 0..n {
        let (ns, name) = (namespace(i), format!("login-{i}"));
        let snapshot = providers.clone();
        found += snapshot
            .iter()
            .filter(|p| p.namespace().as_deref() == Some(ns.as_str()))
            .filter(|p| {
                references(&p.spec)
                    .iter()
                    .any(|r| r.kind == ObjectKind::Secret && r.name == name)
            })
            .count();
    }
    let scanned = started.elapsed();
    assert_eq!(found, n);

    println!("{n} providers over 10 namespaces, one Secret event per provider (a relist):");
    println!("| lookup | time for all events | per event |");
    println!("|---|---|---|");
    let per = |d: std::time::Duration| d / n as u32;
    println!("| index | {indexed:.1?} | {:.2?} |", per(indexed));
    println!(
        "| scan of every provider (before) | {scanned:.1?} | {:.2?} |",
        per(scanned)
    );
    println!(
        "index {:.0} times faster; building it from the providers' list took {built:.1?}",
        scanned.as_secs_f64() / indexed.as_secs_f64()
    );
}
