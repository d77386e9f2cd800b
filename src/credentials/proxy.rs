//! The way to a token endpoint: straight there, or through the HTTP proxy that
//! `HTTPS_PROXY`/`HTTP_PROXY` name unless `NO_PROXY` exempts the host, as Go's
//! `http.ProxyFromEnvironment` (golang.org/x/net/http/httpproxy) decides, since that is
//! what kubectl, Helm and the rest of a cluster's tooling follow. An https target goes
//! through a `CONNECT` tunnel; a plain-http one (loopback, or allowUnencrypted) is sent
//! to the proxy in absolute form. Only token requests use this; mail connections do not.
//!
//! The proxy's user info becomes a `Proxy-Authorization` header and nothing else: every
//! message names the proxy as `http://host:port` and the variable it came from.

use std::net::IpAddr;
use std::time::Duration;

use base64::Engine;
use secrecy::zeroize::Zeroizing;
use secrecy::{ExposeSecret, SecretString};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::http::{Url, parse_url};

/// The most bytes read of a proxy's answer to `CONNECT` before the tunnel.
const MAX_CONNECT_REPLY: usize = 8 * 1024;

/// The proxy settings of the environment, as read once per request. The proxy URLs
/// may hold a password, so `Debug` shows only the variables' names.
#[derive(Debug, Default, Clone)]
pub struct ProxyEnv {
    /// For https URLs: the variable's name and value.
    pub https: Option<(&'static str, SecretString)>,
    /// For http URLs.
    pub http: Option<(&'static str, SecretString)>,
    pub no_proxy: String,
}

impl ProxyEnv {
    pub fn from_env() -> ProxyEnv {
        ProxyEnv::from_lookup(|name| std::env::var(name).ok())
    }

    /// Go's rules: the upper-case name first, then the lower-case one, an empty value
    /// counting as unset; `HTTP_PROXY` is honoured too (Go ignores it only under CGI,
    /// which a controller never is). curl differs (lower case first, no `HTTP_PROXY`).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> ProxyEnv {
        let any = |names: [&'static str; 2]| {
            names
                .into_iter()
                .find_map(|n| get(n).filter(|v| !v.trim().is_empty()).map(|v| (n, v)))
        };
        let secret =
            |found: Option<(&'static str, String)>| found.map(|(n, v)| (n, SecretString::from(v)));
        ProxyEnv {
            https: secret(any(["HTTPS_PROXY", "https_proxy"])),
            http: secret(any(["HTTP_PROXY", "http_proxy"])),
            no_proxy: any(["NO_PROXY", "no_proxy"])
                .map(|(_, v)| v)
                .unwrap_or_default(),
        }
    }

    /// The proxy for `target`, if any; an error if the variable that applies is unusable.
    pub fn proxy_for(&self, target: &Url) -> Result<Option<Proxy>, String> {
        let chosen = if target.tls { &self.https } else { &self.http };
        let Some((var, value)) = chosen else {
            return Ok(None);
        };
        if bypass(&self.no_proxy, &target.host, target.port) {
            return Ok(None);
        }
        parse_proxy(var, value.expose_secret()).map(Some)
    }
}

/// An HTTP proxy. `Debug` and [`Proxy::shown`] leave the credentials out.
#[derive(Debug)]
pub struct Proxy {
    pub host: String,
    pub port: u16,
    /// Which variable named it, for messages.
    pub var: &'static str,
    /// `Basic …` from the URL's user info.
    authorization: Option<SecretString>,
}

impl Proxy {
    /// `http://host:port (VAR)`: how messages name it.
    pub fn shown(&self) -> String {
        format!("http://{} ({})", authority(&self.host, self.port), self.var)
    }

    /// The header line to send to the proxy (empty without credentials), CRLF included.
    pub fn authorization_line(&self) -> Zeroizing<String> {
        Zeroizing::new(match &self.authorization {
            Some(value) => format!("Proxy-Authorization: {}\r\n", value.expose_secret()),
            None => String::new(),
        })
    }
}

/// `host:port`, with brackets around an IPv6 address.
pub fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Parses `http://[user[:password]@]host[:port][/]` (no scheme means http, as Go
/// assumes; the port defaults to 80). The error names the variable and never repeats
/// the value, which may hold a password.
pub fn parse_proxy(var: &'static str, value: &str) -> Result<Proxy, String> {
    let bad = |why: &str| format!("{var} is not a usable proxy URL: {why}");
    let value = value.trim();
    let rest = match value.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
        Some((scheme, _)) if scheme.eq_ignore_ascii_case("https") => {
            return Err(bad(
                "https:// proxies are not supported; give the proxy as http://host:port (the tunnel to the token endpoint is TLS all the same)",
            ));
        }
        Some(_) => return Err(bad("only http:// proxies are supported")),
        None => value,
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority_part, path) = rest.split_at(end);
    if !matches!(path, "" | "/") {
        return Err(bad("a proxy URL has no path"));
    }
    let (userinfo, host_port) = match authority_part.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority_part),
    };
    // The host part holds no credentials, so its own parser's words may be shown.
    let url = parse_url(&format!("http://{host_port}")).map_err(|e| {
        let why = e.rsplit(": ").next().unwrap_or_default();
        bad(&format!("{host_port:?}: {why}"))
    })?;
    let authorization = match userinfo {
        None => None,
        Some(info) => {
            let (user, password) = info.split_once(':').unwrap_or((info, ""));
            let mut plain =
                percent_decode(user).ok_or_else(|| bad("bad %-escape in the user name"))?;
            plain.push(b':');
            plain.extend_from_slice(
                &percent_decode(password).ok_or_else(|| bad("bad %-escape in the password"))?,
            );
            let encoded =
                Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(plain.as_slice()));
            Some(SecretString::from(format!("Basic {}", encoded.as_str())))
        }
    };
    Ok(Proxy {
        host: url.host,
        port: url.port,
        var,
        authorization,
    })
}

fn percent_decode(text: &str) -> Option<Zeroizing<Vec<u8>>> {
    let bytes = text.as_bytes();
    let mut out = Zeroizing::new(Vec::with_capacity(bytes.len()));
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

/// Whether `host` (a name or an IP address without brackets) at `port` goes direct.
/// `localhost` and loopback addresses always do (as in Go, whatever `NO_PROXY` says).
/// `NO_PROXY` is a comma list of: `*` (everything); an IP address or CIDR range; a
/// domain, matching itself and its subdomains (`example.com`), or only its subdomains
/// (`.example.com`, `*.example.com`); each but a range optionally with `:port`. Names are
/// compared as written, never resolved.
pub fn bypass(no_proxy: &str, host: &str, port: u16) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let ip: Option<IpAddr> = host.parse().ok();
    if names_loopback(&host) {
        return true;
    }
    no_proxy
        .split(',')
        .map(|e| e.trim().to_ascii_lowercase())
        .filter(|e| !e.is_empty())
        .any(|entry| entry_matches(&entry, &host, ip, port))
}

fn entry_matches(entry: &str, host: &str, ip: Option<IpAddr>, port: u16) -> bool {
    if entry == "*" {
        return true;
    }
    if let Some((net, bits)) = entry.split_once('/') {
        let (Ok(net), Ok(bits), Some(ip)) = (net.parse::<IpAddr>(), bits.parse::<u8>(), ip) else {
            return false;
        };
        return in_range(ip, net, bits);
    }
    let (name, entry_port) = split_port(entry);
    if entry_port.is_some_and(|p| p != port) {
        return false;
    }
    if let Ok(addr) = name.parse::<IpAddr>() {
        return ip == Some(addr);
    }
    let name = name.strip_prefix('*').unwrap_or(name).trim_end_matches('.');
    match name.strip_prefix('.') {
        Some(suffix) => !suffix.is_empty() && host.ends_with(&format!(".{suffix}")),
        None => !name.is_empty() && (host == name || host.ends_with(&format!(".{name}"))),
    }
}

/// `name[:port]`, `[v6][:port]` or a bare IPv6 address; a port that is not a number
/// leaves the entry as it is (it then matches nothing).
fn split_port(entry: &str) -> (&str, Option<u16>) {
    if let Some(v6) = entry.strip_prefix('[')
        && let Some((addr, after)) = v6.split_once(']')
    {
        return (addr, after.strip_prefix(':').and_then(|p| p.parse().ok()));
    }
    if entry.matches(':').count() == 1 {
        let (name, p) = entry.split_once(':').expect("one colon");
        if let Ok(p) = p.parse() {
            return (name, Some(p));
        }
    }
    (entry, None)
}

fn in_range(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip.to_canonical(), net) {
        (IpAddr::V4(a), IpAddr::V4(n)) if bits <= 32 => {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) if bits <= 128 => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// The connection a request to `target` is written to: straight to it, to the proxy
/// (plain HTTP, absolute form), or a tunnel through the proxy (https), ready for TLS.
/// The caller's deadline bounds the whole of it.
pub async fn open(
    via: Option<&Proxy>,
    target: &Url,
    loopback: Loopback,
) -> Result<TcpStream, String> {
    // Through a proxy the proxy resolves the name; one in this pod would reach its
    // loopback too. A name resolved here to this host is refused; one that does not
    // resolve here, or not soon (a name only the proxy's DNS knows), goes on to the proxy.
    if via.is_some() && loopback == Loopback::Refused {
        let lookup = tokio::net::lookup_host((target.host.as_str(), target.port));
        if let Ok(Ok(addrs)) = tokio::time::timeout(Duration::from_secs(2), lookup).await {
            refused_here(target, &addrs.collect::<Vec<_>>())?;
        }
    }
    match via {
        Some(proxy) if target.tls => tunnel(proxy, target).await,
        Some(proxy) => TcpStream::connect((proxy.host.as_str(), proxy.port))
            .await
            .map_err(|e| format!("connecting to the proxy {}: {e}", proxy.shown())),
        None => direct(target, loopback).await,
    }
}

/// Whether a request may go to this host's own loopback. The controller refuses it
/// unless told otherwise: whoever may edit a provider names its token endpoint, and on
/// the controller pod's loopback listen the admin ports of its sidecars (a service
/// mesh's proxy stops at a POST to `/quitquitquit`), which no network policy guards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loopback {
    Allowed,
    Refused,
}

/// Whether `host` (a name or an IP address without brackets, as written in a URL) names
/// this host's loopback: `localhost` (and its subdomains, RFC 6761), a loopback address,
/// or the unspecified one, which Linux connects to loopback.
fn names_loopback(host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    host == "localhost"
        || host.ends_with(".localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| {
            let ip = ip.to_canonical();
            ip.is_loopback() || ip.is_unspecified()
        })
}

/// Whether `target`'s host, as written, is this host: a name of its loopback (see
/// [`names_loopback`]) or one of its addresses. A name that resolves here is for
/// [`open`] to find, at the addresses it connects to.
pub fn names_this_host(target: &Url) -> bool {
    names_loopback(&target.host)
        || target
            .host
            .parse::<IpAddr>()
            .is_ok_and(|ip| is_this_host((ip, target.port).into()))
}

/// Whether a connection to `addr` stays on this host: loopback, unspecified, or one of
/// its own addresses (a pod's IP, its IPv6 link-local one; no NetworkPolicy sees such a
/// connection either). The kernel says: a UDP socket "connected" there (no packet is
/// sent) takes the address itself as its source only when the address is this host's.
fn is_this_host(addr: std::net::SocketAddr) -> bool {
    let ip = addr.ip().to_canonical();
    if ip.is_loopback() || ip.is_unspecified() {
        return true;
    }
    let any: std::net::SocketAddr = match addr {
        std::net::SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        std::net::SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    std::net::UdpSocket::bind(any)
        .and_then(|s| s.connect(addr).and_then(|()| s.local_addr()))
        .is_ok_and(|local| local.ip().to_canonical() == ip)
}

/// With loopback refused, the refusal for `target` when one of `addrs` is this host's.
fn refused_here(target: &Url, addrs: &[std::net::SocketAddr]) -> Result<(), String> {
    match addrs.iter().find(|a| is_this_host(**a)) {
        Some(own) => Err(format!(
            "{} is this pod's own address ({}): {LOOPBACK_REFUSED}",
            authority(&target.host, target.port),
            own.ip()
        )),
        None => Ok(()),
    }
}

/// Connects to `target` itself, to the addresses its name resolves to in turn; refused
/// before any byte is sent when one of them is this host's and `loopback` says so (the
/// addresses checked are the ones connected to: a name cannot resolve anew between).
async fn direct(target: &Url, loopback: Loopback) -> Result<TcpStream, String> {
    let shown = authority(&target.host, target.port);
    let addrs: Vec<_> = tokio::net::lookup_host((target.host.as_str(), target.port))
        .await
        .map_err(|e| format!("resolving {shown}: {e}"))?
        .collect();
    if loopback == Loopback::Refused {
        refused_here(target, &addrs)?;
    }
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(e) => format!("connecting to {shown}: {e}"),
        None => format!("resolving {shown}: no address"),
    })
}

/// Why the controller sends no OAuth2 request to its own pod, and what allows it.
pub const LOOPBACK_REFUSED: &str = "the controller sends no OAuth2 request to its own pod, where sidecars' admin ports listen, unless it runs with --allow-oauth2-loopback (for an identity provider in a sidecar)";

/// Connects to `proxy` and asks it for a tunnel to `target`.
async fn tunnel(proxy: &Proxy, target: &Url) -> Result<TcpStream, String> {
    let shown = proxy.shown();
    let mut tcp = TcpStream::connect((proxy.host.as_str(), proxy.port))
        .await
        .map_err(|e| format!("connecting to the proxy {shown}: {e}"))?;
    let to = authority(&target.host, target.port);
    let mut request = Zeroizing::new(format!(
        "CONNECT {to} HTTP/1.1\r\nHost: {to}\r\nUser-Agent: mailroom\r\n"
    ));
    request.push_str(&proxy.authorization_line());
    request.push_str("\r\n");
    let talking = |e: std::io::Error| format!("asking the proxy {shown} for a tunnel to {to}: {e}");
    tcp.write_all(request.as_bytes()).await.map_err(talking)?;
    let head = read_head(&mut tcp).await.map_err(talking)?;
    let status_line = head.lines().next().unwrap_or_default().trim();
    match connect_status(status_line) {
        Some(200..=299) => Ok(tcp),
        Some(_) => {
            let words = status_line.split_once(' ').map_or("", |(_, s)| s);
            Err(format!("the proxy {shown} refused CONNECT {to}: {words}"))
        }
        None => Err(format!(
            "the proxy {shown} answered CONNECT {to} with something that is not HTTP: {status_line:?}"
        )),
    }
}

/// The status of a proxy's answer line, if it is HTTP/1.x.
pub fn connect_status(status_line: &str) -> Option<u16> {
    let mut words = status_line.split_whitespace();
    let version = words.next()?;
    let status = words.next()?.parse().ok()?;
    version.starts_with("HTTP/1.").then_some(status)
}

/// Reads up to the blank line that ends a response head, a byte at a time so that
/// nothing of the tunnel's own traffic is taken.
async fn read_head(tcp: &mut TcpStream) -> std::io::Result<String> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") && !head.ends_with(b"\n\n") {
        if head.len() >= MAX_CONNECT_REPLY {
            return Err(std::io::Error::other(format!(
                "an answer longer than {MAX_CONNECT_REPLY} bytes"
            )));
        }
        let mut byte = [0u8];
        if tcp.read(&mut byte).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(text: &str) -> Url {
        parse_url(text).unwrap()
    }

    /// Through a proxy too: a name that resolves here to this host's own address (its
    /// host name, as /etc/hosts has it) is refused before the proxy is asked.
    #[tokio::test]
    async fn through_a_proxy_a_name_of_this_host_is_refused_before_asking_it() {
        let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy_url = format!("http://127.0.0.1:{}", proxy.local_addr().unwrap().port());
        let env = ProxyEnv::from_lookup(|name| (name == "HTTP_PROXY").then(|| proxy_url.clone()));
        let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        let name = name.trim();
        assert!(
            tokio::net::lookup_host((name, 8080))
                .await
                .is_ok_and(|mut a| a.next().is_some()),
            "this test needs the host name {name:?} to resolve (see /etc/hosts), as the OAuth2 proxy tests do"
        );
        let target = super::super::http::parse_url(&format!("http://{name}:8080/token")).unwrap();
        let via = env.proxy_for(&target).unwrap();
        assert!(via.is_some(), "the host name goes through the proxy");
        let err = open(via.as_ref(), &target, Loopback::Refused)
            .await
            .unwrap_err();
        assert!(err.contains("own address"), "{err}");
        let asked =
            tokio::time::timeout(std::time::Duration::from_millis(200), proxy.accept()).await;
        assert!(asked.is_err(), "the proxy was asked");
    }

    /// A name that resolves to this host is refused when loopback is, before any byte
    /// is sent (the addresses checked are those connected to); allowed, it connects.
    #[tokio::test]
    async fn a_name_resolving_to_this_host_is_refused_before_connecting() {
        assert!(names_loopback("LocalHost.") && names_loopback("::ffff:127.0.0.1"));
        assert!(names_loopback("mail.localhost") && !names_loopback("localhost.example.com"));
        assert!(is_this_host("[::1]:80".parse().unwrap()));
        assert!(
            !is_this_host("192.0.2.1:80".parse().unwrap()),
            "TEST-NET-1 is no one's"
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let target =
            super::super::http::parse_url(&format!("http://localhost:{port}/token")).unwrap();
        let err = open(None, &target, Loopback::Refused).await.unwrap_err();
        assert!(
            err.contains("own address") && err.contains("--allow-oauth2-loopback"),
            "{err}"
        );
        let accepted =
            tokio::time::timeout(std::time::Duration::from_millis(200), listener.accept()).await;
        assert!(accepted.is_err(), "a connection was made");
        let unspecified =
            super::super::http::parse_url(&format!("http://0.0.0.0:{port}/")).unwrap();
        assert!(open(None, &unspecified, Loopback::Refused).await.is_err());
        open(None, &target, Loopback::Allowed).await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), listener.accept())
            .await
            .unwrap()
            .unwrap();
    }

    #[test]
    fn loopback_always_goes_direct() {
        for host in [
            "localhost",
            "LOCALHOST",
            "127.0.0.1",
            "127.8.9.1",
            "::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(bypass("", host, 443), "{host}");
        }
        assert!(!bypass("", "vm", 443));
        assert!(!bypass("", "10.0.0.1", 443));
    }

    #[test]
    fn no_proxy_entries() {
        let list = " Example.com, .corp.test,*.star.test, 10.1.0.0/16, 192.0.2.7, [2001:db8::1], fd00::/8, api.test:8443 ";
        let direct = |host: &str, port| bypass(list, host, port);
        // A domain without a dot: itself and its subdomains.
        assert!(direct("example.com", 443));
        assert!(direct("login.EXAMPLE.com", 443));
        assert!(!direct("notexample.com", 443));
        // With a leading dot or `*.`: subdomains only.
        assert!(direct("a.corp.test", 443));
        assert!(!direct("corp.test", 443));
        assert!(direct("a.b.star.test", 443));
        assert!(!direct("star.test", 443));
        // Addresses and ranges, never names resolved to them.
        assert!(direct("10.1.200.3", 443));
        assert!(!direct("10.2.0.1", 443));
        assert!(direct("192.0.2.7", 80));
        assert!(!direct("192.0.2.8", 80));
        assert!(direct("2001:db8::1", 443));
        assert!(direct("fd00::2", 443));
        assert!(!direct("fe80::1", 443));
        // A port narrows an entry.
        assert!(direct("api.test", 8443));
        assert!(!direct("api.test", 443));
        assert!(bypass("*", "login.microsoftonline.com", 443));
        assert!(!bypass(" , ", "login.microsoftonline.com", 443));
        assert!(bypass("[2001:db8::1]:443", "2001:db8::1", 443));
        assert!(!bypass("[2001:db8::1]:443", "2001:db8::1", 8443));
    }

    #[test]
    fn environment_follows_go() {
        let env = |vars: &[(&str, &str)]| {
            let vars: Vec<(String, String)> = vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            ProxyEnv::from_lookup(move |n| {
                vars.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone())
            })
        };
        let both = env(&[
            ("HTTPS_PROXY", "http://upper:1"),
            ("https_proxy", "http://lower:2"),
            ("http_proxy", "http://plain:3"),
            ("no_proxy", ".corp.test"),
        ]);
        let shown = |v: &Option<(&'static str, SecretString)>| {
            v.as_ref().map(|(n, s)| (*n, s.expose_secret().to_string()))
        };
        assert_eq!(
            shown(&both.https),
            Some(("HTTPS_PROXY", "http://upper:1".into()))
        );
        assert_eq!(
            shown(&both.http),
            Some(("http_proxy", "http://plain:3".into()))
        );
        assert_eq!(both.no_proxy, ".corp.test");
        let empty_upper = env(&[("HTTPS_PROXY", ""), ("https_proxy", "http://lower:2")]);
        assert_eq!(empty_upper.https.unwrap().0, "https_proxy");

        // https URLs use HTTPS_PROXY only, http URLs HTTP_PROXY only.
        let only_http = env(&[("HTTP_PROXY", "http://plain:3")]);
        assert!(
            only_http
                .proxy_for(&url("https://login.test/t"))
                .unwrap()
                .is_none()
        );
        let p = only_http
            .proxy_for(&url("http://tokens.test/t"))
            .unwrap()
            .unwrap();
        assert_eq!(p.shown(), "http://plain:3 (HTTP_PROXY)");
        assert!(
            only_http
                .proxy_for(&url("http://127.0.0.1:9/t"))
                .unwrap()
                .is_none()
        );
        let exempt = env(&[("HTTPS_PROXY", "http://p:3128"), ("NO_PROXY", "login.test")]);
        assert!(
            exempt
                .proxy_for(&url("https://login.test/t"))
                .unwrap()
                .is_none()
        );
        let secret = env(&[("HTTPS_PROXY", "http://u:s3cret@p:3128")]);
        assert!(!format!("{secret:?}").contains("s3cret"));
        let broken = env(&[("HTTPS_PROXY", "socks5://p:1080")]);
        assert!(broken.proxy_for(&url("https://login.test/t")).is_err());
    }

    #[test]
    fn proxy_urls() {
        let p = parse_proxy("HTTPS_PROXY", "http://proxy.corp:3128").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("proxy.corp", 3128));
        assert_eq!(p.shown(), "http://proxy.corp:3128 (HTTPS_PROXY)");
        assert!(p.authorization_line().is_empty());
        let p = parse_proxy("https_proxy", "proxy.corp").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("proxy.corp", 80));
        let p = parse_proxy("HTTP_PROXY", "HTTP://[fd00::5]:8080/").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("fd00::5", 8080));
        assert_eq!(p.shown(), "http://[fd00::5]:8080 (HTTP_PROXY)");

        // User info is percent-decoded into Basic credentials and shown nowhere else.
        let p = parse_proxy("HTTPS_PROXY", "http://me%40corp:s3cr%3At@proxy:3128").unwrap();
        assert_eq!(
            p.authorization_line().as_str(),
            "Proxy-Authorization: Basic bWVAY29ycDpzM2NyOnQ=\r\n"
        );
        assert_eq!(p.shown(), "http://proxy:3128 (HTTPS_PROXY)");
        assert!(!format!("{p:?}").contains("s3cr"));
        let p = parse_proxy("HTTPS_PROXY", "http://only@proxy:3128").unwrap();
        assert_eq!(
            p.authorization_line().as_str(),
            "Proxy-Authorization: Basic b25seTo=\r\n"
        );

        for bad in [
            "https://user:s3cret@proxy:3128",
            "socks5://user:s3cret@proxy:1080",
            "http://user:s3cret@proxy:notaport",
            "http://user:s3cret@proxy:3128/path",
            "http://user:s3cret@",
            "http://user:s3%zzcret@proxy:3128",
        ] {
            let e = parse_proxy("HTTPS_PROXY", bad).unwrap_err();
            assert!(
                e.starts_with("HTTPS_PROXY is not a usable proxy URL"),
                "{e}"
            );
            assert!(!e.contains("s3"), "the password shown: {e}");
        }
        assert!(
            parse_proxy("HTTPS_PROXY", "https://proxy:3128")
                .unwrap_err()
                .contains("https:// proxies are not supported")
        );
    }

    #[test]
    fn connect_answers() {
        assert_eq!(
            connect_status("HTTP/1.1 200 Connection established"),
            Some(200)
        );
        assert_eq!(
            connect_status("HTTP/1.0 407 Proxy Authentication Required"),
            Some(407)
        );
        assert_eq!(connect_status("SSH-2.0-OpenSSH_9"), None);
        assert_eq!(connect_status(""), None);
    }
}
