//! Just enough HTTP/1.1 for OAuth2 token endpoints: one form POST per connection
//! (`Connection: close`), over TLS with the platform's roots (or plain HTTP, which only a
//! loopback test server should use), with a deadline and a bound on what is read, through
//! the environment's HTTP proxy where one is set ([`super::proxy`]). Built on tokio and
//! rustls, which mailroom has anyway, rather than a general HTTP client stack.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use k8s_openapi::jiff::fmt::rfc2822;
use secrecy::zeroize::Zeroizing;
use secrecy::{ExposeSecret, SecretString};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::proxy;

/// The most bytes read of an answer.
const MAX_RESPONSE: usize = 64 * 1024;

/// A URL split into what a request needs.
#[derive(Debug, PartialEq, Eq)]
pub struct Url {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub path: String,
}

/// Parses `http(s)://host[:port][/path]`; the error says what is wrong.
pub fn parse_url(url: &str) -> Result<Url, String> {
    let bad = |why: &str| format!("{url:?} is not a usable URL: {why}");
    let (tls, rest) = if let Some(rest) = url.strip_prefix("https://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("http://") {
        (false, rest)
    } else {
        return Err(bad("it must start with https://"));
    };
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) if rest[i..].starts_with('/') => (&rest[..i], rest[i..].to_string()),
        Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
        None => (rest, "/".to_string()),
    };
    if authority.contains('@') {
        return Err(bad("credentials in URLs are not supported"));
    }
    let default_port = if tls { 443 } else { 80 };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| bad("bad port"))?,
            None if after.is_empty() => default_port,
            None => return Err(bad("junk after the IPv6 address")),
        };
        (host.to_string(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().map_err(|_| bad("bad port"))?),
            None => (authority.to_string(), default_port),
        }
    };
    if host.is_empty() || path.contains([' ', '\r', '\n']) {
        return Err(bad("no host, or spaces"));
    }
    Ok(Url {
        tls,
        host,
        port,
        path,
    })
}

/// `application/x-www-form-urlencoded` (WHATWG): unreserved bytes as they are, space as
/// `+`, everything else `%XX`.
pub fn form_encode(form: &[(&str, SecretString)]) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::new());
    for (i, (k, v)) in form.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        encode_into(&mut out, k);
        out.push('=');
        encode_into(&mut out, v.expose_secret());
    }
    out
}

/// One value as [`form_encode`] writes it.
pub fn form_value(text: &str) -> String {
    let mut out = String::new();
    encode_into(&mut out, text);
    out
}

fn encode_into(out: &mut String, text: &str) {
    for b in text.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
}

/// An answer: its status, its `Retry-After` if it had one, and its body.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub retry_after: Option<RetryAfter>,
    pub body: Vec<u8>,
}

/// A `Retry-After` header (RFC 9110 §10.2.3): seconds, or an HTTP-date.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryAfter {
    Seconds(u64),
    At(Timestamp),
}

impl RetryAfter {
    /// `None` for a value that is neither form: it is ignored, as RFC 9110 allows.
    pub fn parse(value: &str) -> Option<RetryAfter> {
        let value = value.trim();
        if let Ok(seconds) = value.parse() {
            return Some(RetryAfter::Seconds(seconds));
        }
        rfc2822::DateTimeParser::new()
            .parse_timestamp(value)
            .ok()
            .map(RetryAfter::At)
    }

    /// How long from `now` to wait (zero for a date already past).
    pub fn delay(self, now: Timestamp) -> Duration {
        match self {
            RetryAfter::Seconds(s) => Duration::from_secs(s),
            RetryAfter::At(t) => Duration::try_from(now.duration_until(t)).unwrap_or_default(),
        }
    }
}

/// POSTs a form; returns the answer. Errors are messages for people.
pub async fn post_form(
    tls: &Arc<rustls::ClientConfig>,
    url: &str,
    form: &[(&str, SecretString)],
    timeout: Duration,
    loopback: proxy::Loopback,
) -> Result<Response, String> {
    let target = parse_url(url)?;
    // Read at every request, as the environment is where a proxy is set.
    let via = proxy::ProxyEnv::from_env()
        .proxy_for(&target)
        .map_err(|e| format!("POST {url}: {e}"))?;
    let body = form_encode(form);
    let host_header = proxy::authority(&target.host, target.port);
    // Plain HTTP through a proxy: the request names the whole URL, and carries the
    // proxy's credentials (https ones go in the CONNECT, which the endpoint never sees).
    let (request_target, proxy_line) = match &via {
        Some(p) if !target.tls => (
            format!("http://{host_header}{}", target.path),
            p.authorization_line(),
        ),
        _ => (target.path.clone(), Zeroizing::new(String::new())),
    };
    let mut request = Zeroizing::new(format!(
        "POST {request_target} HTTP/1.1\r\nHost: {host_header}\r\n{}Content-Type: application/x-www-form-urlencoded\r\n\
         Accept: application/json\r\nUser-Agent: mailroom\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        proxy_line.as_str(),
        body.len()
    ));
    request.push_str(&body);
    let exchange = async {
        let tcp = proxy::open(via.as_ref(), &target, loopback).await?;
        let raw = if target.tls {
            let name = rustls::pki_types::ServerName::try_from(target.host.clone())
                .map_err(|e| format!("{:?} is not a valid TLS name: {e}", target.host))?;
            let stream = tokio_rustls::TlsConnector::from(tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| {
                    // An internal identity provider's own CA is the usual cause.
                    let hint = match e.to_string().contains("UnknownIssuer") {
                        true => " (a certificate from a private CA: trust that CA with spec.authentication.oauth2.caBundleRef, or check the certificates it holds)",
                        false => "",
                    };
                    format!("TLS with {host_header}: {e}{hint}")
                })?;
            roundtrip(stream, request.as_bytes()).await
        } else {
            roundtrip(tcp, request.as_bytes()).await
        }
        .map_err(|e| format!("talking to {host_header}: {e}"))?;
        let answer = parse_response(&raw).map_err(|why| format!("answered {why}"))?;
        // Plain HTTP goes to the proxy itself: its refusal is not the endpoint's answer.
        match &via {
            Some(p) if !target.tls && answer.status == 407 => Err(format!(
                "the proxy {} refused the request: HTTP 407 (its credentials in the variable are missing or wrong)",
                p.shown()
            )),
            _ => Ok(answer),
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(why)) => Err(format!("POST {url}: {why}")),
        Err(_) => Err(format!(
            "POST {url}: no answer within {}s{}",
            timeout.as_secs(),
            via.as_ref()
                .map(|p| format!(" (through the proxy {})", p.shown()))
                .unwrap_or_default()
        )),
    }
}

async fn roundtrip<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    request: &[u8],
) -> std::io::Result<Vec<u8>> {
    stream.write_all(request).await?;
    stream.flush().await?;
    let mut raw = Vec::new();
    let mut limited = (&mut stream).take(MAX_RESPONSE as u64 + 1);
    match limited.read_to_end(&mut raw).await {
        Ok(_) => {}
        // Servers that close TLS without close_notify, and proxies that answer and reset
        // before the request's body is read: what arrived is what there is.
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
            ) && !raw.is_empty() => {}
        Err(e) => return Err(e),
    }
    Ok(raw)
}

/// Splits a whole HTTP/1.1 response into status, `Retry-After` and body (de-chunked).
pub fn parse_response(raw: &[u8]) -> Result<Response, String> {
    if raw.len() > MAX_RESPONSE {
        return Err(format!("with more than {MAX_RESPONSE} bytes"));
    }
    let mut raw = raw;
    let (end, head, status) = loop {
        let end = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or("with no complete HTTP header")?;
        let head = String::from_utf8_lossy(&raw[..end]);
        let status_line = head.split("\r\n").next().unwrap_or_default();
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .filter(|_| status_line.starts_with("HTTP/1."))
            .ok_or_else(|| format!("with something that is not HTTP: {status_line:?}"))?;
        // An interim answer (100 Continue, 103 Early Hints) comes before the real one
        // (RFC 9110 §15.2): read as the answer, the real one, tokens and all, would be
        // taken for its body.
        if (100..200).contains(&status) {
            raw = &raw[end + 4..];
            continue;
        }
        break (end, head, status);
    };
    let mut lines = head.split("\r\n");
    lines.next();
    let mut chunked = false;
    let mut length = None;
    let mut retry_after = None;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            let value = value.trim();
            if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.to_ascii_lowercase().contains("chunked");
            } else if name.eq_ignore_ascii_case("content-length") {
                length = value.parse::<usize>().ok();
            } else if name.eq_ignore_ascii_case("retry-after") {
                retry_after = RetryAfter::parse(value);
            }
        }
    }
    let answer = |body: Vec<u8>| Response {
        status,
        retry_after,
        body,
    };
    let mut body = &raw[end + 4..];
    if chunked {
        let mut out = Vec::new();
        loop {
            let line_end = body
                .windows(2)
                .position(|w| w == b"\r\n")
                .ok_or("with a broken chunked body")?;
            let size_text = String::from_utf8_lossy(&body[..line_end]);
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| "with a broken chunk size")?;
            body = &body[line_end + 2..];
            if size == 0 {
                break;
            }
            if body.len() < size {
                return Err("with a truncated chunk".into());
            }
            out.extend_from_slice(&body[..size]);
            body = body.get(size + 2..).unwrap_or_default();
        }
        return Ok(answer(out));
    }
    if let Some(n) = length {
        body = &body[..n.min(body.len())];
    }
    Ok(answer(body.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("https://login.microsoftonline.com/organizations/oauth2/v2.0/token").unwrap(),
            Url {
                tls: true,
                host: "login.microsoftonline.com".into(),
                port: 443,
                path: "/organizations/oauth2/v2.0/token".into()
            }
        );
        assert_eq!(
            parse_url("http://127.0.0.1:8080").unwrap(),
            Url {
                tls: false,
                host: "127.0.0.1".into(),
                port: 8080,
                path: "/".into()
            }
        );
        assert_eq!(parse_url("http://[::1]:9/t?x=1").unwrap().host, "::1");
        assert!(parse_url("ftp://x").is_err());
        assert!(parse_url("https://u:p@x/").is_err());
    }

    #[test]
    fn forms_encode_like_browsers() {
        let form = [
            ("grant_type", SecretString::from("refresh_token")),
            (
                "scope",
                SecretString::from(
                    "https://outlook.office.com/IMAP.AccessAsUser.All offline_access",
                ),
            ),
        ];
        assert_eq!(
            form_encode(&form).as_str(),
            "grant_type=refresh_token&scope=https%3A%2F%2Foutlook.office.com%2FIMAP.AccessAsUser.All+offline_access"
        );
    }

    #[test]
    fn responses_plain_and_chunked() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, b"{}".as_slice()));
        assert_eq!(r.retry_after, None);
        let r = parse_response(
            b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n2\r\n\"}\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (400, b"{\"a\"}".as_slice()));
        assert!(parse_response(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
    }

    #[test]
    fn interim_answers_are_skipped_for_the_real_one() {
        let r = parse_response(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, b"{}".as_slice()));
        // Nothing after the interim answer: no answer at all.
        assert!(parse_response(b"HTTP/1.1 100 Continue\r\n\r\n").is_err());
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        let r = parse_response(
            b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 30\r\nContent-Length: 0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.status, 429);
        assert_eq!(r.retry_after, Some(RetryAfter::Seconds(30)));
        let now: Timestamp = "2026-11-29T10:00:00Z".parse().unwrap();
        assert_eq!(r.retry_after.unwrap().delay(now), Duration::from_secs(30));
        let r = parse_response(
            b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: Sun, 29 Nov 2026 10:02:00 GMT\r\n\r\n",
        )
        .unwrap();
        assert_eq!(
            r.retry_after.map(|r| r.delay(now)),
            Some(Duration::from_secs(120))
        );
        // A date already past waits nothing; a value of neither form is ignored.
        assert_eq!(
            RetryAfter::parse("Sun, 29 Nov 2026 09:00:00 GMT").map(|r| r.delay(now)),
            Some(Duration::ZERO)
        );
        assert_eq!(RetryAfter::parse("soon"), None);
        assert_eq!(RetryAfter::parse("-5"), None);
    }
}
