//! One test of one provider: from the spec and the objects it references to the probe's
//! inputs, the probe's report, and a verdict (a Ready reason and a message). The CLI's
//! `check` and the controller both call [`run`], so they always agree.

use std::time::Duration;

use crate::api::{Endpoint, IncomingMailProviderSpec, Reason, parse_duration};
use crate::credentials::{self, Fetched};
use crate::probe::{self, Login, Report, Target, Trust};

/// What one test concluded.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub endpoint: Endpoint,
    /// None when the test stopped before any connection (bad spec, missing Secret).
    pub report: Option<Report>,
    pub reason: Reason,
    pub message: String,
    /// The login method was None: Authenticated is "not required".
    pub anonymous: bool,
}

impl Outcome {
    /// A verdict reached before any connection (the spec, the Secrets, the controller's
    /// rights): no report.
    pub fn before_connecting(
        spec: &IncomingMailProviderSpec,
        reason: Reason,
        message: String,
    ) -> Outcome {
        Outcome {
            endpoint: Endpoint::of(spec),
            report: None,
            reason,
            message,
            anonymous: spec.authentication.method == crate::api::AuthMethod::None,
        }
    }

    pub fn is_ready(&self) -> bool {
        self.reason == Reason::Connected
    }
}

/// The durations of `spec.check`, parsed and held to the CRD's rules, in their words. The
/// rules make failure rare, but an object stored before a rule existed (or by an API
/// server that skipped them) may carry an interval of 0s, which would test in a loop, and
/// a manifest checked without a cluster was never held to them.
pub fn timing(spec: &IncomingMailProviderSpec) -> Result<(Duration, Duration), String> {
    let interval =
        parse_duration(&spec.check.interval).map_err(|e| format!("spec.check.interval: {e}"))?;
    let timeout =
        parse_duration(&spec.check.timeout).map_err(|e| format!("spec.check.timeout: {e}"))?;
    if interval < MIN_INTERVAL {
        return Err("spec.check.interval: interval must be at least 30s".into());
    }
    if timeout < MIN_TIMEOUT {
        return Err("spec.check.timeout: timeout must be at least 1s".into());
    }
    if timeout > interval {
        return Err(
            "spec.check.timeout: timeout (30s unless set) must not be longer than interval".into(),
        );
    }
    Ok((interval, timeout))
}

/// The CRD's floors for `spec.check` (its CEL rules say the same).
const MIN_INTERVAL: Duration = Duration::from_secs(30);
const MIN_TIMEOUT: Duration = Duration::from_secs(1);

/// Builds the probe's inputs, or the verdict that stops the test before it connects.
pub fn prepare(
    spec: &IncomingMailProviderSpec,
    objects: &Fetched,
) -> Result<(Target, Login), (Reason, String)> {
    let (_, timeout) = timing(spec).map_err(|e| (Reason::InvalidSpec, e))?;
    let endpoint = Endpoint::of(spec);
    let login = credentials::login(spec, objects).map_err(|e| (e.reason(), e.to_string()))?;
    let extra_roots_pem =
        credentials::ca_bundle(spec, objects).map_err(|e| (e.reason(), e.to_string()))?;
    let target = Target {
        host: endpoint.host,
        port: endpoint.port,
        protocol: endpoint.protocol,
        tls_mode: endpoint.tls_mode,
        trust: Trust {
            extra_roots_pem,
            server_name: spec.tls.server_name.clone(),
            insecure_skip_verify: spec.tls.insecure_skip_verify,
        },
        mailbox: spec.check.mailbox.clone(),
        timeout,
    };
    Ok((target, login))
}

/// Runs one test.
pub async fn run(spec: &IncomingMailProviderSpec, objects: &Fetched) -> Outcome {
    let (target, login) = match prepare(spec, objects) {
        Ok(inputs) => inputs,
        Err((reason, message)) => return Outcome::before_connecting(spec, reason, message),
    };
    let endpoint = Endpoint::of(spec);
    let anonymous = spec.authentication.method == crate::api::AuthMethod::None;
    let report = probe::run(&target, &login).await;
    let (reason, mut message) = verdict(spec, &endpoint, &login, &report);
    if let Some(warning) = &objects.token_warning {
        message.push_str(&format!("; WARNING: {warning}"));
    }
    Outcome {
        endpoint,
        report: Some(report),
        reason,
        message,
        anonymous,
    }
}

/// The Ready reason and message a report leads to.
pub fn verdict(
    spec: &IncomingMailProviderSpec,
    endpoint: &Endpoint,
    login: &Login,
    report: &Report,
) -> (Reason, String) {
    if let Some(f) = &report.failure {
        return (f.reason, f.message.clone());
    }
    let who = match login {
        Login::None => "connected (no login configured)".to_string(),
        Login::Password { username, .. } => {
            let how = report.findings.mechanism.as_deref().unwrap_or("password");
            format!("logged in as {username} ({how})")
        }
        Login::OAuth2 { username, .. } => {
            let how = report.findings.mechanism.as_deref().unwrap_or("OAuth2");
            format!("logged in as {username} (OAuth2, {how})")
        }
    };
    let mut message = format!("{} {endpoint}: {who}", endpoint.protocol.as_str());
    if let Some(m) = &report.findings.mailbox {
        let messages = crate::probe::messages(m.messages);
        match m.unseen {
            Some(unseen) => {
                message.push_str(&format!("; {} has {messages}, {unseen} unseen", m.name))
            }
            None => message.push_str(&format!("; {} has {messages}", m.name)),
        }
    }
    if spec.tls.insecure_skip_verify {
        message.push_str(
            "; WARNING: the server's certificate is not verified (tls.insecureSkipVerify)",
        );
    }
    // An http:// token endpoint off this host, which only allowUnencrypted lets through.
    if let (Login::OAuth2 { .. }, Some(o)) = (login, &spec.authentication.oauth2)
        && crate::api::oauth2::plaintext_endpoints(o, false).is_err()
    {
        message.push_str(
            "; WARNING: the OAuth2 client secret and tokens go to an http:// endpoint without TLS (authentication.allowUnencrypted)",
        );
    }
    // Said as loudly as the certificate: whoever reads the line may not know the spec.
    if endpoint.tls_mode == crate::api::TlsMode::None {
        let sent = match login {
            Login::Password { .. } => Some("the password"),
            Login::OAuth2 { .. } => Some("the access token"),
            Login::None => None,
        };
        if let Some(sent) = sent {
            message.push_str(&format!(
                "; WARNING: {sent} is sent without TLS (authentication.allowUnencrypted)"
            ));
        }
    }
    (Reason::Connected, message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::SaslMechanism;
    use secrecy::SecretString;

    /// What the CRD's rules refuse is refused here too, naming the field, in their words:
    /// an interval of 0s stored before a rule existed must not test in a loop.
    #[test]
    fn timing_holds_the_durations_to_the_crds_rules() {
        let spec = |check: &str| -> IncomingMailProviderSpec {
            serde_yaml::from_str(&format!(
                "server: {{host: mail.example.com, protocol: IMAP}}\nauthentication: {{method: None}}\ncheck: {check}\n"
            ))
            .unwrap()
        };
        let secs = Duration::from_secs;
        assert_eq!(timing(&spec("{}")), Ok((secs(300), secs(30))));
        assert_eq!(
            timing(&spec("{interval: 30s, timeout: 30s}")),
            Ok((secs(30), secs(30)))
        );
        assert_eq!(
            timing(&spec("{interval: 1h, timeout: 1s}")),
            Ok((secs(3600), secs(1)))
        );
        for (check, said) in [
            (
                "{interval: 0s}",
                "spec.check.interval: interval must be at least 30s",
            ),
            (
                "{interval: 29s}",
                "spec.check.interval: interval must be at least 30s",
            ),
            (
                "{interval: 1m, timeout: 500ms}",
                "spec.check.timeout: timeout must be at least 1s",
            ),
            (
                "{interval: 1m, timeout: 0s}",
                "spec.check.timeout: timeout must be at least 1s",
            ),
            (
                "{interval: 1m, timeout: 61s}",
                "spec.check.timeout: timeout (30s unless set) must not be longer than interval",
            ),
            (
                "{interval: soon}",
                "spec.check.interval: \"soon\" is not a duration",
            ),
        ] {
            let err = timing(&spec(check)).unwrap_err();
            assert!(err.starts_with(said), "{check}: {err}");
        }
    }

    fn passed() -> Report {
        Report {
            steps: Vec::new(),
            findings: Default::default(),
            failure: None,
            duration: Duration::ZERO,
        }
    }

    fn oauth2() -> Login {
        Login::OAuth2 {
            username: "alice".into(),
            token: SecretString::from("t"),
            mechanism: SaslMechanism::Auto,
            allow_unencrypted: false,
        }
    }

    /// What allowUnencrypted lets through is said in the Ready message, as the
    /// certificate a test does not verify is.
    #[test]
    fn the_ready_message_warns_of_what_is_not_protected() {
        let message = |yaml: &str, login: &Login| {
            let spec: IncomingMailProviderSpec = serde_yaml::from_str(yaml).unwrap();
            verdict(&spec, &Endpoint::of(&spec), login, &passed()).1
        };
        let server = "server: {host: mail.example.com, protocol: IMAP}\n";
        let oauth2_at = |url: &str| {
            format!(
                "{server}authentication: {{method: OAuth2, allowUnencrypted: true, oauth2: {{provider: Generic, clientId: c, tokenURL: '{url}', tokenSecretRef: {{name: t}}}}}}\n"
            )
        };
        let http = message(&oauth2_at("http://idp.example.com/token"), &oauth2());
        assert!(
            http.contains(
                "WARNING: the OAuth2 client secret and tokens go to an http:// endpoint without TLS"
            ),
            "{http}"
        );
        for url in [
            "https://idp.example.com/token",
            "http://127.0.0.1:8080/token",
        ] {
            let text = message(&oauth2_at(url), &oauth2());
            assert!(!text.contains("WARNING"), "{url}: {text}");
        }
        let unverified = message(
            &format!(
                "{server}tls: {{insecureSkipVerify: true}}\nauthentication: {{method: None}}\n"
            ),
            &Login::None,
        );
        assert!(
            unverified.contains(
                "WARNING: the server's certificate is not verified (tls.insecureSkipVerify)"
            ),
            "{unverified}"
        );
    }
}
