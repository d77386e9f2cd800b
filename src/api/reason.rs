//! The closed set of `Ready` reasons: one source for status, Events, metrics and docs.

use serde::{Deserialize, Serialize};

/// Why a provider is (or is not) Ready. `as_str()` is the value users see in
/// `.status.conditions[type=Ready].reason`; `hint()` is what they should do about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Reason {
    Connected,
    Checking,
    Suspended,
    InvalidSpec,
    SecretNotFound,
    SecretKeyMissing,
    AccessDenied,
    AuthorizationRequired,
    TokenRefreshFailed,
    AuthorizationRevoked,
    #[serde(rename = "DNSResolutionFailed")]
    DnsResolutionFailed,
    ConnectionRefused,
    ConnectionTimedOut,
    NetworkUnreachable,
    #[serde(rename = "TLSHandshakeFailed")]
    TlsHandshakeFailed,
    CertificateInvalid,
    #[serde(rename = "StartTLSUnavailable")]
    StartTlsUnavailable,
    ProtocolError,
    AuthMechanismUnsupported,
    AuthenticationFailed,
    MailboxUnavailable,
    ServerUnavailable,
    Timeout,
}

impl Reason {
    /// Every reason, in the order the README documents them.
    pub const ALL: [Reason; 23] = [
        Reason::Connected,
        Reason::Checking,
        Reason::Suspended,
        Reason::InvalidSpec,
        Reason::SecretNotFound,
        Reason::SecretKeyMissing,
        Reason::AccessDenied,
        Reason::AuthorizationRequired,
        Reason::TokenRefreshFailed,
        Reason::AuthorizationRevoked,
        Reason::DnsResolutionFailed,
        Reason::ConnectionRefused,
        Reason::ConnectionTimedOut,
        Reason::NetworkUnreachable,
        Reason::TlsHandshakeFailed,
        Reason::CertificateInvalid,
        Reason::StartTlsUnavailable,
        Reason::ProtocolError,
        Reason::AuthMechanismUnsupported,
        Reason::AuthenticationFailed,
        Reason::MailboxUnavailable,
        Reason::ServerUnavailable,
        Reason::Timeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Connected => "Connected",
            Reason::Checking => "Checking",
            Reason::Suspended => "Suspended",
            Reason::InvalidSpec => "InvalidSpec",
            Reason::SecretNotFound => "SecretNotFound",
            Reason::SecretKeyMissing => "SecretKeyMissing",
            Reason::AccessDenied => "AccessDenied",
            Reason::AuthorizationRequired => "AuthorizationRequired",
            Reason::TokenRefreshFailed => "TokenRefreshFailed",
            Reason::AuthorizationRevoked => "AuthorizationRevoked",
            Reason::DnsResolutionFailed => "DNSResolutionFailed",
            Reason::ConnectionRefused => "ConnectionRefused",
            Reason::ConnectionTimedOut => "ConnectionTimedOut",
            Reason::NetworkUnreachable => "NetworkUnreachable",
            Reason::TlsHandshakeFailed => "TLSHandshakeFailed",
            Reason::CertificateInvalid => "CertificateInvalid",
            Reason::StartTlsUnavailable => "StartTLSUnavailable",
            Reason::ProtocolError => "ProtocolError",
            Reason::AuthMechanismUnsupported => "AuthMechanismUnsupported",
            Reason::AuthenticationFailed => "AuthenticationFailed",
            Reason::MailboxUnavailable => "MailboxUnavailable",
            Reason::ServerUnavailable => "ServerUnavailable",
            Reason::Timeout => "Timeout",
        }
    }

    /// The reason `as_str` spells `name`.
    pub fn named(name: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.as_str() == name)
    }

    /// The `Ready` condition status this reason goes with.
    pub fn ready_status(self) -> &'static str {
        match self {
            Reason::Connected => "True",
            Reason::Checking | Reason::Suspended => "Unknown",
            _ => "False",
        }
    }

    /// True when the failure happened before the server was reached (so the Reachable
    /// condition cannot be known from this test).
    pub fn is_before_connect(self) -> bool {
        matches!(
            self,
            Reason::InvalidSpec
                | Reason::SecretNotFound
                | Reason::SecretKeyMissing
                | Reason::AccessDenied
                | Reason::AuthorizationRequired
                | Reason::TokenRefreshFailed
                | Reason::AuthorizationRevoked
        )
    }

    /// What the user should do, in one line (the README's reason table uses this), its
    /// commands named as the person typed this program (see [`crate::command_name`]).
    pub fn hint(self) -> String {
        let text = match self {
            Reason::Connected => {
                "Nothing: the last test connected, logged in and opened the mailbox."
            }
            Reason::Checking => {
                "Wait: the first test, or that of a changed Secret or ConfigMap, has not finished yet."
            }
            Reason::Suspended => "Set spec.suspend to false to resume testing.",
            Reason::InvalidSpec => "Fix the field the message names.",
            Reason::SecretNotFound => {
                "Create the Secret or ConfigMap the message names in the provider's namespace, or fix the reference to it."
            }
            Reason::SecretKeyMissing => {
                "Add the key the message names to the Secret (or point usernameKey/passwordKey at the right one)."
            }
            Reason::AccessDenied => {
                "Let mailroom's ServiceAccount get, list and watch the kind the message names in the provider's namespace (the message says through which Role or ClusterRole). No test runs until it may."
            }
            Reason::AuthorizationRequired => {
                "Run the `mailroom authorize` command the message gives (or, for a token Secret made by hand, add the label the message names)."
            }
            Reason::TokenRefreshFailed => {
                "The token endpoint failed, or asked not to be called until a time the message gives; the message quotes it. Tests resume when it answers."
            }
            Reason::AuthorizationRevoked => {
                "The grant was revoked or expired, or the identity provider wants the user to sign in again (MFA, Conditional Access, consent): run `mailroom authorize` again."
            }
            Reason::DnsResolutionFailed => "Check spec.server.host and the cluster's DNS.",
            Reason::ConnectionRefused => {
                "Check spec.server.port and that the server listens there."
            }
            Reason::ConnectionTimedOut => {
                "A firewall or NetworkPolicy drops the connection, or the host is down."
            }
            Reason::NetworkUnreachable => "The controller's network has no route to the host.",
            Reason::TlsHandshakeFailed => {
                "Check spec.tls.mode against the port (Implicit for 993/995, StartTLS for 143/110)."
            }
            Reason::CertificateInvalid => {
                "Trust the issuer with spec.tls.caBundleRef, fix spec.tls.serverName, or renew the certificate."
            }
            Reason::StartTlsUnavailable => {
                "The server does not offer STARTTLS/STLS here: use mode Implicit on the TLS port."
            }
            Reason::ProtocolError => {
                "The server did not speak the protocol expected: check spec.server.protocol and port."
            }
            Reason::AuthMechanismUnsupported => {
                "The server offers no mechanism mailroom may use for this login (see the message)."
            }
            Reason::AuthenticationFailed => {
                "Fix the username or password in the Secret (the message quotes the server)."
            }
            Reason::MailboxUnavailable => {
                "Check spec.check.mailbox: the server refused to open it (or, for POP3, another session holds it)."
            }
            Reason::ServerUnavailable => {
                "The server failed or refused on its side, not the login: act on its message where it asks for a change (e.g. enable POP access); otherwise tests go on, and it turns Ready when the server recovers."
            }
            Reason::Timeout => {
                "The step the message names took longer than spec.check.timeout allows."
            }
        };
        text.replace("`mailroom ", &format!("`{} ", crate::command_name()))
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_name_is_as_str() {
        for r in Reason::ALL {
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(json, format!("\"{}\"", r.as_str()));
        }
    }

    #[test]
    fn only_connected_is_ready() {
        let ready: Vec<_> = Reason::ALL
            .iter()
            .filter(|r| r.ready_status() == "True")
            .collect();
        assert_eq!(ready, vec![&Reason::Connected]);
    }
}
