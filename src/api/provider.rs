//! The `IncomingMailProvider` resource: one login to one POP3 or IMAP mailbox.
//!
//! Field documentation lives here, in doc comments, so that `kubectl explain` and the
//! generated CRD say what the code does. Validation that the API server can do itself
//! (schema and CEL rules) is declared here too, so bad input is refused at apply time.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};

use super::defaults::MAX_INTERVAL;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One login to one POP3 or IMAP mailbox, tested continuously by mailroom.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mailroom.dev",
    version = "v1alpha1",
    kind = "IncomingMailProvider",
    plural = "incomingmailproviders",
    shortname = "imp",
    shortname = "mailprovider",
    category = "mailroom",
    doc = "One login to one POP3 or IMAP mailbox, tested continuously by mailroom; .status says whether it works and why not.",
    namespaced,
    status = "IncomingMailProviderStatus",
    printcolumn(name = "Protocol", type_ = "string", json_path = ".spec.server.protocol"),
    printcolumn(name = "Host", type_ = "string", json_path = ".spec.server.host"),
    printcolumn(name = "Port", type_ = "integer", json_path = ".status.endpoint.port"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].reason"),
    printcolumn(name = "Last Check", type_ = "date", json_path = ".status.lastCheckTime"),
    // Custom columns replace kubectl's default AGE: declared again, last as kubectl puts it.
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(name = "Message", type_ = "string", priority = "1", json_path = ".status.conditions[?(@.type==\"Ready\")].message"),
    validation = Rule::new("self.spec.tls.mode != 'None' || self.spec.authentication.method == 'None' || self.spec.authentication.allowUnencrypted")
        .message("a password or token may not be sent without TLS: set spec.tls.mode to Implicit or StartTLS, or spec.authentication.allowUnencrypted to true")
        .field_path(".spec.authentication.allowUnencrypted")
)]
// On the spec, not the root: the API server checks the rules again at each status write,
// and spares a rule whose object is unchanged (ratcheting), so a provider stored before
// this rule keeps getting its status.
#[x_kube(
    validation = Rule::new("self.server.protocol != 'POP3' || !has(self.check) || self.check.mailbox == 'INBOX'")
        .message("check.mailbox applies to IMAP only: a POP3 server has one mailbox, which every test opens; remove it (or leave it INBOX)")
        .field_path(".check.mailbox")
)]
#[serde(rename_all = "camelCase")]
pub struct IncomingMailProviderSpec {
    /// A free-text name for people; mailroom does not use it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub display_name: Option<String>,
    /// Where the mail server is and what it speaks.
    pub server: ServerSpec,
    /// How the connection is secured. Defaults to implicit TLS with the platform's roots.
    #[serde(default)]
    pub tls: TlsSpec,
    /// How mailroom logs in.
    pub authentication: AuthenticationSpec,
    /// How often and how long each test may take, and what it opens.
    #[serde(default)]
    pub check: CheckSpec,
    /// When true, no tests run and Ready is Unknown with reason Suspended.
    #[serde(default)]
    pub suspend: bool,
}

impl IncomingMailProvider {
    /// Deleted, and kept only until finalizers (not mailroom's: it sets none) are removed:
    /// not tested any more.
    pub fn being_deleted(&self) -> bool {
        self.metadata.deletion_timestamp.is_some()
    }
}

/// The mail server's address and protocol.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServerSpec {
    /// DNS name or IP literal (v4, or v6 without brackets) of the server. No scheme, port,
    /// path or spaces: put the port in `port` and the protocol in `protocol`.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(
        validation = Rule::new("!self.contains('://')").message("host must not contain a scheme such as imaps://: give the bare DNS name or IP, and the protocol in spec.server.protocol"),
        validation = Rule::new("self.contains('://') || !self.contains('/')").message("host must not contain a path or '/': give the bare DNS name or IP"),
        validation = Rule::new("!self.matches('\\\\s')").message("host must not contain spaces"),
        validation = Rule::new("self.contains('://') || !self.contains(':') || isIP(self)").message("host must not contain a port: give the port in spec.server.port (an IPv6 literal is written without brackets)"),
    )]
    pub host: String,
    /// TCP port. Defaults from protocol and TLS mode: IMAP 993 (Implicit) or 143;
    /// POP3 995 (Implicit) or 110.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
    /// IMAP or POP3.
    pub protocol: Protocol,
}

/// The mail access protocol.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    #[serde(rename = "IMAP")]
    Imap,
    #[serde(rename = "POP3")]
    Pop3,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Imap => "IMAP",
            Protocol::Pop3 => "POP3",
        }
    }
}

/// How the connection is secured.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// Implicit: TLS from the first byte (993, 995). StartTLS: plaintext greeting, then
    /// STARTTLS (IMAP) or STLS (POP3), which must be offered and must succeed; mailroom
    /// never falls back to plaintext. None: no TLS at all.
    #[serde(default)]
    pub mode: TlsMode,
    /// Extra trust anchors (PEM) from a ConfigMap or Secret in the provider's namespace,
    /// trusted besides the platform's roots. A self-signed server certificate placed here
    /// is trusted exactly (pinned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle_ref: Option<CaBundleRef>,
    /// The name to verify in the server's certificate (and to send as SNI), instead of
    /// spec.server.host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub server_name: Option<String>,
    /// Accept any certificate. Only for experiments: the Ready message says so.
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

/// How TLS is used on the connection.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum TlsMode {
    #[default]
    Implicit,
    #[serde(rename = "StartTLS")]
    StartTls,
    None,
}

impl TlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Implicit => "Implicit",
            TlsMode::StartTls => "StartTLS",
            TlsMode::None => "None",
        }
    }
}

/// A key in a ConfigMap or Secret of the provider's own namespace that holds PEM certificates.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CaBundleRef {
    /// ConfigMap or Secret.
    pub kind: CaBundleKind,
    /// The object's name, in the provider's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The key that holds the PEM certificates.
    #[serde(default = "default_ca_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_ca_key() -> String {
    "ca.crt".into()
}

/// The kind of object a caBundleRef points at.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaBundleKind {
    ConfigMap,
    Secret,
}

/// How mailroom logs in.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.method != 'Password' || has(self.secretRef)")
        .message("secretRef is required when method is Password")
        .field_path(".secretRef")
        .reason(Reason::FieldValueRequired),
    validation = Rule::new("self.method != 'OAuth2' || has(self.oauth2)")
        .message("oauth2 is required when method is OAuth2")
        .field_path(".oauth2")
        .reason(Reason::FieldValueRequired),
    validation = Rule::new("self.method == 'Password' || !has(self.secretRef)")
        .message("secretRef is used only when method is Password (OAuth2 takes its Secrets in oauth2): remove it, or set method to Password")
        .field_path(".secretRef"),
    validation = Rule::new("self.method == 'OAuth2' || !has(self.oauth2)")
        .message("oauth2 is used only when method is OAuth2: remove it, or set method to OAuth2")
        .field_path(".oauth2"),
    validation = Rule::new(super::oauth2::endpoint_rule("authorizationURL"))
        .message("authorizationURL must be an https:// URL (http:// only to this host's loopback), or set allowUnencrypted to true: the client secret and tokens would cross the network unencrypted")
        .field_path(".oauth2.authorizationURL"),
    validation = Rule::new(super::oauth2::endpoint_rule("tokenURL"))
        .message("tokenURL must be an https:// URL (http:// only to this host's loopback), or set allowUnencrypted to true: the client secret and tokens would cross the network unencrypted")
        .field_path(".oauth2.tokenURL"),
    validation = Rule::new(super::oauth2::endpoint_rule("deviceAuthorizationURL"))
        .message("deviceAuthorizationURL must be an https:// URL (http:// only to this host's loopback), or set allowUnencrypted to true: the client secret and tokens would cross the network unencrypted")
        .field_path(".oauth2.deviceAuthorizationURL"),
    validation = Rule::new(super::oauth2::endpoint_rule("revocationURL"))
        .message("revocationURL must be an https:// URL (http:// only to this host's loopback), or set allowUnencrypted to true: the client secret and tokens would cross the network unencrypted")
        .field_path(".oauth2.revocationURL"),
)]
pub struct AuthenticationSpec {
    /// Password: log in with a username and password from a Secret. OAuth2: log in with
    /// an access token (SASL XOAUTH2 or OAUTHBEARER) that mailroom keeps fresh. None: test
    /// connectivity and the greeting only.
    pub method: AuthMethod,
    /// The login name. When empty, the Secret's username key is used (for OAuth2, the
    /// token Secret's `username` key, which you add: `mailroom authorize` stores tokens,
    /// not the mailbox's login name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 320))]
    pub username: Option<String>,
    /// The Secret, in the provider's namespace, that holds the password (and the username
    /// when `username` is not set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<PasswordSecretRef>,
    /// Allow a password or token over a connection without TLS (tls.mode None), and OAuth2
    /// endpoints at http:// URLs other than this host's loopback. Off by default.
    #[serde(default)]
    pub allow_unencrypted: bool,
    /// OAuth2: where tokens come from and where they are kept. Required when method is
    /// OAuth2. See docs/oauth2.md.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth2: Option<OAuth2Spec>,
}

/// How the provider authenticates.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthMethod {
    Password,
    #[serde(rename = "OAuth2")]
    OAuth2,
    None,
}

/// OAuth2: the authorization server, the flow, and the Secrets holding the client secret
/// and the tokens.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.provider != 'Google' || self.flow == 'AuthorizationCode'")
        .message("Google supports only flow AuthorizationCode for mail (its device flow does not grant https://mail.google.com/, and it has no app-only access to Gmail)")
        .field_path(".flow"),
    validation = Rule::new("self.provider != 'Generic' || (has(self.tokenURL) && self.tokenURL != '')")
        .message("tokenURL is required when provider is Generic")
        .field_path(".tokenURL")
        .reason(Reason::FieldValueRequired),
    validation = Rule::new("self.flow != 'ClientCredentials' || has(self.clientSecretRef)")
        .message("clientSecretRef is required when flow is ClientCredentials")
        .field_path(".clientSecretRef")
        .reason(Reason::FieldValueRequired),
    validation = Rule::new("self.flow != 'ClientCredentials' || self.provider != 'Microsoft' || (has(self.tenant) && !(self.tenant in ['common', 'consumers', 'organizations']))")
        .message("tenant must be set to a tenant id or domain when flow is ClientCredentials (app-only tokens come from one tenant, not from common, organizations or consumers)")
        .field_path(".tenant"),
)]
pub struct OAuth2Spec {
    /// Microsoft (Microsoft 365, Exchange Online, Outlook.com), Google (Gmail, Workspace),
    /// or Generic (any OAuth2 server, by its URLs).
    pub provider: OAuth2Provider,
    /// AuthorizationCode: `mailroom authorize` signs in in a browser (PKCE, loopback
    /// redirect). DeviceCode: `mailroom authorize --device` shows a code to enter on another
    /// device. ClientCredentials: app-only; the controller gets tokens itself with the
    /// client secret, no authorize step.
    #[serde(default)]
    pub flow: OAuth2Flow,
    /// Microsoft: common, organizations (default), consumers (Outlook.com), or a tenant id
    /// or domain (required for ClientCredentials).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub tenant: Option<String>,
    /// The application (client) id registered with the authorization server.
    #[schemars(length(min = 1, max = 512))]
    pub client_id: String,
    /// The client secret of a confidential client, in a Secret of the provider's namespace.
    /// Required for ClientCredentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_ref: Option<SecretKeyRef>,
    /// The Secret, in the provider's namespace, where the tokens live (refresh token,
    /// access token, expiry). `mailroom authorize` creates it; the controller refreshes
    /// and rewrites it.
    pub token_secret_ref: TokenSecretRef,
    /// Scopes to request. Default by provider, protocol and flow: Microsoft delegated
    /// https://outlook.office.com/IMAP.AccessAsUser.All (or POP.AccessAsUser.All) and
    /// offline_access; Microsoft app-only https://outlook.office365.com/.default; Google
    /// https://mail.google.com/.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 512)))]
    pub scopes: Vec<String>,
    /// The authorization endpoint: required for Generic with flow AuthorizationCode; for
    /// Microsoft and Google an override.
    #[serde(
        default,
        rename = "authorizationURL",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(length(max = 2048))]
    pub authorization_url: Option<String>,
    /// The token endpoint: required for Generic; for Microsoft and Google an override.
    #[serde(default, rename = "tokenURL", skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    pub token_url: Option<String>,
    /// The device authorization endpoint (RFC 8628), for flow DeviceCode: required for
    /// Generic; for Microsoft an override.
    #[serde(
        default,
        rename = "deviceAuthorizationURL",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(length(max = 2048))]
    pub device_authorization_url: Option<String>,
    /// The token revocation endpoint (RFC 7009) that `mailroom authorize --revoke` calls:
    /// for Generic, where the server has one; for Google an override (Microsoft has none).
    #[serde(
        default,
        rename = "revocationURL",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(length(max = 2048))]
    pub revocation_url: Option<String>,
    /// Certificates (PEM) trusted for the OAuth2 endpoints besides the platform's roots,
    /// in a ConfigMap or Secret of the provider's namespace: for an authorization server
    /// whose certificate comes from a private CA (an internal Keycloak or AD FS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle_ref: Option<CaBundleRef>,
    /// Auto (default): what the server advertises, OAUTHBEARER (RFC 7628) where both are;
    /// or XOAUTH2 or OAUTHBEARER only.
    #[serde(default)]
    pub sasl_mechanism: SaslMechanism,
}

/// The kind of authorization server.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OAuth2Provider {
    Microsoft,
    Google,
    Generic,
}

/// How tokens are obtained.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OAuth2Flow {
    #[default]
    AuthorizationCode,
    DeviceCode,
    ClientCredentials,
}

/// The SASL mechanism that carries the access token.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SaslMechanism {
    #[default]
    Auto,
    #[serde(rename = "XOAUTH2")]
    XOAuth2,
    #[serde(rename = "OAUTHBEARER")]
    OAuthBearer,
}

/// A key of a Secret in the provider's namespace.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The key (default client-secret).
    #[serde(default = "default_client_secret_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_client_secret_key() -> String {
    "client-secret".into()
}

/// The Secret that holds a provider's tokens.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TokenSecretRef {
    /// The Secret's name, in the provider's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// A Secret in the provider's namespace holding the login.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PasswordSecretRef {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The key holding the username (used when authentication.username is not set).
    #[serde(default = "default_username_key")]
    #[schemars(length(min = 1, max = 253))]
    pub username_key: String,
    /// The key holding the password.
    #[serde(default = "default_password_key")]
    #[schemars(length(min = 1, max = 253))]
    pub password_key: String,
}

fn default_username_key() -> String {
    "username".into()
}
fn default_password_key() -> String {
    "password".into()
}

/// When and how the connection is tested.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
// Judged only once the interval is valid itself: an interval under 30s gets its one error,
// not this one too about a timeout the user never set.
#[x_kube(validation = Rule::new(format!("!self.timeout.matches('{d}') || !self.interval.matches('{d}') || duration(self.interval) < duration('30s') || duration(self.timeout) <= duration(self.interval)", d = cel_duration()))
    .message("timeout (30s unless set) must not be longer than interval")
    .field_path(".timeout"))]
pub struct CheckSpec {
    /// How often to test, as a duration such as 30s, 5m or 1h (minimum 30s).
    #[serde(default = "default_interval")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new(format!("self.matches('{}')", cel_duration())).message(DURATION_FORM))]
    #[x_kube(validation = Rule::new(format!("!self.matches('{}') || duration(self) >= duration('30s')", cel_duration())).message("interval must be at least 30s"))]
    #[x_kube(validation = Rule::new(format!("!self.matches('{}') || duration(self) <= duration('{MAX_INTERVAL}')", cel_duration())).message(format!("interval must be at most {MAX_INTERVAL} (a year)").as_str()))]
    pub interval: String,
    /// Bound on one whole test, such as 30s (at least 1s, at most the interval).
    #[serde(default = "default_timeout")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new(format!("self.matches('{}')", cel_duration())).message(DURATION_FORM))]
    #[x_kube(validation = Rule::new(format!("!self.matches('{}') || duration(self) >= duration('1s')", cel_duration())).message("timeout must be at least 1s"))]
    pub timeout: String,
    /// IMAP: the folder whose STATUS (messages, unseen) is read as part of the test.
    #[serde(default = "default_mailbox")]
    #[schemars(length(min = 1, max = 1024))]
    pub mailbox: String,
}

fn default_interval() -> String {
    "5m".into()
}
fn default_timeout() -> String {
    "30s".into()
}
fn default_mailbox() -> String {
    "INBOX".into()
}

impl Default for CheckSpec {
    fn default() -> Self {
        CheckSpec {
            interval: default_interval(),
            timeout: default_timeout(),
            mailbox: default_mailbox(),
        }
    }
}

/// What a malformed `check.interval` or `check.timeout` is told (a CEL rule rather than
/// the schema's pattern, whose error quotes the regular expression).
const DURATION_FORM: &str =
    "must be a duration such as 30s, 5m or 1h30m: numbers with the units ms, s, m or h, no spaces";

/// The form of `check.interval` and `check.timeout`, as a CEL string literal: the rules
/// that read them as durations apply only once it matches, so a value such as "5 minutes"
/// gets the one error of the form, not CEL conversion errors too.
fn cel_duration() -> String {
    r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$".replace('\\', "\\\\")
}

/// What the last tests found. Written by the controller only.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct IncomingMailProviderStatus {
    /// The generation of the spec the last test used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready (the summary), Reachable (DNS, TCP, TLS and greeting) and Authenticated.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The endpoint tested, after defaulting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<EndpointStatus>,
    /// What the server said of itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<ServerStatus>,
    /// The TLS session of the last test that reached the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsStatus>,
    /// The mailbox opened by the last successful test.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mailbox: Option<MailboxStatus>,
    /// When the last test finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_check_time: Option<Time>,
    /// When a test last succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success_time: Option<Time>,
    /// How long the last test took, such as 143ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_check_duration: Option<String>,
    /// Failed tests in a row; 0 after a success, and counted afresh after an edit of the
    /// spec.
    #[serde(default)]
    pub consecutive_failures: i32,
    /// The value of the mailroom.dev/check-requested-at annotation last acted upon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handled_check_request: Option<String>,
}

/// The endpoint after defaulting.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EndpointStatus {
    /// The server's host, as in spec.server.host.
    pub host: String,
    /// The port tested: spec.server.port, or the protocol's default for the TLS mode.
    pub port: i32,
    pub protocol: Protocol,
    pub tls_mode: TlsMode,
}

/// The server's greeting and capabilities.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ServerStatus {
    /// The server's first line, cut at 256 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub greeting: Option<String>,
    /// What the server says it supports (IMAP CAPABILITY, POP3 CAPA), as last seen in the
    /// test: each cut at 256 characters, at most 32 (the last then says how many more).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
}

/// The negotiated TLS session.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TlsStatus {
    /// The protocol version, e.g. TLSv1.3.
    pub version: String,
    /// The cipher suite, e.g. TLS13_AES_256_GCM_SHA384.
    pub cipher_suite: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_certificate: Option<CertificateStatus>,
}

/// The server's certificate.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CertificateStatus {
    /// The certificate's subject name, cut at 256 characters.
    pub subject: String,
    /// Its issuer's name, cut at 256 characters.
    pub issuer: String,
    /// Expiry, RFC 3339.
    pub not_after: String,
    /// The DNS names of its subjectAltName, at most 32 (the last then says how many more).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_names: Vec<String>,
}

/// Counts from IMAP STATUS or POP3 STAT.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct MailboxStatus {
    /// The mailbox counted: spec.check.mailbox for IMAP; INBOX for POP3, which has no
    /// other.
    pub name: String,
    /// Messages in it.
    pub messages: i64,
    /// IMAP only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unseen: Option<i64>,
}

#[cfg(test)]
mod tests {
    use kube::CustomResourceExt;

    use super::IncomingMailProvider;

    /// `kubectl explain` has something to say of every field, status included.
    #[test]
    fn every_field_of_the_crd_is_described() {
        fn undescribed(schema: &serde_json::Value, path: &str, found: &mut Vec<String>) {
            if let Some(props) = schema["properties"].as_object() {
                for (name, field) in props {
                    let at = format!("{path}.{name}");
                    if field["description"].as_str().is_none_or(str::is_empty) {
                        found.push(at.clone());
                    }
                    undescribed(field, &at, found);
                }
            }
            if schema["items"].is_object() {
                undescribed(&schema["items"], &format!("{path}[]"), found);
            }
        }
        let crd = serde_json::to_value(IncomingMailProvider::crd()).unwrap();
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        let mut found = Vec::new();
        for part in ["spec", "status"] {
            undescribed(&schema["properties"][part], part, &mut found);
        }
        assert!(found.is_empty(), "fields without a description: {found:?}");
    }

    #[test]
    fn kubectl_get_shows_the_age_that_custom_columns_would_drop() {
        let crd = IncomingMailProvider::crd();
        let columns = crd.spec.versions[0]
            .additional_printer_columns
            .clone()
            .unwrap_or_default();
        let names: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
        let age = columns
            .iter()
            .find(|c| c.name == "Age")
            .unwrap_or_else(|| panic!("no Age column among {names:?}"));
        assert_eq!(
            (age.type_.as_str(), age.json_path.as_str(), age.priority),
            ("date", ".metadata.creationTimestamp", None),
            "{names:?}"
        );
        // Last of the columns `kubectl get` shows; the Message follows in `-o wide` only.
        let shown: Vec<&str> = columns
            .iter()
            .filter(|c| c.priority.unwrap_or(0) == 0)
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(shown.last(), Some(&"Age"), "{names:?}");
    }
}
