//! SASL mechanisms (RFC 4422) as used by IMAP `AUTHENTICATE` and POP3 `AUTH`: what the
//! client sends first, and how it answers further challenges. PLAIN (RFC 4616) and the
//! obsolete but common LOGIN (draft-murchison-sasl-login), and for OAuth2 access tokens
//! XOAUTH2 and OAUTHBEARER (RFC 7628). An OAuth server reports an error as a challenge
//! carrying JSON, which the client answers (an empty response; `^A` for OAUTHBEARER)
//! before the server's final NO/-ERR; the JSON is kept for the failure message.
//!
//! Responses hold secrets: they are [`Zeroizing`] buffers and their `Debug` is redacted.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use secrecy::zeroize::Zeroizing;
use secrecy::{ExposeSecret, SecretString};

/// What the mechanism presents.
#[derive(Clone)]
enum Credentials {
    Plain {
        username: String,
        password: SecretString,
    },
    /// Answers the server's "Username:" and "Password:" challenges, in that order.
    Login {
        username: String,
        password: SecretString,
    },
    /// Google's and Microsoft's XOAUTH2: `user=<u>^Aauth=Bearer <t>^A^A`.
    XOAuth2 {
        username: String,
        token: SecretString,
    },
    /// RFC 7628 OAUTHBEARER: a GS2 header naming the user, the host and port connected
    /// to, then `auth=Bearer <t>`.
    OAuthBearer {
        username: String,
        token: SecretString,
        /// `host:port` as the probe names it (`[::1]:993` for IPv6).
        endpoint: String,
    },
}

/// One SASL exchange, client side.
pub(crate) struct Exchange {
    credentials: Credentials,
    initial_sent: bool,
    /// Challenges answered so far.
    rounds: usize,
    /// Challenges received after the initial response (decoded, lossy), for messages.
    later_challenges: Vec<String>,
}

/// A response to send (raw, before base64); its bytes are wiped when dropped.
pub(crate) struct Response(Zeroizing<Vec<u8>>);

impl AsRef<[u8]> for Response {
    fn as_ref(&self) -> &[u8] {
        self.0.as_slice()
    }
}

impl fmt::Debug for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Response([redacted, {} bytes])", self.0.len())
    }
}

impl fmt::Debug for Exchange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Exchange")
            .field("mechanism", &self.mechanism())
            .field("initial_sent", &self.initial_sent)
            .finish_non_exhaustive()
    }
}

impl Exchange {
    /// SASL PLAIN with an empty authorization identity.
    pub fn plain(username: &str, password: &SecretString) -> Exchange {
        Exchange::new(Credentials::Plain {
            username: username.to_string(),
            password: password.clone(),
        })
    }

    /// SASL LOGIN.
    pub fn login(username: &str, password: &SecretString) -> Exchange {
        Exchange::new(Credentials::Login {
            username: username.to_string(),
            password: password.clone(),
        })
    }

    /// SASL XOAUTH2 with an OAuth2 access token.
    pub fn xoauth2(username: &str, token: &SecretString) -> Exchange {
        Exchange::new(Credentials::XOAuth2 {
            username: username.to_string(),
            token: token.clone(),
        })
    }

    /// SASL OAUTHBEARER (RFC 7628) with an OAuth2 access token, for the server at
    /// `endpoint` (`host:port`).
    pub fn oauthbearer(username: &str, token: &SecretString, endpoint: &str) -> Exchange {
        Exchange::new(Credentials::OAuthBearer {
            username: username.to_string(),
            token: token.clone(),
            endpoint: endpoint.to_string(),
        })
    }

    fn new(credentials: Credentials) -> Exchange {
        Exchange {
            credentials,
            initial_sent: false,
            rounds: 0,
            later_challenges: Vec::new(),
        }
    }

    /// The mechanism's registered name.
    pub fn mechanism(&self) -> &'static str {
        match self.credentials {
            Credentials::Plain { .. } => "PLAIN",
            Credentials::Login { .. } => "LOGIN",
            Credentials::XOAuth2 { .. } => "XOAUTH2",
            Credentials::OAuthBearer { .. } => "OAUTHBEARER",
        }
    }

    /// Whether the credentials can be encoded at all (SASL forbids NUL in them).
    pub fn check(&self) -> Result<(), &'static str> {
        match &self.credentials {
            Credentials::Plain { username, password }
            | Credentials::Login { username, password } => {
                if username.contains('\0') || password.expose_secret().contains('\0') {
                    Err(
                        "the username or password contains a NUL character, which SASL cannot carry",
                    )
                } else {
                    Ok(())
                }
            }
            Credentials::XOAuth2 { username, token }
            | Credentials::OAuthBearer {
                username, token, ..
            } => {
                let bad = |c: char| c == '\0' || c == '\x01';
                if username.contains(bad) || token.expose_secret().contains(bad) {
                    Err(
                        "the username or access token contains a control character, which SASL cannot carry",
                    )
                } else if token.expose_secret().is_empty() {
                    Err("the access token is empty")
                } else {
                    Ok(())
                }
            }
        }
    }

    /// Whether any credential may have gone out yet.
    pub fn credentials_sent(&self) -> bool {
        self.initial_sent || self.rounds > 0
    }

    /// The client's first message, for the forms that send it with the command (POP3
    /// `AUTH PLAIN <response>`, IMAP SASL-IR); `None` for a mechanism without one.
    pub fn initial_response(&mut self) -> Option<Response> {
        match &self.credentials {
            Credentials::Plain { username, password } => {
                self.initial_sent = true;
                let password = password.expose_secret();
                let mut raw =
                    Zeroizing::new(Vec::with_capacity(username.len() + password.len() + 2));
                raw.push(0);
                raw.extend_from_slice(username.as_bytes());
                raw.push(0);
                raw.extend_from_slice(password.as_bytes());
                Some(Response(raw))
            }
            Credentials::Login { .. } => None,
            Credentials::XOAuth2 { username, token } => {
                self.initial_sent = true;
                let token = token.expose_secret();
                let mut raw = Zeroizing::new(Vec::with_capacity(username.len() + token.len() + 24));
                raw.extend_from_slice(b"user=");
                raw.extend_from_slice(username.as_bytes());
                raw.extend_from_slice(b"\x01auth=Bearer ");
                raw.extend_from_slice(token.as_bytes());
                raw.extend_from_slice(b"\x01\x01");
                Some(Response(raw))
            }
            Credentials::OAuthBearer {
                username,
                token,
                endpoint,
            } => {
                self.initial_sent = true;
                let token = token.expose_secret();
                let mut raw = Zeroizing::new(Vec::with_capacity(
                    username.len() + token.len() + endpoint.len() + 48,
                ));
                // RFC 5801 GS2 header: no channel binding, the authorization identity with
                // ',' and '=' escaped.
                raw.extend_from_slice(b"n,a=");
                raw.extend_from_slice(username.replace('=', "=3D").replace(',', "=2C").as_bytes());
                raw.push(b',');
                // The host and port connected to, which RFC 7628 has clients send (Yahoo's
                // servers document them; Dovecot and Gmail take them).
                if let Some((host, port)) = endpoint.rsplit_once(':') {
                    let host = host.trim_start_matches('[').trim_end_matches(']');
                    raw.extend_from_slice(format!("\x01host={host}\x01port={port}").as_bytes());
                }
                raw.extend_from_slice(b"\x01auth=Bearer ");
                raw.extend_from_slice(token.as_bytes());
                raw.extend_from_slice(b"\x01\x01");
                Some(Response(raw))
            }
        }
    }

    /// The answer to a server challenge (decoded). PLAIN answers the first challenge (an
    /// empty `+`) with its initial response unless that went out with the command; LOGIN
    /// answers the first two with the username and the password. Any further challenge is
    /// remembered and answered with an empty response, which ends the exchange so the
    /// server can give its verdict.
    pub fn respond(&mut self, challenge: &[u8]) -> Response {
        let round = self.rounds;
        self.rounds += 1;
        match &self.credentials {
            Credentials::Plain { .. }
            | Credentials::XOAuth2 { .. }
            | Credentials::OAuthBearer { .. }
                if !self.initial_sent =>
            {
                if let Some(response) = self.initial_response() {
                    return response;
                }
            }
            Credentials::Login { username, .. } if round == 0 => {
                return Response(Zeroizing::new(username.as_bytes().to_vec()));
            }
            Credentials::Login { password, .. } if round == 1 => {
                return Response(Zeroizing::new(password.expose_secret().as_bytes().to_vec()));
            }
            _ => {}
        }
        if self.later_challenges.len() < 4 {
            let text: String = String::from_utf8_lossy(challenge)
                .chars()
                .take(512)
                .collect();
            self.later_challenges.push(text);
        }
        // RFC 7628 §3.2.3: after an error challenge an OAUTHBEARER client sends a single
        // %x01 so the server can finish; XOAUTH2 (and everything else) sends an empty line.
        if matches!(self.credentials, Credentials::OAuthBearer { .. }) {
            return Response(Zeroizing::new(vec![0x01]));
        }
        Response(Zeroizing::new(Vec::new()))
    }

    /// What the server said in challenges after the initial response (an OAuth error
    /// JSON, say), for the failure message.
    pub fn later_challenges(&self) -> &[String] {
        &self.later_challenges
    }
}

/// An OAuth2 error challenge (RFC 7628 §3.2.2, and XOAUTH2's alike), decoded for people:
/// `status invalid_token, scope "..."`. `None` when it is not such JSON.
pub(crate) fn describe_oauth_error(challenge: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(challenge.trim()).ok()?;
    let object = value.as_object()?;
    let text = |key: &str| {
        object.get(key).map(|v| match v {
            serde_json::Value::String(s) => s.chars().take(200).collect::<String>(),
            other => other.to_string().chars().take(200).collect(),
        })
    };
    // Shown unquoted, so control characters (which a JSON string may carry) are escaped
    // here: the server must not put raw ones into a status message.
    let status: String = text("status")?
        .chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect();
    let mut out = format!("status {status}");
    for key in ["scope", "schemes", "openid-configuration"] {
        if let Some(v) = text(key) {
            out.push_str(&format!(", {key} {v:?}"));
        }
    }
    Some(out)
}

/// A challenge received after the credentials, for a failure message: the OAuth2 error
/// decoded where it is one, else the text quoted.
pub(crate) fn describe_challenge(challenge: &str) -> String {
    match describe_oauth_error(challenge) {
        Some(decoded) => format!(
            "; the OAuth2 error was {decoded} (the server sent {})",
            super::classify::quote(challenge)
        ),
        None => format!("; it said {}", super::classify::quote(challenge)),
    }
}

/// async-imap asks the authenticator for each (decoded) challenge and base64-encodes the
/// answer itself.
impl async_imap::Authenticator for &mut Exchange {
    type Response = Response;

    fn process(&mut self, challenge: &[u8]) -> Response {
        self.respond(challenge)
    }
}

/// Base64 of a response, as sent on the wire; wiped when dropped.
pub(crate) fn encode(response: &Response) -> Zeroizing<String> {
    Zeroizing::new(STANDARD.encode(response.as_ref()))
}

/// The bytes of a base64 challenge (`+ <base64>`); an empty challenge is empty.
pub(crate) fn decode_challenge(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    let text = text.trim();
    if text.is_empty() {
        Ok(Vec::new())
    } else {
        STANDARD.decode(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_encodes_per_rfc4616() {
        let mut ex = Exchange::plain("tim", &SecretString::from("tanstaaftanstaaf"));
        assert_eq!(ex.mechanism(), "PLAIN");
        assert!(!ex.credentials_sent());
        let first = ex.initial_response().unwrap();
        assert!(ex.credentials_sent());
        assert_eq!(first.as_ref(), b"\0tim\0tanstaaftanstaaf");
        // The RFC 4616 example, with an empty authzid.
        assert_eq!(encode(&first).as_str(), "AHRpbQB0YW5zdGFhZnRhbnN0YWFm");
    }

    #[test]
    fn first_challenge_gets_the_initial_response_then_empty_answers() {
        let mut ex = Exchange::plain("u", &SecretString::from("p"));
        assert_eq!(ex.respond(b"").as_ref(), b"\0u\0p");
        let json = br#"{"status":"401","schemes":"bearer"}"#;
        assert_eq!(ex.respond(json).as_ref(), b"");
        assert_eq!(
            ex.later_challenges(),
            [String::from_utf8_lossy(json).into_owned()]
        );
    }

    #[test]
    fn login_answers_username_then_password() {
        let mut ex = Exchange::login("u", &SecretString::from("p"));
        assert_eq!(ex.mechanism(), "LOGIN");
        assert!(ex.initial_response().is_none());
        assert!(!ex.credentials_sent());
        assert_eq!(ex.respond(b"Username:").as_ref(), b"u");
        assert!(ex.credentials_sent());
        assert_eq!(ex.respond(b"Password:").as_ref(), b"p");
        assert_eq!(ex.respond(b"what?").as_ref(), b"");
        assert_eq!(ex.later_challenges(), ["what?"]);
    }

    #[test]
    fn nul_is_refused_and_secrets_are_redacted() {
        let ex = Exchange::plain("u\0x", &SecretString::from("p"));
        assert!(ex.check().is_err());
        let mut ex = Exchange::plain("u", &SecretString::from("sekrit-PLANTED"));
        assert!(ex.check().is_ok());
        let response = ex.initial_response().unwrap();
        let shown = format!("{ex:?} {response:?}");
        assert!(!shown.contains("sekrit"), "{shown}");
    }

    #[test]
    fn xoauth2_encodes_user_and_bearer() {
        let mut ex = Exchange::xoauth2("someuser@example.com", &SecretString::from("ya29.vF9dft4"));
        assert_eq!(ex.mechanism(), "XOAUTH2");
        let first = ex.initial_response().unwrap();
        assert_eq!(
            first.as_ref(),
            b"user=someuser@example.com\x01auth=Bearer ya29.vF9dft4\x01\x01"
        );
        // Google's documented example.
        assert_eq!(
            encode(&first).as_str(),
            "dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDQBAQ=="
        );
        let json = br#"{"status":"401","schemes":"bearer mac","scope":"https://mail.google.com/"}"#;
        assert_eq!(ex.respond(json).as_ref(), b"");
        assert_eq!(
            describe_oauth_error(&ex.later_challenges()[0]).unwrap(),
            "status 401, scope \"https://mail.google.com/\", schemes \"bearer mac\""
        );
    }

    #[test]
    fn oauthbearer_encodes_per_rfc7628() {
        let mut ex = Exchange::oauthbearer(
            "user@example.com",
            &SecretString::from("vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg=="),
            "server.example.com:993",
        );
        assert_eq!(ex.mechanism(), "OAUTHBEARER");
        // The two-line form: the empty first challenge gets the initial response.
        let first = ex.respond(b"");
        assert_eq!(
            first.as_ref(),
            b"n,a=user@example.com,\x01host=server.example.com\x01port=993\x01auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==\x01\x01"
        );
        // An error challenge is answered with a single ^A.
        let json = br#"{"status":"invalid_token","scope":"mail"}"#;
        assert_eq!(ex.respond(json).as_ref(), b"\x01");
        assert_eq!(
            describe_oauth_error(&ex.later_challenges()[0]).unwrap(),
            "status invalid_token, scope \"mail\""
        );
        let odd = Exchange::oauthbearer("a,b=c", &SecretString::from("t"), "[::1]:143")
            .initial_response_for_test();
        assert!(odd.starts_with(b"n,a=a=2Cb=3Dc,\x01host=::1\x01port=143\x01auth="));
    }

    #[test]
    fn oauth_tokens_are_redacted_and_checked() {
        let mut ex = Exchange::xoauth2("u", &SecretString::from("tok-PLANTED"));
        let response = ex.initial_response().unwrap();
        let shown = format!("{ex:?} {response:?}");
        assert!(!shown.contains("PLANTED"), "{shown}");
        assert!(
            Exchange::xoauth2("u", &SecretString::from(""))
                .check()
                .is_err()
        );
        assert!(
            Exchange::oauthbearer("u\x01", &SecretString::from("t"), "h:1")
                .check()
                .is_err()
        );
        assert!(describe_oauth_error("not json").is_none());
    }

    #[test]
    fn oauth_errors_escape_control_characters() {
        // Found by the sasl_challenge fuzz target: the status went into the message raw.
        let json = r#"{"status":"invalid_\u007f\u001b[31m","scope":"a\nb"}"#;
        let decoded = describe_oauth_error(json).unwrap();
        assert_eq!(decoded, r#"status invalid_\u{7f}\u{1b}[31m, scope "a\nb""#);
        assert!(!describe_challenge(json).chars().any(char::is_control));
    }

    impl Exchange {
        fn initial_response_for_test(mut self) -> Vec<u8> {
            self.initial_response().unwrap().as_ref().to_vec()
        }
    }

    #[test]
    fn challenges_decode() {
        assert_eq!(decode_challenge("").unwrap(), b"");
        assert_eq!(decode_challenge(" eyJ9 ").unwrap(), b"{\"}");
        assert!(decode_challenge("not base64!").is_err());
    }
}
