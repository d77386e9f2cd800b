//! TLS: the client configuration, a certificate verifier that also pins self-signed
//! certificates and remembers what the server presented, the handshake, and the details
//! (version, cipher suite, certificate) reported in the findings.
//!
//! Trust is the platform's roots (rustls-native-certs; unreadable ones are skipped) plus
//! the PEM certificates of `tls.caBundleRef`. A server certificate that is itself one of
//! those extra certificates is accepted as it is (pinned), even when it is a CA
//! certificate, which webpki refuses as an end entity; its name and validity period are
//! still checked.

use std::io;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use super::classify::{self, printable, quote_bytes};
use super::stream::Tcp;
use super::{CertInfo, Failure, Step, Target, TlsInfo};
use crate::api::{Protocol, Reason, TlsMode};

/// Everything needed for one handshake, prepared before any byte is sent.
pub(crate) struct Setup {
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
    /// The name verified, as people wrote it.
    name: String,
    /// The chain the server presented (end entity first), recorded by the verifier.
    presented: Arc<Mutex<Vec<CertificateDer<'static>>>>,
    protocol: Protocol,
    /// The handshake follows STARTTLS / STLS, which the server accepted: a port that
    /// starts in plaintext, so the advice for an implicit-TLS port does not apply.
    after_starttls: bool,
    extra_roots: usize,
}

impl Setup {
    /// Builds the configuration; a bad CA bundle or server name is an InvalidSpec.
    pub fn new(target: &Target) -> Result<Setup, Failure> {
        let trust = &target.trust;
        let name = trust
            .server_name
            .clone()
            .unwrap_or_else(|| target.host.clone());
        let server_name = ServerName::try_from(name.clone()).map_err(|_| {
            let field = if trust.server_name.is_some() {
                "tls.serverName"
            } else {
                "server.host"
            };
            invalid_spec(format!(
                "{field} {name:?} is not a valid DNS name or IP address to verify the certificate against"
            ))
        })?;

        let (pinned, webpki, verified) = trust_store(trust.extra_roots_pem.as_deref())?;
        let provider = provider();
        let presented = Arc::new(Mutex::new(Vec::new()));
        let verifier = Arc::new(Verifier {
            webpki,
            verified,
            extra_roots: pinned.clone(),
            insecure: trust.insecure_skip_verify,
            presented: presented.clone(),
            algorithms: provider.signature_verification_algorithms,
        });
        let mut config = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|err| setup_failed(err.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        // Every test makes a full handshake, so a replaced certificate is seen by the next
        // one: no session is kept to resume (nor the server's tickets stored for nothing).
        config.resumption = rustls::client::Resumption::disabled();

        Ok(Setup {
            config: Arc::new(config),
            server_name,
            name,
            presented,
            protocol: target.protocol,
            after_starttls: target.tls_mode == TlsMode::StartTls,
            extra_roots: pinned.len(),
        })
    }

    /// The handshake over `tcp`; on failure, says why in the words of [`Self::failure`].
    pub async fn handshake(
        &self,
        tcp: Tcp,
        endpoint: &str,
    ) -> Result<(TlsStream<Tcp>, TlsInfo), Failure> {
        let connector = TlsConnector::from(self.config.clone());
        match connector
            .connect(self.server_name.clone(), tcp)
            .into_fallible()
            .await
        {
            Ok(stream) => {
                let info = tls_info(stream.get_ref().1);
                Ok((stream, info))
            }
            Err((err, tcp)) => Err(self.failure(endpoint, &err, tcp.sniffed())),
        }
    }

    /// Why a handshake failed. `sniffed` is what the server sent first, raw.
    pub fn failure(&self, endpoint: &str, err: &io::Error, sniffed: &[u8]) -> Failure {
        let tls_error = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>());
        if let Some(rustls::Error::InvalidCertificate(cert_error)) = tls_error {
            let chain = self.presented.lock().map(|c| c.clone()).unwrap_or_default();
            return Failure::new(
                Reason::CertificateInvalid,
                Step::TlsHandshake,
                self.certificate_message(endpoint, cert_error, &chain),
            );
        }
        let failed =
            |message: String| Failure::new(Reason::TlsHandshakeFailed, Step::TlsHandshake, message);
        if !sniffed.is_empty() && !looks_like_tls(sniffed) {
            let first_line = sniffed.split(|&b| b == b'\n').next().unwrap_or(sniffed);
            if self.after_starttls {
                return failed(format!(
                    "TLS handshake with {endpoint} failed: the server accepted {} but then \
                     answered in plaintext ({}) instead of starting TLS: its STARTTLS is \
                     broken, or something between (a proxy, a firewall inspecting mail) \
                     strips it",
                    self.starttls_command(),
                    quote_bytes(first_line)
                ));
            }
            let (_, port) = classify::starttls_of(self.protocol);
            return failed(format!(
                "TLS handshake with {endpoint} failed: the server answered in plaintext ({}), \
                 so this port does not start with TLS; use tls.mode StartTLS here, or the \
                 implicit-TLS port (usually {port})",
                quote_bytes(first_line)
            ));
        }
        match tls_error {
            Some(rustls::Error::AlertReceived(alert)) => {
                let hint = match alert {
                    rustls::AlertDescription::HandshakeFailure
                    | rustls::AlertDescription::ProtocolVersion
                    | rustls::AlertDescription::InsufficientSecurity => {
                        " (no TLS version or cipher suite in common; mailroom speaks TLS 1.2 and 1.3)"
                    }
                    rustls::AlertDescription::UnrecognisedName => {
                        " (the server does not know the name mailroom sent: check tls.serverName)"
                    }
                    rustls::AlertDescription::CertificateRequired => {
                        " (the server wants a client certificate)"
                    }
                    _ => "",
                };
                failed(format!(
                    "TLS handshake with {endpoint} failed: the server sent the alert {alert:?}{hint}"
                ))
            }
            Some(other) => failed(format!("TLS handshake with {endpoint} failed: {other}")),
            None => match err.kind() {
                io::ErrorKind::UnexpectedEof
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
                    if self.after_starttls =>
                {
                    failed(format!(
                        "{endpoint} accepted {} but closed the connection during the TLS \
                     handshake without a TLS answer: the server's TLS setup is broken (its \
                     log says why: often a certificate or key it cannot read)",
                        self.starttls_command()
                    ))
                }
                io::ErrorKind::UnexpectedEof
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe => failed(format!(
                    "{endpoint} closed the connection during the TLS handshake without a TLS answer \
                     (is this a TLS port? a STARTTLS port needs tls.mode StartTLS)"
                )),
                _ => failed(format!("TLS handshake with {endpoint} failed: {err}")),
            },
        }
    }

    fn starttls_command(&self) -> &'static str {
        classify::starttls_of(self.protocol).0
    }

    /// The handshake ran out of time.
    pub fn timeout_failure(&self, endpoint: &str, waited: Duration, total: Duration) -> Failure {
        Failure::new(
            Reason::Timeout,
            Step::TlsHandshake,
            if self.after_starttls {
                format!(
                    "TLS handshake with {endpoint} did not finish {} (the server accepted {} but did not go on with TLS)",
                    classify::within(waited, total),
                    self.starttls_command()
                )
            } else {
                format!(
                    "TLS handshake with {endpoint} did not finish {} (is this a TLS port?)",
                    classify::within(waited, total)
                )
            },
        )
    }

    fn certificate_message(
        &self,
        endpoint: &str,
        err: &CertificateError,
        chain: &[CertificateDer<'static>],
    ) -> String {
        let leaf = chain.first().and_then(|der| cert_info(der));
        let subject = leaf
            .as_ref()
            .map(|c| format!(" (subject \"{}\")", c.subject))
            .unwrap_or_default();
        let what = format!("the certificate of {endpoint}{subject}");
        // The names the certificate carries: from our own reading of it, else from
        // rustls's rendering (`DnsName("a")`, `IpAddress(1.2.3.4)`).
        let carried = chain.first().map(|der| san_names(der)).unwrap_or_default();
        let names = |presented: &[String]| -> Vec<String> {
            if carried.is_empty() {
                presented.iter().map(|p| plain_name(p)).collect()
            } else {
                carried.clone()
            }
        };
        let expected = match &self.server_name {
            ServerName::IpAddress(ip) => format!("the IP address {}", IpAddr::from(*ip)),
            _ => format!("{:?}", self.name),
        };
        let mismatch = |names: Vec<String>| {
            if names.is_empty() {
                // Old self-signed certificates (mkcert scripts of mail servers) name their
                // host only as the subject's CN, which TLS clients no longer read: no
                // tls.serverName can match, so do not suggest one.
                format!(
                    "{what} is not valid for {expected}: it carries no subjectAltName, and TLS \
                     clients do not read a host name from the subject's CN (RFC 9525); reissue \
                     it with a subjectAltName for the name (pinning it with tls.caBundleRef \
                     does not change this)"
                )
            } else {
                format!(
                    "{what} is not valid for {expected}: it names {}; set tls.serverName to one \
                     of those names, or connect by a name it carries",
                    names.join(", ")
                )
            }
        };
        match err {
            CertificateError::UnknownIssuer => match &leaf {
                Some(c) if c.subject == c.issuer => format!(
                    "{what} is not trusted: it is self-signed; add it with tls.caBundleRef to pin it"
                ),
                Some(c) => {
                    let bundle = if self.extra_roots > 0 {
                        " (the bundle of tls.caBundleRef holds neither it nor the certificate)"
                    } else {
                        ""
                    };
                    format!(
                        "{what} is not trusted: its issuer \"{}\" is not a trusted root{bundle}; add it with tls.caBundleRef",
                        c.issuer
                    )
                }
                None => format!(
                    "{what} is not trusted: its issuer is unknown; add it with tls.caBundleRef"
                ),
            },
            CertificateError::Other(other)
                if matches!(
                    other.0.downcast_ref::<webpki::Error>(),
                    Some(webpki::Error::CaUsedAsEndEntity)
                ) =>
            {
                format!(
                    "{what} is not trusted: it is a CA certificate used as the server's own; add this very certificate with tls.caBundleRef to pin it"
                )
            }
            CertificateError::ExpiredContext { time, not_after } => format!(
                "{what} expired: notAfter {}, now {}; renew it on the server",
                rfc3339(not_after.as_secs() as i64),
                rfc3339(time.as_secs() as i64)
            ),
            CertificateError::Expired => {
                let not_after = leaf
                    .as_ref()
                    .map(|c| c.not_after.as_str())
                    .unwrap_or("unknown");
                format!("{what} expired: notAfter {not_after}; renew it on the server")
            }
            CertificateError::NotValidYetContext { time, not_before } => format!(
                "{what} is not valid yet: notBefore {}, now {}; check the clocks of the server and of mailroom",
                rfc3339(not_before.as_secs() as i64),
                rfc3339(time.as_secs() as i64)
            ),
            CertificateError::NotValidYet => format!("{what} is not valid yet; check the clocks"),
            CertificateError::NotValidForNameContext { presented, .. } => {
                mismatch(names(presented))
            }
            CertificateError::NotValidForName => mismatch(names(&[])),
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                format!(
                    "{what} is not meant for TLS servers (its extended key usage lacks serverAuth)"
                )
            }
            CertificateError::BadSignature => format!("{what} has an invalid signature"),
            CertificateError::BadEncoding => format!("{what} could not be parsed"),
            CertificateError::Revoked => format!("{what} is revoked"),
            other => format!("{what} was rejected: {other}"),
        }
    }
}

/// "TLSv1.3 TLS13_AES_256_GCM_SHA384; certificate CN=mail.test issued by CN=Test CA, valid until …".
pub(crate) fn describe(info: &TlsInfo, insecure: bool) -> String {
    let mut text = format!("{} {}", info.version, info.cipher_suite);
    if let Some(cert) = &info.peer_certificate {
        text.push_str(&format!(
            "; certificate \"{}\" issued by \"{}\", valid until {}",
            cert.subject, cert.issuer, cert.not_after
        ));
    }
    if insecure {
        text.push_str("; certificate NOT verified (insecureSkipVerify)");
    }
    text
}

fn invalid_spec(message: String) -> Failure {
    Failure::new(Reason::InvalidSpec, Step::TlsHandshake, message)
}

fn setup_failed(err: String) -> Failure {
    Failure::new(
        Reason::TlsHandshakeFailed,
        Step::TlsHandshake,
        format!("could not set up TLS: {err}"),
    )
}

/// The certificates of a PEM bundle; none, or unreadable PEM, is an InvalidSpec.
fn parse_bundle(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, Failure> {
    let mut certs = Vec::new();
    for item in CertificateDer::pem_slice_iter(pem) {
        let cert = item.map_err(|err| {
            invalid_spec(format!(
                "the CA bundle (tls.caBundleRef) is not valid PEM: {err}"
            ))
        })?;
        certs.push(cert);
    }
    if certs.is_empty() {
        // A DER certificate (an ASN.1 SEQUENCE) is the usual mistake: a .cer or .crt file
        // from a Windows CA, put in binaryData.
        let der = if pem.starts_with(&[0x30, 0x82]) {
            ": it looks like a DER (binary) certificate; convert it with \
             `openssl x509 -inform DER -in ca.cer -out ca.crt` and store ca.crt"
        } else {
            ""
        };
        return Err(invalid_spec(format!(
            "the CA bundle (tls.caBundleRef) holds no PEM certificate (-----BEGIN CERTIFICATE-----){der}"
        )));
    }
    Ok(certs)
}

/// The crypto provider, built once. TLS 1.3 suites are offered AES-128-GCM/SHA-256 first:
/// as strong as a mailbox check needs, and SHA-256 has hardware support where SHA-384
/// rarely does, which makes each handshake cheaper for the client and the server.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: OnceLock<Arc<rustls::crypto::CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let mut p = rustls::crypto::ring::default_provider();
            p.cipher_suites.sort_by_key(|s| match s.suite() {
                rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
                rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => 1,
                rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => 2,
                _ => 3,
            });
            Arc::new(p)
        })
        .clone()
}

/// The extra roots of a bundle and the verifier over the platform roots plus them.
type Trusted = (
    Vec<CertificateDer<'static>>,
    Option<Arc<WebPkiServerVerifier>>,
    Arc<VerifiedChains>,
);

/// Chains this trust store has verified, for a server name, and until when that holds.
///
/// Verifying a chain (building it to a root, checking each issuer's signature, the names
/// and the validity periods) is a pure function of the chain, the name, the roots and the
/// time, and costs a signature check and more per test. A server presents the same chain
/// test after test, so the verdict is kept: until the first certificate of the chain
/// expires, and an hour at most. A replaced certificate is a different chain and is
/// verified afresh; the handshake's own signature (proof that the server holds the key)
/// is checked every time. Only successes are kept, so failures keep their exact reasons.
#[derive(Debug, Default)]
pub(crate) struct VerifiedChains {
    until: Memo<u64, 4096>,
}

/// Values keyed by the SHA-256 of what they describe (a certificate, a chain), forgotten
/// all at once when `KEEP` are held: for verdicts and details that are cheap to compute
/// again, of which a fleet needs only a few. The key is a digest, not the bytes, so that
/// what a server sends (a chain padded with certificates it does not need, different at
/// each handshake) cannot make an entry large: `KEEP` entries take a few hundred KB.
#[derive(Debug)]
struct Memo<V, const KEEP: usize>(Mutex<std::collections::HashMap<Digest, V>>);

type Digest = [u8; 32];

/// The SHA-256 of `parts`, each length-prefixed so that different splits differ.
fn digest<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> Digest {
    let mut ctx = sha256_provider().start();
    for part in parts {
        ctx.update(&(part.len() as u64).to_be_bytes());
        ctx.update(part);
    }
    let mut out = [0; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// SHA-256 of `data`, from the TLS library's own hash provider.
pub(crate) fn sha256(data: &[u8]) -> Digest {
    let mut out = [0; 32];
    out.copy_from_slice(sha256_provider().hash(data).as_ref());
    out
}

fn sha256_provider() -> &'static dyn rustls::crypto::hash::Hash {
    let rustls::SupportedCipherSuite::Tls13(suite) =
        rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
    else {
        unreachable!("a TLS 1.3 suite")
    };
    suite.common.hash_provider
}

impl<V, const KEEP: usize> Default for Memo<V, KEEP> {
    fn default() -> Self {
        Memo(Mutex::default())
    }
}

impl<V: Clone, const KEEP: usize> Memo<V, KEEP> {
    fn get(&self, key: &Digest) -> Option<V> {
        self.0.lock().ok()?.get(key).cloned()
    }

    fn put(&self, key: Digest, value: V) {
        if let Ok(mut map) = self.0.lock() {
            if map.len() >= KEEP {
                map.clear();
            }
            map.insert(key, value);
        }
    }
}

impl VerifiedChains {
    const AT_MOST_SECS: u64 = 3600;

    fn key(
        server_name: &ServerName<'_>,
        end_entity: &[u8],
        intermediates: &[CertificateDer<'_>],
    ) -> Digest {
        let name = server_name.to_str();
        digest(
            [name.as_bytes(), end_entity]
                .into_iter()
                .chain(intermediates.iter().map(|c| c.as_ref())),
        )
    }

    fn holds(&self, key: &Digest, now: UnixTime) -> bool {
        self.until
            .get(key)
            .is_some_and(|until| now.as_secs() < until)
    }

    /// Remembers a verified chain: until the earliest notAfter among its certificates.
    fn remember(&self, key: Digest, chain: &[&[u8]], now: UnixTime) {
        let mut until = now.as_secs() + Self::AT_MOST_SECS;
        for der in chain {
            match X509Certificate::from_der(der) {
                Ok((_, cert)) => {
                    until = until.min(cert.validity().not_after.timestamp().max(0) as u64);
                }
                // Verified but unreadable here: do not keep it.
                Err(_) => return,
            }
        }
        self.until.put(key, until);
    }
}

/// The trust store for a CA bundle, built once and then reused (see [`TrustStores`]).
fn trust_store(pem: Option<&[u8]>) -> Result<Trusted, Failure> {
    static STORES: OnceLock<TrustStores> = OnceLock::new();
    STORES.get_or_init(TrustStores::default).get(pem)
}

/// Trust stores built for CA bundles. Building one clones the platform's roots, which
/// costs more than the rest of a test's client work; a fleet shares a few bundles, so the
/// ones used last are kept (at most `KEEP`), keyed by the bundle's digest, and the
/// platform's own (no bundle), which most providers use, is kept apart for good. A store
/// holds a copy of the platform's roots, its bundle's certificates and a memo of the
/// chains it verified (a few hundred KB when full), so a bundle over `KEEP_AT_MOST` (more
/// than a CA bundle needs: the whole Mozilla set is about 220 KB) is built again at each
/// use, not kept: each kept store stays under about 1 MiB, and all of them some tens of
/// MiB, whatever tenants put in their bundles. (A tenant cycling through
/// more than `KEEP` bundles still makes others' bundles be built again: CPU, not memory.)
#[derive(Default)]
struct TrustStores {
    kept: Mutex<std::collections::VecDeque<(Digest, Trusted)>>,
    platform: OnceLock<Trusted>,
}

impl TrustStores {
    const KEEP: usize = 64;
    const KEEP_AT_MOST: usize = 256 << 10;

    fn get(&self, pem: Option<&[u8]>) -> Result<Trusted, Failure> {
        let Some(pem) = pem else {
            if let Some(trusted) = self.platform.get() {
                return Ok(trusted.clone());
            }
            let trusted = build_trust_store(None)?;
            return Ok(self.platform.get_or_init(|| trusted).clone());
        };
        let key = digest([pem]);
        {
            let mut kept = self.kept.lock().unwrap();
            if let Some(at) = kept.iter().position(|(k, _)| *k == key) {
                // Used last, evicted last.
                let entry = kept.remove(at).expect("just found");
                let trusted = entry.1.clone();
                kept.push_back(entry);
                return Ok(trusted);
            }
        }
        let trusted = build_trust_store(Some(pem))?;
        if pem.len() <= Self::KEEP_AT_MOST {
            let mut kept = self.kept.lock().unwrap();
            kept.push_back((key, trusted.clone()));
            if kept.len() > Self::KEEP {
                kept.pop_front();
            }
        }
        Ok(trusted)
    }
}

/// The platform's roots plus a bundle's certificates, and a verifier over them.
fn build_trust_store(pem: Option<&[u8]>) -> Result<Trusted, Failure> {
    let pinned = match pem {
        Some(pem) => parse_bundle(pem)?,
        None => Vec::new(),
    };
    let mut roots = platform_roots().clone();
    for cert in &pinned {
        roots.add(cert.clone()).map_err(|err| {
            invalid_spec(format!(
                "the CA bundle (tls.caBundleRef) holds a certificate that cannot be a trust anchor: {err}"
            ))
        })?;
    }
    let webpki = if roots.is_empty() {
        None
    } else {
        let built = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|err| setup_failed(err.to_string()))?;
        Some(built)
    };
    Ok((pinned, webpki, Arc::default()))
}

/// The platform's trust anchors, loaded once. Unreadable ones are skipped: a container
/// without a CA store still works with `tls.caBundleRef`.
fn platform_roots() -> &'static RootCertStore {
    static ROOTS: OnceLock<RootCertStore> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let loaded = rustls_native_certs::load_native_certs();
        for err in &loaded.errors {
            tracing::debug!(error = %err, "could not load some platform root certificates");
        }
        let mut store = RootCertStore::empty();
        let (added, ignored) = store.add_parsable_certificates(loaded.certs);
        tracing::debug!(added, ignored, "platform root certificates loaded");
        store
    })
}

/// A TLS record starts with a content type 20..=24 and major version 3.
fn looks_like_tls(bytes: &[u8]) -> bool {
    bytes.len() < 2 || ((0x14..=0x18).contains(&bytes[0]) && bytes[1] == 0x03)
}

fn tls_info(conn: &rustls::ClientConnection) -> TlsInfo {
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
        Some(other) => format!("{other:?}"),
        None => "unknown".to_string(),
    };
    let cipher_suite = conn
        .negotiated_cipher_suite()
        .map(|s| {
            let suite = s.suite();
            suite
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("{suite:?}"))
        })
        .unwrap_or_else(|| "unknown".into());
    let peer_certificate = conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|der| leaf_info(der));
    TlsInfo {
        version,
        cipher_suite,
        peer_certificate,
    }
}

/// [`cert_info`] of a server's certificate, parsed once per certificate: a fleet meets
/// the same few certificates in thousands of tests, and parsing one took about 5% of a
/// test's client CPU. At most 256 are kept (about 0.5 MB).
fn leaf_info(der: &[u8]) -> Option<CertInfo> {
    static SEEN: OnceLock<Memo<Option<CertInfo>, 256>> = OnceLock::new();
    let seen = SEEN.get_or_init(Memo::default);
    let key = digest([der]);
    if let Some(info) = seen.get(&key) {
        return info;
    }
    let info = cert_info(der);
    seen.put(key, info.clone());
    info
}

/// Subject, issuer, notAfter and DNS names of a DER certificate.
pub(crate) fn cert_info(der: &[u8]) -> Option<CertInfo> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let dns_names = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(name) => Some(printable(name)),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    // The names are the server's words: control characters in them are escaped, as in
    // a greeting, before they reach a status, an Event or a terminal.
    Some(CertInfo {
        subject: printable(&cert.subject().to_string()),
        issuer: printable(&cert.issuer().to_string()),
        not_after: rfc3339(cert.validity().not_after.timestamp()),
        dns_names,
    })
}

/// The DNS names and IP addresses of a certificate's subjectAltName, in order.
fn san_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(name) => Some(name.to_string()),
            GeneralName::IPAddress(bytes) => match bytes.len() {
                4 => Some(IpAddr::from(<[u8; 4]>::try_from(*bytes).ok()?).to_string()),
                16 => Some(IpAddr::from(<[u8; 16]>::try_from(*bytes).ok()?).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// `DnsName("a")` -> `a`, `IpAddress(1.2.3.4)` -> `1.2.3.4`.
fn plain_name(presented: &str) -> String {
    let inner = presented
        .strip_prefix("DnsName(")
        .or_else(|| presented.strip_prefix("IpAddress("))
        .and_then(|s| s.strip_suffix(')'));
    match inner {
        Some(inner) => inner.trim_matches('"').to_string(),
        None => presented.to_string(),
    }
}

/// Seconds since the Unix epoch as RFC 3339 UTC, "2027-01-31T12:00:00Z".
pub(crate) fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rest = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// webpki's verification, plus pinning of certificates in the CA bundle, plus a record of
/// what the server presented.
#[derive(Debug)]
struct Verifier {
    webpki: Option<Arc<WebPkiServerVerifier>>,
    /// Chains `webpki` verified (shared by every test that uses the same trust store).
    verified: Arc<VerifiedChains>,
    extra_roots: Vec<CertificateDer<'static>>,
    insecure: bool,
    presented: Arc<Mutex<Vec<CertificateDer<'static>>>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Ok(mut presented) = self.presented.lock() {
            *presented = std::iter::once(end_entity)
                .chain(intermediates)
                .map(|c| c.clone().into_owned())
                .collect();
        }
        if self.insecure {
            return Ok(ServerCertVerified::assertion());
        }
        if self
            .extra_roots
            .iter()
            .any(|pinned| pinned.as_ref() == end_entity.as_ref())
        {
            check_validity(end_entity, now)?;
            let parsed = ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_name(&parsed, server_name)?;
            return Ok(ServerCertVerified::assertion());
        }
        let Some(webpki) = &self.webpki else {
            return Err(CertificateError::UnknownIssuer.into());
        };
        let key = VerifiedChains::key(server_name, end_entity, intermediates);
        if self.verified.holds(&key, now) {
            return Ok(ServerCertVerified::assertion());
        }
        let verified = webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let chain: Vec<&[u8]> = std::iter::once(end_entity.as_ref())
            .chain(intermediates.iter().map(|c| c.as_ref()))
            .collect();
        self.verified.remember(key, &chain, now);
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The validity period of a pinned certificate (webpki checks it for chained ones).
fn check_validity(der: &CertificateDer<'_>, now: UnixTime) -> Result<(), rustls::Error> {
    let (_, cert) =
        X509Certificate::from_der(der.as_ref()).map_err(|_| CertificateError::BadEncoding)?;
    let validity = cert.validity();
    let now_secs = now.as_secs() as i64;
    let at = |secs: i64| UnixTime::since_unix_epoch(Duration::from_secs(secs.max(0) as u64));
    if now_secs < validity.not_before.timestamp() {
        return Err(CertificateError::NotValidYetContext {
            time: now,
            not_before: at(validity.not_before.timestamp()),
        }
        .into());
    }
    if now_secs > validity.not_after.timestamp() {
        return Err(CertificateError::ExpiredContext {
            time: now,
            not_after: at(validity.not_after.timestamp()),
        }
        .into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    /// A server's certificate names are its words: control characters in them (a CN
    /// that clears the screen, a newline that forges a line) reach status escaped.
    #[test]
    fn certificate_names_reach_status_without_raw_control_characters() {
        let info = cert_info(&der(include_str!("testdata/control.pem"))).unwrap();
        for name in [&info.subject, &info.issuer, &info.dns_names[0]] {
            assert!(!name.chars().any(char::is_control), "{name:?}");
            assert!(name.contains("\\u{1b}[31m"), "{name:?}");
        }
        assert!(info.subject.contains("FAKE\\nline2"), "{:?}", info.subject);
    }

    /// Kept trust stores stay small whatever tenants put in bundles: a bundle of 1 MiB (one
    /// certificate and a long comment, as a tenant could make it) is not kept, and the
    /// stores in use are not pushed out by others' bundles, since eviction takes the one
    /// used longest ago.
    #[test]
    fn kept_trust_stores_are_the_small_ones_used_last() {
        let stores = TrustStores::default();
        let ca = include_str!("testdata/ca.pem");
        let (_, _, shared) = stores.get(None).unwrap();
        for i in 0..40 {
            let large = format!("{i}\n{}\n{ca}", "x".repeat(1 << 20));
            stores.get(Some(large.as_bytes())).unwrap();
        }
        assert!(
            stores.kept.lock().unwrap().is_empty(),
            "large bundles are not kept"
        );
        for i in 0..200 {
            stores.get(Some(format!("{i}\n{ca}").as_bytes())).unwrap();
            // The platform's store, used by most providers, between every other.
            let (_, _, again) = stores.get(None).unwrap();
            assert!(
                Arc::ptr_eq(&again, &shared),
                "the shared store was built again"
            );
        }
        assert_eq!(stores.kept.lock().unwrap().len(), TrustStores::KEEP);
        // An empty bundle is a bundle (refused: no certificate), not the platform's.
        assert!(stores.get(Some(b"")).is_err());
    }

    fn at(secs: u64) -> UnixTime {
        UnixTime::since_unix_epoch(Duration::from_secs(secs))
    }

    #[test]
    fn a_replaced_certificate_shows_its_own_details() {
        let server = der(include_str!("testdata/server.pem"));
        let expired = der(include_str!("testdata/expired.pem"));
        let first = leaf_info(&server).expect("readable");
        assert_eq!(
            leaf_info(&server).as_ref(),
            Some(&first),
            "the same certificate"
        );
        let replaced = leaf_info(&expired).expect("readable");
        assert_eq!(Some(&replaced), cert_info(&expired).as_ref());
        assert_ne!(replaced.not_after, first.not_after);
        assert_eq!(leaf_info(b"not a certificate"), None);
    }

    #[test]
    fn a_verified_chain_holds_for_its_name_until_an_hour_or_its_expiry() {
        let leaf = der(include_str!("testdata/server.pem"));
        let ca = der(include_str!("testdata/ca.pem"));
        let expired = der(include_str!("testdata/expired.pem"));
        let name = ServerName::try_from("localhost").unwrap();
        let other = ServerName::try_from("mail.example.com").unwrap();
        let chains = VerifiedChains::default();
        let now = 1_800_000_000;
        let key = VerifiedChains::key(&name, &leaf, std::slice::from_ref(&ca));
        assert!(!chains.holds(&key, at(now)));
        chains.remember(key, &[leaf.as_ref(), ca.as_ref()], at(now));
        assert!(chains.holds(&key, at(now + 3599)));
        assert!(!chains.holds(&key, at(now + 3600)), "an hour at most");
        // Another name, another intermediate list, another leaf: not verified.
        assert!(!chains.holds(
            &VerifiedChains::key(&other, &leaf, std::slice::from_ref(&ca)),
            at(now)
        ));
        assert!(!chains.holds(&VerifiedChains::key(&name, &leaf, &[]), at(now)));
        assert!(!chains.holds(&VerifiedChains::key(&name, &expired, &[]), at(now)));
        // A chain whose certificate expires within the hour holds until then only.
        let (_, cert) = X509Certificate::from_der(expired.as_ref()).unwrap();
        let not_after = cert.validity().not_after.timestamp() as u64;
        let key = VerifiedChains::key(&name, &expired, &[]);
        chains.remember(key, &[expired.as_ref()], at(not_after - 60));
        assert!(chains.holds(&key, at(not_after - 1)));
        assert!(!chains.holds(&key, at(not_after)));
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_798_761_599), "2026-12-31T23:59:59Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn presented_names_are_plain() {
        assert_eq!(plain_name("DnsName(\"mail.test\")"), "mail.test");
        assert_eq!(plain_name("IpAddress(127.0.0.1)"), "127.0.0.1");
        assert_eq!(plain_name("other"), "other");
    }

    #[test]
    fn tls_records_are_recognised() {
        assert!(looks_like_tls(&[0x16, 0x03, 0x03]));
        assert!(looks_like_tls(&[0x15, 0x03, 0x01]));
        assert!(!looks_like_tls(b"* OK ready"));
        assert!(!looks_like_tls(b"+OK ready"));
    }

    #[test]
    fn bundles_must_hold_certificates() {
        let f = parse_bundle(b"not pem at all").unwrap_err();
        assert_eq!(f.reason, Reason::InvalidSpec);
        assert!(
            f.message.contains("holds no PEM certificate"),
            "{}",
            f.message
        );
        assert!(!f.message.contains("DER"), "{}", f.message);
        // The test CA, as DER.
        let der = CertificateDer::pem_slice_iter(include_bytes!("testdata/ca.pem"))
            .next()
            .unwrap()
            .unwrap();
        let f = parse_bundle(der.as_ref()).unwrap_err();
        assert!(
            f.message.contains(
                "looks like a DER (binary) certificate; convert it with `openssl x509 -inform DER"
            ),
            "{}",
            f.message
        );
    }
}
