//! Defaulting that depends on more than one field (ports), and the duration grammar the
//! CRD's rules accept.

use std::time::Duration;

use super::{IncomingMailProviderSpec, Protocol, TlsMode};

/// The endpoint a spec names, after defaulting the port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub protocol: Protocol,
    pub tls_mode: TlsMode,
}

impl Endpoint {
    pub fn of(spec: &IncomingMailProviderSpec) -> Endpoint {
        let protocol = spec.server.protocol;
        let tls_mode = spec.tls.mode;
        let port = spec
            .server
            .port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
            .unwrap_or_else(|| default_port(protocol, tls_mode));
        Endpoint {
            host: spec.server.host.clone(),
            port,
            protocol,
            tls_mode,
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// IMAP 993 / 143 and POP3 995 / 110, by whether TLS starts at once.
pub fn default_port(protocol: Protocol, mode: TlsMode) -> u16 {
    match (protocol, mode) {
        (Protocol::Imap, TlsMode::Implicit) => 993,
        (Protocol::Imap, _) => 143,
        (Protocol::Pop3, TlsMode::Implicit) => 995,
        (Protocol::Pop3, _) => 110,
    }
}

/// The longest `check.interval` (and so `check.timeout`) the CRD accepts, as it is
/// written there and in seconds.
pub const MAX_INTERVAL: &str = "8760h";
const MAX_INTERVAL_SECS: f64 = 8760.0 * 3600.0;

/// Parses the durations the CRD accepts: one or more `<number><unit>` with units ms, s, m
/// and h, such as `30s`, `5m`, `1h30m` or `1.5s` (the subset of Go's syntax that CEL's
/// `duration()` also reads, so the API server and mailroom agree).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a duration such as 30s, 5m or 1h30m");
    if text.is_empty() {
        return Err(bad());
    }
    let mut total = 0f64;
    let mut rest = text;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        if num_len == 0 {
            return Err(bad());
        }
        let value: f64 = rest[..num_len].parse().map_err(|_| bad())?;
        rest = &rest[num_len..];
        let (unit, len) = if rest.starts_with("ms") {
            (0.001, 2)
        } else if rest.starts_with('s') {
            (1.0, 1)
        } else if rest.starts_with('m') {
            (60.0, 1)
        } else if rest.starts_with('h') {
            (3600.0, 1)
        } else {
            return Err(bad());
        };
        total += value * unit;
        rest = &rest[len..];
    }
    if !total.is_finite() {
        return Err(bad());
    }
    if total > MAX_INTERVAL_SECS {
        return Err(format!("{text:?} is longer than {MAX_INTERVAL} (a year)"));
    }
    Ok(Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_default_by_protocol_and_mode() {
        assert_eq!(default_port(Protocol::Imap, TlsMode::Implicit), 993);
        assert_eq!(default_port(Protocol::Imap, TlsMode::StartTls), 143);
        assert_eq!(default_port(Protocol::Imap, TlsMode::None), 143);
        assert_eq!(default_port(Protocol::Pop3, TlsMode::Implicit), 995);
        assert_eq!(default_port(Protocol::Pop3, TlsMode::StartTls), 110);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(
            parse_duration(MAX_INTERVAL).unwrap(),
            Duration::from_secs(8760 * 3600)
        );
        assert!(
            parse_duration("8761h")
                .unwrap_err()
                .contains("longer than 8760h")
        );
        for bad in ["", "5", "m", "5 m", "5d", "-5s", "1h30"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
