//! Resolving the host and opening the TCP connection, with OS errors turned into reasons.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::Instrument;

use super::classify::{self, human};
use super::{Failure, Step};
use crate::api::Reason;

/// The addresses of `host` (an IP literal resolves to itself), in the resolver's order.
pub(crate) async fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, Failure> {
    match tokio::net::lookup_host((host, port)).await {
        Ok(found) => {
            let mut addrs: Vec<SocketAddr> = Vec::new();
            for addr in found {
                if !addrs.contains(&addr) {
                    addrs.push(addr);
                }
            }
            if addrs.is_empty() {
                Err(Failure::new(
                    Reason::DnsResolutionFailed,
                    Step::Resolve,
                    format!("could not resolve {host}: the name has no addresses"),
                ))
            } else {
                Ok(interleaved(addrs))
            }
        }
        Err(err) => Err(classify::resolve_failure(host, &err)),
    }
}

/// The addresses in the order to try them: the resolver's first, then the two families
/// in turn (RFC 8305 §4), so that a family that does not work here (IPv6, in many
/// clusters) holds the other back by one attempt, not by all of its own.
fn interleaved(addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
    let Some(first) = addrs.first() else {
        return addrs;
    };
    let first_v6 = first.is_ipv6();
    let (mut same, mut other): (std::collections::VecDeque<_>, std::collections::VecDeque<_>) =
        addrs.into_iter().partition(|a| a.is_ipv6() == first_v6);
    let mut out = Vec::with_capacity(same.len() + other.len());
    while !same.is_empty() || !other.is_empty() {
        out.extend(same.pop_front());
        out.extend(other.pop_front());
    }
    out
}

/// "127.0.0.1, ::1".
pub(crate) fn describe_addrs(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(|a| a.ip().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// How one address failed.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Attempt {
    pub addr: SocketAddr,
    pub reason: Reason,
    pub words: String,
}

/// Tries the addresses in order, giving each an equal share of the time left (so one
/// address that drops packets does not starve the next).
pub(crate) async fn connect(
    addrs: &[SocketAddr],
    endpoint: &str,
    deadline: Instant,
) -> Result<(TcpStream, SocketAddr), Failure> {
    let mut attempts = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let share = left / (addrs.len() - i) as u32;
        let attempt = tokio::time::timeout(share, TcpStream::connect(addr))
            .instrument(tracing::debug_span!("connect", %addr));
        match attempt.await {
            Ok(Ok(stream)) => {
                // Commands are small and answered one at a time.
                let _ = stream.set_nodelay(true);
                return Ok((stream, *addr));
            }
            Ok(Err(err)) => attempts.push(Attempt {
                addr: *addr,
                reason: classify::connect_reason(&err),
                words: classify::connect_error_words(&err),
            }),
            Err(_) => attempts.push(Attempt {
                addr: *addr,
                reason: Reason::ConnectionTimedOut,
                words: format!(
                    "timed out (no answer within {}: a firewall may drop the packets, or the host is down)",
                    human(share)
                ),
            }),
        }
    }
    Err(connect_failure(endpoint, &attempts))
}

/// One failure from the attempts on every address.
pub(crate) fn connect_failure(endpoint: &str, attempts: &[Attempt]) -> Failure {
    let Some(decisive) = attempts
        .iter()
        .max_by_key(|a| classify::connect_priority(a.reason))
    else {
        return Failure::new(
            Reason::ConnectionTimedOut,
            Step::Connect,
            format!("no time was left to connect to {endpoint}"),
        );
    };
    let message = match attempts {
        [only] if endpoint == only.addr.to_string() => {
            format!("TCP connection to {endpoint} {}", only.words)
        }
        [only] => format!(
            "TCP connection to {endpoint} ({}) {}",
            only.addr.ip(),
            only.words
        ),
        all => format!(
            "TCP connection to {endpoint} failed on every address: {}",
            all.iter()
                .map(|a| format!("{} {}", a.addr.ip(), a.words))
                .collect::<Vec<_>>()
                .join("; ")
        ),
    };
    Failure::new(decisive.reason, Step::Connect, message)
}

/// The connect step ran out of the whole test's time.
pub(crate) fn connect_timeout(endpoint: &str, waited: Duration, total: Duration) -> Failure {
    Failure::new(
        Reason::ConnectionTimedOut,
        Step::Connect,
        format!(
            "no answer from {endpoint} to a TCP connection {} (a firewall may drop the packets, or the host is down)",
            classify::within(waited, total)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(addr: &str, reason: Reason, words: &str) -> Attempt {
        Attempt {
            addr: addr.parse().unwrap(),
            reason,
            words: words.into(),
        }
    }

    #[test]
    fn the_families_are_tried_in_turn_from_the_resolvers_first() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let resolved = vec![
            a("[2001:db8::1]:993"),
            a("[2001:db8::2]:993"),
            a("192.0.2.1:993"),
            a("192.0.2.2:993"),
            a("192.0.2.3:993"),
        ];
        assert_eq!(
            interleaved(resolved),
            [
                a("[2001:db8::1]:993"),
                a("192.0.2.1:993"),
                a("[2001:db8::2]:993"),
                a("192.0.2.2:993"),
                a("192.0.2.3:993"),
            ]
        );
        let v4_only = vec![a("192.0.2.2:993"), a("192.0.2.1:993")];
        assert_eq!(interleaved(v4_only.clone()), v4_only);
        assert!(interleaved(Vec::new()).is_empty());
    }

    #[test]
    fn one_address() {
        let f = connect_failure(
            "127.0.0.1:1",
            &[attempt(
                "127.0.0.1:1",
                Reason::ConnectionRefused,
                "refused (nothing listens on that port)",
            )],
        );
        assert_eq!(f.reason, Reason::ConnectionRefused);
        assert_eq!(
            f.message,
            "TCP connection to 127.0.0.1:1 refused (nothing listens on that port)"
        );
        let f = connect_failure(
            "mail.test:993",
            &[attempt(
                "192.0.2.1:993",
                Reason::ConnectionTimedOut,
                "timed out",
            )],
        );
        assert_eq!(
            f.message,
            "TCP connection to mail.test:993 (192.0.2.1) timed out"
        );
    }

    #[test]
    fn several_addresses_refusal_wins() {
        let f = connect_failure(
            "localhost:1",
            &[
                attempt(
                    "[::1]:1",
                    Reason::NetworkUnreachable,
                    "network unreachable (no route)",
                ),
                attempt("127.0.0.1:1", Reason::ConnectionRefused, "refused"),
            ],
        );
        assert_eq!(f.reason, Reason::ConnectionRefused);
        assert_eq!(
            f.message,
            "TCP connection to localhost:1 failed on every address: ::1 network unreachable (no route); 127.0.0.1 refused"
        );
    }

    #[tokio::test]
    async fn refused_and_resolved() {
        let addrs = resolve("127.0.0.1", 1).await.unwrap();
        assert_eq!(describe_addrs(&addrs), "127.0.0.1");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let f = connect(&[addr], &addr.to_string(), deadline)
            .await
            .unwrap_err();
        assert_eq!(f.reason, Reason::ConnectionRefused);
    }

    #[tokio::test]
    async fn unresolvable_names_fail() {
        let f = resolve("no-such-host.invalid", 993).await.unwrap_err();
        assert_eq!(f.reason, Reason::DnsResolutionFailed);
        assert!(
            f.message
                .starts_with("could not resolve no-such-host.invalid: "),
            "{}",
            f.message
        );
    }
}
