//! SASL mechanisms (RFC 4422) as used by IMAP `AUTHENTICATE` and POP3 `AUTH`: what the
//! client sends first, and how it answers further challenges. PLAIN (RFC 4616) and the
//! obsolete but common LOGIN (draft-murchison-sasl-login) now; XOAUTH2 and OAUTHBEARER
//! (RFC 7628) slot in as further [`Credentials`] variants, which
//! is why the exchange already handles challenges after the initial response: an OAuth
//! server reports an error as a challenge carrying JSON, which the client must answer
//! with an empty response before the server's final NO/-ERR.
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
            Credentials::Plain { .. } if !self.initial_sent => {
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
        Response(Zeroizing::new(Vec::new()))
    }

    /// What the server said in challenges after the initial response (an OAuth error
    /// JSON, say), for the failure message.
    pub fn later_challenges(&self) -> &[String] {
        &self.later_challenges
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
    fn challenges_decode() {
        assert_eq!(decode_challenge("").unwrap(), b"");
        assert_eq!(decode_challenge(" eyJ9 ").unwrap(), b"{\"}");
        assert!(decode_challenge("not base64!").is_err());
    }
}
