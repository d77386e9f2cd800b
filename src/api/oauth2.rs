//! OAuth2 defaults that depend on more than one field: the endpoints of Microsoft's and
//! Google's authorization servers, and the scopes a provider asks for by protocol and flow.

use super::{OAuth2Flow, OAuth2Provider, OAuth2Spec, Protocol};

/// The endpoints of one authorization server, after defaulting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OAuth2Endpoints {
    pub authorization: Option<String>,
    pub token: Option<String>,
    pub device_authorization: Option<String>,
    /// RFC 7009 revocation, where the provider has one (Google).
    pub revocation: Option<String>,
}

/// The Microsoft tenant when none is given: work and school accounts.
pub const DEFAULT_TENANT: &str = "organizations";

/// Microsoft's delegated scopes (Exchange Online and Outlook.com).
pub const MICROSOFT_IMAP_SCOPE: &str = "https://outlook.office.com/IMAP.AccessAsUser.All";
pub const MICROSOFT_POP_SCOPE: &str = "https://outlook.office.com/POP.AccessAsUser.All";
/// Microsoft's app-only scope (IMAP.AccessAsApp and POP.AccessAsApp roles).
pub const MICROSOFT_APP_SCOPE: &str = "https://outlook.office365.com/.default";
/// Google's one scope for IMAP and POP3.
pub const GOOGLE_MAIL_SCOPE: &str = "https://mail.google.com/";

fn given(value: &Option<String>) -> Option<String> {
    value.as_ref().filter(|v| !v.trim().is_empty()).cloned()
}

/// The endpoints a spec names: its own URLs where given, else the provider's.
pub fn endpoints(spec: &OAuth2Spec) -> OAuth2Endpoints {
    let (authorization, token, device, revocation) = match spec.provider {
        OAuth2Provider::Microsoft => {
            let tenant = spec
                .tenant
                .as_deref()
                .filter(|t| !t.trim().is_empty())
                .unwrap_or(DEFAULT_TENANT);
            let base = format!("https://login.microsoftonline.com/{tenant}/oauth2/v2.0");
            (
                Some(format!("{base}/authorize")),
                Some(format!("{base}/token")),
                Some(format!("{base}/devicecode")),
                None,
            )
        }
        OAuth2Provider::Google => (
            Some("https://accounts.google.com/o/oauth2/v2/auth".to_string()),
            Some("https://oauth2.googleapis.com/token".to_string()),
            None,
            Some("https://oauth2.googleapis.com/revoke".to_string()),
        ),
        OAuth2Provider::Generic => (None, None, None, None),
    };
    OAuth2Endpoints {
        authorization: given(&spec.authorization_url).or(authorization),
        token: given(&spec.token_url).or(token),
        device_authorization: given(&spec.device_authorization_url).or(device),
        revocation: given(&spec.revocation_url).or(revocation),
    }
}

/// What an OAuth2 endpoint URL must match unless the provider allows unencrypted logins:
/// `https://`, or `http://` to this host's loopback (a sidecar), so that the client
/// secret, a code or tokens never cross the network in the clear. One pattern (RE2 and
/// Rust's regex read it alike) for the API server's CEL rule and the controller's check.
pub const ENCRYPTED_ENDPOINT: &str =
    r"(?i)^(https://|http://(localhost|127(\.[0-9]{1,3}){3}|\[::1\])(:[0-9]{1,5})?([/?#]|$))";

/// The CEL rule, on `spec.authentication`, for the endpoint field `field` of `oauth2`.
pub fn endpoint_rule(field: &str) -> String {
    let url = format!("self.oauth2.{field}");
    let pattern = ENCRYPTED_ENDPOINT.replace('\\', "\\\\");
    format!(
        "!has(self.oauth2) || !has({url}) || {url} == '' || self.allowUnencrypted || {url}.matches('{pattern}')"
    )
}

/// Refuses endpoints that would carry the client secret, a code or tokens without TLS
/// (see [`ENCRYPTED_ENDPOINT`]). The API server refuses such a spec at apply time; this
/// covers objects stored before that rule and manifests that never met the API server.
/// The error names the field.
pub fn plaintext_endpoints(spec: &OAuth2Spec, allow_unencrypted: bool) -> Result<(), String> {
    static ENCRYPTED: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(ENCRYPTED_ENDPOINT).expect("a valid pattern")
    });
    if allow_unencrypted {
        return Ok(());
    }
    for (field, url) in [
        ("authorizationURL", &spec.authorization_url),
        ("tokenURL", &spec.token_url),
        ("deviceAuthorizationURL", &spec.device_authorization_url),
        ("revocationURL", &spec.revocation_url),
    ] {
        let Some(url) = given(url) else { continue };
        if !ENCRYPTED.is_match(&url) {
            return Err(format!(
                "spec.authentication.oauth2.{field} {url:?} is not an https:// URL (http:// only to this host's loopback): the client secret and tokens would cross the network unencrypted; use https://, or set spec.authentication.allowUnencrypted to true"
            ));
        }
    }
    Ok(())
}

/// The scopes to request: the spec's own, else the provider's defaults for the protocol
/// and flow (Generic has none: its server decides).
pub fn scopes(spec: &OAuth2Spec, protocol: Protocol) -> Vec<String> {
    if !spec.scopes.is_empty() {
        return spec.scopes.clone();
    }
    let defaults: &[&str] = match (spec.provider, spec.flow, protocol) {
        (OAuth2Provider::Microsoft, OAuth2Flow::ClientCredentials, _) => &[MICROSOFT_APP_SCOPE],
        (OAuth2Provider::Microsoft, _, Protocol::Imap) => &[MICROSOFT_IMAP_SCOPE, "offline_access"],
        (OAuth2Provider::Microsoft, _, Protocol::Pop3) => &[MICROSOFT_POP_SCOPE, "offline_access"],
        (OAuth2Provider::Google, _, _) => &[GOOGLE_MAIL_SCOPE],
        (OAuth2Provider::Generic, _, _) => &[],
    };
    defaults.iter().map(|s| s.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> OAuth2Spec {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn endpoints_without_tls_are_refused_but_on_loopback_or_when_allowed() {
        let with = |field: &str, url: &str| {
            spec(&format!(
                "{{provider: Generic, clientId: c, tokenSecretRef: {{name: t}}, {field}: '{url}'}}"
            ))
        };
        for url in [
            "https://id.example/token",
            "HTTPS://id.example/token",
            "http://127.0.0.1:8080/token",
            "http://127.9.9.9/token",
            "http://localhost/token",
            "http://[::1]:9000/token",
        ] {
            assert_eq!(
                plaintext_endpoints(&with("tokenURL", url), false),
                Ok(()),
                "{url}"
            );
        }
        for (field, url) in [
            ("tokenURL", "http://keycloak.auth.svc:8080/token"),
            ("tokenURL", "http://127.0.0.1.evil.example/token"),
            ("tokenURL", "http://localhost@evil.example/token"),
            ("tokenURL", "http://user@localhost/token"),
            ("tokenURL", "http://127.0.0.1.evil.example:80/token"),
            ("authorizationURL", "http://id.example/auth"),
            ("deviceAuthorizationURL", "ftp://id.example/device"),
        ] {
            let refused = plaintext_endpoints(&with(field, url), false).unwrap_err();
            assert!(
                refused.contains(&format!("spec.authentication.oauth2.{field}")),
                "{refused}"
            );
            assert_eq!(plaintext_endpoints(&with(field, url), true), Ok(()));
        }
        // Microsoft's and Google's own endpoints are https.
        let s = spec("{provider: Microsoft, clientId: c, tokenSecretRef: {name: t}}");
        assert_eq!(plaintext_endpoints(&s, false), Ok(()));
    }

    #[test]
    fn microsoft_endpoints_follow_the_tenant() {
        let s = spec("{provider: Microsoft, clientId: c, tokenSecretRef: {name: t}}");
        let e = endpoints(&s);
        assert_eq!(
            e.authorization.as_deref(),
            Some("https://login.microsoftonline.com/organizations/oauth2/v2.0/authorize")
        );
        assert_eq!(
            e.token.as_deref(),
            Some("https://login.microsoftonline.com/organizations/oauth2/v2.0/token")
        );
        assert_eq!(
            e.device_authorization.as_deref(),
            Some("https://login.microsoftonline.com/organizations/oauth2/v2.0/devicecode")
        );
        assert_eq!(e.revocation, None);
        let s = spec(
            "{provider: Microsoft, tenant: contoso.onmicrosoft.com, clientId: c, tokenSecretRef: {name: t}, tokenURL: 'http://127.0.0.1:1/token'}",
        );
        let e = endpoints(&s);
        assert_eq!(e.token.as_deref(), Some("http://127.0.0.1:1/token"));
        assert_eq!(
            e.authorization.as_deref(),
            Some("https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/authorize")
        );
    }

    #[test]
    fn google_and_generic_endpoints() {
        let e = endpoints(&spec(
            "{provider: Google, clientId: c, tokenSecretRef: {name: t}}",
        ));
        assert_eq!(
            e.authorization.as_deref(),
            Some("https://accounts.google.com/o/oauth2/v2/auth")
        );
        assert_eq!(
            e.token.as_deref(),
            Some("https://oauth2.googleapis.com/token")
        );
        assert_eq!(
            e.revocation.as_deref(),
            Some("https://oauth2.googleapis.com/revoke")
        );
        assert_eq!(e.device_authorization, None);
        let e = endpoints(&spec(
            "{provider: Generic, clientId: c, tokenSecretRef: {name: t}, tokenURL: 'https://id.example/token', authorizationURL: ''}",
        ));
        assert_eq!(e.token.as_deref(), Some("https://id.example/token"));
        assert_eq!(e.authorization, None, "an empty URL is no URL");
    }

    #[test]
    fn default_scopes_by_provider_protocol_and_flow() {
        let ms = spec("{provider: Microsoft, clientId: c, tokenSecretRef: {name: t}}");
        assert_eq!(
            scopes(&ms, Protocol::Imap),
            [MICROSOFT_IMAP_SCOPE, "offline_access"]
        );
        assert_eq!(
            scopes(&ms, Protocol::Pop3),
            [MICROSOFT_POP_SCOPE, "offline_access"]
        );
        let device =
            spec("{provider: Microsoft, flow: DeviceCode, clientId: c, tokenSecretRef: {name: t}}");
        assert_eq!(
            scopes(&device, Protocol::Pop3),
            [MICROSOFT_POP_SCOPE, "offline_access"]
        );
        let app = spec(
            "{provider: Microsoft, flow: ClientCredentials, tenant: t, clientId: c, tokenSecretRef: {name: t}}",
        );
        assert_eq!(scopes(&app, Protocol::Imap), [MICROSOFT_APP_SCOPE]);
        assert_eq!(scopes(&app, Protocol::Pop3), [MICROSOFT_APP_SCOPE]);
        let google = spec("{provider: Google, clientId: c, tokenSecretRef: {name: t}}");
        assert_eq!(scopes(&google, Protocol::Imap), [GOOGLE_MAIL_SCOPE]);
        let generic =
            spec("{provider: Generic, clientId: c, tokenSecretRef: {name: t}, tokenURL: x}");
        assert!(scopes(&generic, Protocol::Imap).is_empty());
        let own =
            spec("{provider: Google, clientId: c, tokenSecretRef: {name: t}, scopes: [a, b]}");
        assert_eq!(scopes(&own, Protocol::Imap), ["a", "b"]);
    }
}
